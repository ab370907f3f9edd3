"""Local HTTP servers for download tests, on 127.0.0.1, recording the paths asked for: one serves a directory, the
other stands in for the Hugging Face Hub's file downloads.

Not fixtures themselves, so that test modules can wrap them in their own fixtures without importing fixtures
from one another.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class LocalServer:
    root: Path
    base_url: str
    requests: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@contextmanager
def running(handler: type[BaseHTTPRequestHandler] | functools.partial) -> Iterator[str]:
    """Serve with ``handler`` until the block ends; yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


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

    with running(functools.partial(Handler, directory=str(root))) as base_url:
        yield LocalServer(root, base_url, requests)


@contextmanager
def closed_port_url(name: str) -> Iterator[str]:
    """A URL on a port that is bound but not listening: connecting is refused at once, and no one can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{name}"


# --- a stand-in for the Hugging Face Hub ------------------------------------------------------------------------

LFS_SUFFIXES = (".safetensors", ".pth", ".bin")  # stored in Git LFS, as the Hub's .gitattributes has them


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubStandIn:
    """The repositories a :func:`serve_hub` server holds: ``commits[repo][commit] = {filename: bytes}``, branches in
    ``refs[repo][branch] = commit``, and ``served`` overriding the bytes sent for a file (a corrupt transfer)."""

    base_url: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    commits: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    served: dict[tuple[str, str, str], bytes] = field(default_factory=dict)

    def publish(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit of ``files`` on ``branch`` of ``repo`` (earlier files kept, as a Git commit would);
        returns its 40-hex id."""
        current = self.commits.get(repo, {}).get(self.refs.get(repo, {}).get(branch, ""), {})
        tree = {**current, **files}
        commit = hashlib.sha1(repr((repo, branch, len(self.commits.get(repo, {})), sorted(tree.items()))).encode()
                              ).hexdigest()
        self.commits.setdefault(repo, {})[commit] = tree
        self.refs.setdefault(repo, {})[branch] = commit
        return commit

    def downloads(self) -> list[str]:
        """The paths of the GET requests (file transfers), in order."""
        return [path for method, path in self.requests if method == "GET"]


def hub_headers(commit: str, filename: str, data: bytes) -> dict[str, str]:
    """The headers huggingface_hub reads from the Hub's answer to HEAD or GET on a resolve URL (its
    file_download.get_hf_file_metadata and _get_metadata_or_catch_error): X-Repo-Commit (the commit the revision
    resolved to), the ETag (the Git blob SHA-1 of a file in Git, of its LFS pointer for an LFS file), and for LFS files
    X-Linked-Etag (the SHA-256 of the content: the LFS oid) and X-Linked-Size. The real Hub answers LFS files with a
    302 to its CDN carrying these headers; serving the bytes directly with the same headers is read the same way."""
    headers = {"X-Repo-Commit": commit, "Content-Length": str(len(data)), "Accept-Ranges": "bytes"}
    if filename.endswith(LFS_SUFFIXES):
        oid = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        headers.update({"ETag": f'"{git_blob_sha1(pointer)}"', "X-Linked-Etag": f'"{oid}"',
                        "X-Linked-Size": str(len(data))})
    else:
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
    return headers


@contextmanager
def serve_hub() -> Iterator[HubStandIn]:
    """The Hub's file downloads, ``{endpoint}/{org}/{name}/resolve/{revision}/{filename}`` (HEAD and GET), for the
    repositories published on the yielded :class:`HubStandIn`; pass its ``base_url`` as ``endpoint=`` or
    ``HF_ENDPOINT``. Unknown repositories, revisions and files get 404 with the X-Error-Code huggingface_hub maps to
    RepositoryNotFoundError, RevisionNotFoundError and EntryNotFoundError."""
    hub = HubStandIn(base_url="")

    class Handler(BaseHTTPRequestHandler):
        def answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path))
            repo, sep, rest = unquote(self.path).partition("/resolve/")
            repo, (revision, _, filename) = repo.lstrip("/"), rest.partition("/")
            if not sep or repo not in hub.commits:
                return self.error(404, "RepoNotFound")
            commit = hub.refs[repo].get(revision, revision)
            if commit not in hub.commits[repo]:
                return self.error(404, "RevisionNotFound")
            if filename not in hub.commits[repo][commit]:
                return self.error(404, "EntryNotFound", commit)
            data = hub.commits[repo][commit][filename]
            headers = hub_headers(commit, filename, data)
            data = hub.served.get((repo, commit, filename), data)
            headers["Content-Length"] = str(len(data))
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def error(self, code: int, error_code: str, commit: str | None = None) -> None:
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", error_code)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def log_message(self, *_args: object) -> None:
            pass

    with running(Handler) as base_url:
        hub.base_url = base_url
        yield hub
