"""Tests for xception.weights.download against a local HTTP server, a local stand-in for the Hugging Face Hub and
file:// URLs: no internet, deterministic."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from http_server import HubStandIn, serve_directory, serve_hub

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


def test_file_without_a_published_size_is_pinned_by_its_checksum(server: Server, payload: bytes,
                                                                 tmp_path: Path) -> None:
    """timm's GitHub release files publish only the SHA-256 prefix in their names."""
    sha256 = hashlib.sha256(payload).hexdigest()
    file = WeightFile("w-" + sha256[:8] + ".pth", (server.publish("w.pth", payload),), None, None, sha256[:8])
    assert hub.fetch(file, directory=tmp_path / "cache", progress=False).read_bytes() == payload
    wrong = dataclasses.replace(file, filename="other.pth", sha256_prefix="0" * 8 if sha256[:8] != "0" * 8 else "1" * 8)
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch"):
        hub.fetch(wrong, directory=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "other.pth").exists()


# --- files on the Hugging Face Hub, through huggingface_hub, against a local stand-in -----------------------

REPO = "timm/xception65p.ra3_in1k"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache of the test's own, online mode, and no endpoint from the environment."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


@pytest.fixture
def stand_in() -> Iterator[HubStandIn]:
    with serve_hub() as hub_server:
        yield hub_server


def hub_file(stand_in: HubStandIn, data: bytes, **options: object) -> hub.HubFile:
    """``data`` published as model.safetensors of REPO, and a HubFile pinned to that commit and its SHA-256."""
    commit = stand_in.publish(REPO, {"model.safetensors": data, "config.json": b'{"architecture": "x"}'})
    pins = {"revision": commit, "sha256": hashlib.sha256(data).hexdigest(), "endpoint": stand_in.base_url}
    return hub.HubFile(REPO, **{**pins, **options})


