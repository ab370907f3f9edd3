"""Writing files so that no crash, full disk or kill ever leaves a broken file under the real name.

Every file the library writes (weights, checkpoints, downloads, configs, exports, reports) goes through
:func:`atomic_path`: it is written under a temporary name in the same folder, flushed to the disk, and only then
renamed over the real name, which is atomic on POSIX and Windows. Until the rename the old file, if any, is
untouched; on any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import WeightFileError


def sync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk, so that a rename never exposes unwritten data."""
    descriptor = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable, in order (POSIX; Windows cannot open folders and skips this)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems do not sync folders
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an error the file is synced and
    renamed over ``path``. Checks that may reject the file (a checksum) belong inside the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=suffix)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        sync_file(temporary)
        os.replace(temporary, path)
        sync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)  # already gone after the rename


def save_figure(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG to ``path`` atomically, and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    plt.close(figure)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | Path, remedy: str = "") -> Any:
    """The JSON document in ``path``, or a WeightFileError that names the file (and ``remedy``, what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:
        raise WeightFileError(f"{path} is not valid JSON ({error}){': ' + remedy if remedy else ''}") from error
