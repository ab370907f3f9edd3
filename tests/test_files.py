"""The one atomic-write helper every file the library writes goes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from xception.files import atomic_path, write_text_atomic


def test_written_file_replaces_the_old_one_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]


def test_an_error_inside_the_block_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("good")
    with pytest.raises(RuntimeError, match="checksum"), atomic_path(path) as temporary:
        temporary.write_text("half written")
        raise RuntimeError("checksum mismatch")
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
