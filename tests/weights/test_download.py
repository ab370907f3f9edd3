"""Tests for xception.weights.download against a local HTTP server and file:// URLs: no internet, deterministic."""

from __future__ import annotations

import hashlib
import json
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from http_server import serve_directory

from xception.weights import download as hub
from xception.weights.download import WeightFile, WeightsUnavailableError

FILENAME = "weights.h5"


@dataclass
class Server:
    root: Path
    base_url: str
    requests: list[str]

    def publish(self, name: str, data: bytes) -> str:
        """Serve ``data`` under ``name`` and return its URL."""
        (self.root / name).write_bytes(data)
        return f"{self.base_url}/{name}"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A test that forgets directory= must not touch the real cache, and a proxy setting must not capture 127.0.0.1.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    with serve_directory(root) as local:
        yield Server(root, local.base_url, local.requests)


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A URL on a port that is bound but not listening, so connecting is refused at once and no one can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{FILENAME}"


@pytest.fixture
def payload() -> bytes:
    return random.Random(0).randbytes(300_000)


def weight_file(data: bytes, *urls: str) -> WeightFile:
    return WeightFile(FILENAME, urls, hashlib.md5(data).hexdigest(), len(data))


def part_files(directory: Path) -> list[Path]:
    return list(directory.glob("*.part"))


def test_fetch_downloads_verifies_and_caches(server: Server, payload: bytes, tmp_path: Path) -> None:
    file = weight_file(payload, server.publish(FILENAME, payload))
    cache = tmp_path / "cache" / "nested"  # does not exist yet
    path = hub.fetch(file, directory=cache, progress=False)
    assert path == cache / FILENAME
    assert path.read_bytes() == payload
    assert server.requests == [f"/{FILENAME}"]
    assert part_files(cache) == []

    assert hub.fetch(file, directory=cache, progress=False) == path
    assert server.requests == [f"/{FILENAME}"]  # served from the cache, no second request


def test_cached_file_is_used_without_network(payload: bytes, dead_url: str, tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(payload)
    assert hub.fetch(weight_file(payload, dead_url), directory=tmp_path, progress=False) == tmp_path / FILENAME


def test_fetch_defaults_to_torch_cache(server: Server, payload: bytes, tmp_path: Path) -> None:
    path = hub.fetch(weight_file(payload, server.publish(FILENAME, payload)), progress=False)
    assert path == tmp_path / "torch_home" / "hub" / "checkpoints" / FILENAME
    assert path.read_bytes() == payload


def test_file_urls_are_supported(payload: bytes, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    path = hub.fetch(weight_file(payload, source.as_uri()), directory=tmp_path / "cache", progress=False)
    assert path.read_bytes() == payload


@pytest.mark.parametrize("first", ["not_found", "unreachable"])
def test_falls_back_to_next_url(first: str, server: Server, payload: bytes, dead_url: str, tmp_path: Path) -> None:
    bad = f"{server.base_url}/missing.h5" if first == "not_found" else dead_url
    file = weight_file(payload, bad, server.publish(FILENAME, payload))
    path = hub.fetch(file, directory=tmp_path / "cache", progress=False)
    assert path.read_bytes() == payload
    assert part_files(tmp_path / "cache") == []


@pytest.mark.parametrize(
    ("served", "expected"),
    [
        (lambda data: bytes([data[0] ^ 1]) + data[1:], "checksum mismatch"),
        (lambda data: data[:-1], "size mismatch"),
        (lambda data: data + b"\0", "size mismatch"),
    ],
    ids=["same_size_wrong_bytes", "truncated", "too_long"],
)
def test_wrong_download_leaves_nothing_behind(
    served, expected: str, server: Server, payload: bytes, tmp_path: Path
) -> None:
    file = weight_file(payload, server.publish(FILENAME, served(payload)))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError, match=expected) as info:
        hub.fetch(file, directory=cache, progress=False)
    assert (file.md5 if expected == "checksum mismatch" else str(file.num_bytes)) in str(info.value)
    assert not (cache / FILENAME).exists()
    assert part_files(cache) == []


def test_all_urls_failing_explains_manual_download(
    server: Server, payload: bytes, dead_url: str, tmp_path: Path
) -> None:
    missing = f"{server.base_url}/missing.h5"
    file = weight_file(payload, dead_url, missing)
    target = tmp_path / "cache" / FILENAME
    with pytest.raises(WeightsUnavailableError) as info:
        hub.fetch(file, directory=target.parent, progress=False)
    message = str(info.value)
    for needle in (FILENAME, dead_url, missing, "HTTP 404", "Connection", str(target), file.md5, str(len(payload))):
        assert needle in message
    assert f"from {dead_url} (or {missing}) and put it at {target}" in message
    assert "weights=" in message
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [(lambda data: data[:1000], "bytes, found 1000"), (lambda data: data[::-1], "expected md5")],
    ids=["wrong_size", "same_size_wrong_bytes"],
)
def test_corrupt_cached_file_is_refused_and_kept(
    corrupt, expected: str, server: Server, payload: bytes, tmp_path: Path
) -> None:
    file = weight_file(payload, server.publish(FILENAME, payload))
    cached = tmp_path / FILENAME
    cached.write_bytes(corrupt(payload))
    with pytest.raises(WeightsUnavailableError, match=expected) as info:
        hub.fetch(file, directory=tmp_path, progress=False)
    message = str(info.value)
    assert str(cached) in message and "delete or replace" in message and file.urls[0] in message
    assert cached.read_bytes() == corrupt(payload)  # not deleted: it may be the user's
    assert server.requests == []


