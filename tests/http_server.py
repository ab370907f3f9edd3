"""A local HTTP server for download tests: serves one directory on 127.0.0.1 and records the paths asked for.

Not a fixture itself, so that test modules can wrap it in their own fixtures without importing fixtures
from one another.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class LocalServer:
    root: Path
    base_url: str
    requests: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@contextmanager
def serve_directory(root: Path) -> Iterator[LocalServer]:
    """Serve the files under ``root`` until the block ends."""
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *_args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield LocalServer(root, f"http://127.0.0.1:{httpd.server_port}", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextmanager
def closed_port_url(name: str) -> Iterator[str]:
    """A URL on a port that is bound but not listening: connecting is refused at once, and no one can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{name}"