def test_hub_file_lands_in_the_hub_cache_and_is_served_from_it(stand_in: HubStandIn, hub_cache: Path,
                                                              payload: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    file = hub_file(stand_in, payload)
    path = hub.fetch(file, progress=False)
    # huggingface_hub's layout, shared with timm and transformers: the snapshot of the pinned commit links to a blob
    # named by the file's SHA-256 (its Git LFS id).
    assert path == hub_cache / "models--timm--xception65p.ra3_in1k" / "snapshots" / file.revision / "model.safetensors"
    assert path.read_bytes() == payload
    assert Path(os.path.realpath(path)).name == hashlib.sha256(payload).hexdigest()
    url = f"/{REPO}/resolve/{file.revision}/model.safetensors"
    assert stand_in.requests == [("HEAD", url), ("GET", url)]

    assert hub.fetch(file, progress=False) == path  # a pinned commit in the cache: no request at all
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.fetch(file, progress=False) == path
    assert len(stand_in.requests) == 2


def test_revision_pins_the_file(stand_in: HubStandIn, hub_cache: Path) -> None:
    first = hub_file(stand_in, b"first weights")
    second = stand_in.publish(REPO, {"model.safetensors": b"later weights"})
    pinned = hub.hub_download(REPO, "model.safetensors", revision=first.revision, endpoint=stand_in.base_url,
                              progress=False)
    latest = hub.hub_download(REPO, "model.safetensors", endpoint=stand_in.base_url, progress=False)
    assert pinned.read_bytes() == b"first weights" and pinned.parent.name == first.revision
    assert latest.read_bytes() == b"later weights" and latest.parent.name == second
    assert ("GET", f"/{REPO}/resolve/{first.revision}/model.safetensors") in stand_in.requests


def test_file_other_than_the_pinned_sha256_is_refused(stand_in: HubStandIn, hub_cache: Path, payload: bytes) -> None:
    wrong = hashlib.sha256(b"another file").hexdigest()
    file = hub_file(stand_in, payload, sha256=wrong)
    with pytest.raises(WeightsUnavailableError) as info:
        hub.fetch(file, progress=False)
    message = str(info.value)
    assert f"the pinned SHA-256 is {wrong}, the file's {hashlib.sha256(payload).hexdigest()}" in message
    assert f"could not get model.safetensors of {REPO} at revision {file.revision}" in message


def test_corrupt_transfer_is_refused_against_the_hubs_lfs_id(stand_in: HubStandIn, hub_cache: Path,
                                                             payload: bytes) -> None:
    """Same size, other bytes: huggingface_hub's size check passes; the SHA-256 the Hub gives for the file (the
    X-Linked-Etag, the name of the blob in the cache) does not, even with no SHA-256 pinned here."""
    file = hub_file(stand_in, payload, sha256=None)
    stand_in.served[(REPO, file.revision, "model.safetensors")] = payload[::-1]
    with pytest.raises(WeightsUnavailableError, match="the Hub lists its SHA-256 \\(Git LFS id\\) as "
                                                      f"{hashlib.sha256(payload).hexdigest()}") as info:
        hub.fetch(file, progress=False)
    assert "delete" in str(info.value)


def test_small_file_is_checked_against_its_git_blob_id(stand_in: HubStandIn, hub_cache: Path) -> None:
    commit = stand_in.publish("org/name", {"config.json": b'{"a": 1}'})
    stand_in.served[("org/name", commit, "config.json")] = b'{"a": 2}'
    with pytest.raises(WeightsUnavailableError, match="the Hub lists its Git blob id as"):
        hub.hub_download("org/name", "config.json", endpoint=stand_in.base_url, progress=False)


def test_offline_error_names_repository_file_revision_and_where_to_put_it(
        hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    mirror = WeightFile("xception65p_ra3-3c6114e4.pth", (dead_url,), None, None, "3c6114e4")
    revision = "0123456789abcdef0123456789abcdef01234567"
    file = hub.HubFile(REPO, revision=revision, mirrors=(mirror,), endpoint=dead_url.rsplit("/", 1)[0])
    with pytest.raises(WeightsUnavailableError) as info:
        hub.fetch(file, directory=tmp_path / "torch", progress=False)
    message = str(info.value)
    for needle in (REPO, "model.safetensors", revision, f"hf download {REPO} model.safetensors --revision {revision}",
                   str(hub_cache), "OfflineModeIsEnabled", dead_url, str(tmp_path / "torch" / mirror.filename),
                   "SHA-256 starting 3c6114e4", "weights=<path>"):
        assert needle in message, needle


@pytest.mark.parametrize("hub_state", ["offline", "repository_missing"])
def test_mirror_covers_for_the_hub(hub_state: str, stand_in: HubStandIn, server: Server, payload: bytes,
                                   hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (HF_HUB_OFFLINE), or the Hub without the file: the pinned mirror, into torch's cache. (A refused
    connection goes the same way, after huggingface_hub's retries with backoff, about 20 s: not run here.)"""
    from huggingface_hub import constants

    if hub_state == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sha256 = hashlib.sha256(payload).hexdigest()
    mirror = WeightFile(f"w-{sha256[:8]}.pth", (server.publish("w.pth", payload),), None, None, sha256[:8])
    file = hub.HubFile(REPO, revision="0" * 40, mirrors=(mirror,), endpoint=stand_in.base_url)
    path = hub.fetch(file, directory=tmp_path / "torch", progress=False)
    assert path == tmp_path / "torch" / mirror.filename and path.read_bytes() == payload
    assert len(stand_in.requests) == (0 if hub_state == "offline" else 1)  # a missing repository is not retried


def test_branch_revision_takes_the_pinned_mirror_first(stand_in: HubStandIn, server: Server, payload: bytes,
                                                      hub_cache: Path, tmp_path: Path) -> None:
    """A branch pins nothing, a mirror's SHA-256 prefix does: the Hub is then the fallback."""
    sha256 = hashlib.sha256(payload).hexdigest()
    mirror = WeightFile(f"w-{sha256[:8]}.pth", (server.publish("w.pth", payload),), None, None, sha256[:8])
    file = hub_file(stand_in, b"hub copy", revision="main", sha256=None, mirrors=(mirror,))
    assert hub.fetch(file, directory=tmp_path / "torch", progress=False).read_bytes() == payload
    assert stand_in.requests == []
    broken = dataclasses.replace(file, mirrors=(dataclasses.replace(mirror, urls=(f"{server.base_url}/gone.pth",)),))
    assert hub.fetch(broken, directory=tmp_path / "elsewhere", progress=False).read_bytes() == b"hub copy"


@pytest.mark.parametrize(("text", "expected"), [
    ("hf-hub:org/name", hub.HubRepo("org/name")),
    ("hf-hub:org/name@v1.0", hub.HubRepo("org/name", "v1.0")),
    ("hf-hub:name@" + "a" * 40, hub.HubRepo("name", "a" * 40)),
    ("imagenet", None),
    ("runs/xception", None),
])
def test_parse_hub_spec(text: str, expected: hub.HubRepo | None) -> None:
    assert hub.parse_hub_spec(text) == expected
    if expected is not None:
        assert hub.parse_hub_spec(str(expected)) == expected


@pytest.mark.parametrize("text", ["hf-hub:", "hf-hub:org/name@", "hf-hub:a/b/c", "hf-hub:org/na me"])
def test_malformed_hub_spec_says_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="hf-hub:org/name"):
        hub.parse_hub_spec(text)


def test_hub_file_rejects_declaration_typos() -> None:
    with pytest.raises(ValueError, match="sha256"):
        hub.HubFile(REPO, sha256="ABC")
    with pytest.raises(ValueError, match="revision"):
        hub.HubFile(REPO, revision="")