def test_verify_file_reports_expected_and_found(payload: bytes, tmp_path: Path) -> None:
    file = weight_file(payload, "https://example.invalid/weights.h5")
    path = tmp_path / FILENAME
    path.write_bytes(payload)
    hub.verify_file(path, file)

    path.write_bytes(payload[:10])
    with pytest.raises(WeightsUnavailableError, match=f"expected {len(payload)} bytes, found 10"):
        hub.verify_file(path, file)

    wrong = bytes(len(payload))
    path.write_bytes(wrong)
    with pytest.raises(
        WeightsUnavailableError, match=f"expected md5 {file.md5}, found {hashlib.md5(wrong).hexdigest()}"
    ):
        hub.verify_file(path, file)


def test_md5sum_streams_across_chunks(tmp_path: Path) -> None:
    data = random.Random(1).randbytes((5 << 20) // 2)  # 2.5 MiB: several chunks and a partial one
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert hub.md5sum(path) == hashlib.md5(data).hexdigest()
    (tmp_path / "empty").touch()
    assert hub.md5sum(tmp_path / "empty") == hashlib.md5(b"").hexdigest()


def test_cache_dir_respects_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub" / "checkpoints"
    torch.hub.set_dir(str(tmp_path / "explicit"))  # the autouse fixture restores torch.hub._hub_dir
    assert hub.cache_dir() == tmp_path / "explicit" / "checkpoints"


@pytest.mark.parametrize("progress", [False, True])
def test_progress_bar_only_when_asked(
    progress: bool, server: Server, payload: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.fetch(weight_file(payload, server.publish(FILENAME, payload)), directory=tmp_path / "cache", progress=progress)
    out, err = capsys.readouterr()  # captured, so the bar is never printed
    assert out == ""
    assert (FILENAME in err) == progress


def test_weight_file_rejects_declaration_typos() -> None:
    with pytest.raises(ValueError, match="md5"):
        WeightFile(FILENAME, ("https://example.invalid/w",), "ABC", 1)
    with pytest.raises(ValueError, match="urls"):
        WeightFile(FILENAME, "https://example.invalid/w", "0" * 32, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="urls"):
        WeightFile(FILENAME, (), "0" * 32, 1)


# --- files on the Hugging Face Hub: pinned by the size and SHA-256 the hub lists --------------------------

REPO = "timm/xception65p.ra3_in1k"


def publish_on_hub(server: Server, data: bytes, listing: object | None = None) -> hub.HubFile:
    """Lay ``data`` out as the hub does (the file under ``REPO/resolve/main/``, the listing under ``api/``) and
    return a HubFile pointing at the server. The listing defaults to the true size and SHA-256 of ``data``."""
    if listing is None:
        listing = [{"type": "file", "path": ".gitattributes", "size": 10},
                   {"type": "file", "path": "model.safetensors", "size": len(data),
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 135}}]
    file = server.root / REPO / "resolve" / "main" / "model.safetensors"
    file.parent.mkdir(parents=True)
    file.write_bytes(data)
    tree = server.root / "api" / "models" / REPO / "tree" / "main"
    tree.parent.mkdir(parents=True)
    tree.write_text(json.dumps(listing))
    return hub.HubFile(REPO, endpoint=server.base_url)


def test_hub_file_is_checked_against_the_published_sha256_and_recorded(
    server: Server, payload: bytes, dead_url: str, tmp_path: Path
) -> None:
    file = publish_on_hub(server, payload)
    cache = tmp_path / "cache"
    path = hub.fetch(file, directory=cache, progress=False)
    assert path == cache / "timm--xception65p.ra3_in1k--model.safetensors"
    assert path.read_bytes() == payload
    assert server.requests == [f"/api/models/{REPO}/tree/main", f"/{REPO}/resolve/main/model.safetensors"]
    record = json.loads((cache / f"{path.name}.pin.json").read_text())
    assert record["sha256"] == hashlib.sha256(payload).hexdigest() and record["num_bytes"] == len(payload)

    offline = hub.HubFile(REPO, endpoint=dead_url.rsplit("/", 1)[0])  # the record is enough now
    assert hub.fetch(offline, directory=cache, progress=False) == path
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # corrupted in the cache: refused, and kept
    with pytest.raises(WeightsUnavailableError, match="expected sha256"):
        hub.fetch(offline, directory=cache, progress=False)
    assert path.exists()


def test_hub_download_that_differs_from_the_listing_is_refused(
    server: Server, payload: bytes, tmp_path: Path
) -> None:
    other = hashlib.sha256(b"another file").hexdigest()
    file = publish_on_hub(server, payload, listing=[
        {"path": "model.safetensors", "lfs": {"oid": other, "size": len(payload)}}])
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError, match=f"checksum mismatch: expected sha256 starting {other}"):
        hub.fetch(file, directory=cache, progress=False)
    assert not (cache / file.filename).exists() and part_files(cache) == []


@pytest.mark.parametrize("listing", [
    [{"path": "model.safetensors", "size": 300_000}],  # not stored in LFS: no SHA-256 listed
    [{"path": "pytorch_model.bin", "lfs": {"oid": "0" * 64, "size": 1}}],  # the file is not in the listing
    {"error": "Repository not found"},
], ids=["no_lfs_entry", "file_not_listed", "not_a_listing"])
def test_hub_file_without_a_published_checksum_is_not_downloaded(
    listing: object, server: Server, payload: bytes, tmp_path: Path
) -> None:
    file = publish_on_hub(server, payload, listing=listing)
    with pytest.raises(WeightsUnavailableError, match=r"publishes no SHA-256 and size .* weights=<path>"):
        hub.fetch(file, directory=tmp_path / "cache", progress=False)
    assert server.requests == [f"/api/models/{REPO}/tree/main"]
    assert not (tmp_path / "cache").exists()  # no record of a checksum that was never published


def test_hub_offline_error_says_how_to_load_by_hand(dead_url: str, tmp_path: Path) -> None:
    file = hub.HubFile(REPO, endpoint=dead_url.rsplit("/", 1)[0])
    with pytest.raises(WeightsUnavailableError) as info:
        hub.fetch(file, directory=tmp_path, progress=False)
    message = str(info.value)
    assert file.listing_url in message and file.url in message and "weights=<path>" in message
    assert "Connection refused" in message or "ConnectionRefused" in message


def test_unreadable_hub_record_is_reported(tmp_path: Path) -> None:
    file = hub.HubFile(REPO, endpoint="http://127.0.0.1:9")  # never asked: the record is read first
    (tmp_path / f"{file.filename}.pin.json").write_text("{not json")
    with pytest.raises(WeightsUnavailableError, match="delete it to read them from the hub again"):
        hub.fetch(file, directory=tmp_path, progress=False)

