"""Download pretrained weight files once, check them and keep them in torch's cache.

Weights come from third-party hosts that move, go down or are unreachable from the machine at hand, and a
truncated or swapped checkpoint can load without complaint into a model that then gives wrong answers. So every
file is pinned by its exact size and MD5, downloads land in a temporary file beside their destination and are
renamed into place only once they check out, and when nothing works the error lists why each URL failed and how
to put the file in place by hand.

Files on the Hugging Face Hub (:class:`HubFile`) have no checksum published anywhere we could pin in advance, but
the hub publishes each large file's size and SHA-256 (its Git LFS object id) beside it. Those are read once,
before the download, recorded in the cache beside the file, and then pin the file like any other.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import InvalidArgumentError, XceptionError
from ..files import atomic_path, write_text_atomic

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WeightFile:
    """A downloadable file pinned by size and checksum, so that no mirror can serve something else."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None
    num_bytes: int
    # Where only a SHA-256 prefix is published (torch hub's file-name convention, e.g. "-e6439c97.pth").
    sha256_prefix: str | None = None

    def __post_init__(self) -> None:
        # Typos should fail where the file is declared, not as a "checksum mismatch" after a long download.
        if isinstance(self.urls, str) or not self.urls:
            raise InvalidArgumentError(f"{self.filename}: urls must be a non-empty tuple of URLs, got {self.urls!r}")
        if self.md5 is None and self.sha256_prefix is None:
            raise InvalidArgumentError(f"{self.filename}: give an md5 or a sha256_prefix; an unpinned file is not "
                                       f"accepted")
        if self.md5 is not None and not re.fullmatch(r"[0-9a-f]{32}", self.md5):
            raise InvalidArgumentError(f"{self.filename}: md5 must be 32 lowercase hex digits, got {self.md5!r}")
        if self.sha256_prefix is not None and not re.fullmatch(r"[0-9a-f]{8,64}", self.sha256_prefix):
            raise InvalidArgumentError(f"{self.filename}: sha256_prefix must be 8 to 64 lowercase hex digits, "
                                       f"got {self.sha256_prefix!r}")

    def checksum_problem(self, md5: str, sha256: str) -> str | None:
        """What is wrong with a file of these digests, or None when it is this file."""
        if self.md5 is not None and md5 != self.md5:
            return f"expected md5 {self.md5}, found {md5}"
        if self.sha256_prefix is not None and not sha256.startswith(self.sha256_prefix):
            return f"expected sha256 starting {self.sha256_prefix}, found {sha256}"
        return None

    def pin(self) -> str:
        pins = [f"MD5 {self.md5}"] if self.md5 is not None else []
        if self.sha256_prefix is not None:
            pins.append(f"SHA-256 {'' if len(self.sha256_prefix) == 64 else 'starting '}{self.sha256_prefix}")
        return " and ".join(pins)


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub model repository, pinned by the size and SHA-256 the hub publishes for it.

    The first :func:`fetch` reads them from the hub's file listing and records them in ``<filename>.pin.json``
    in the cache, so the download is checked against them and later uses need no network. A file put in the
    cache by hand without that record cannot be checked: load it with ``weights=<path>`` instead.
    """

    repo: str  # "timm/xception65p.ra3_in1k"
    path: str = "model.safetensors"
    revision: str = "main"
    endpoint: str = "https://huggingface.co"

    @property
    def filename(self) -> str:
        return f"{self.repo.replace('/', '--')}--{self.path.replace('/', '--')}"

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo}/resolve/{self.revision}/{self.path}"

    @property
    def listing_url(self) -> str:
        return f"{self.endpoint}/api/models/{self.repo}/tree/{self.revision}"

    def pinned(self, directory: Path) -> WeightFile:
        """The :class:`WeightFile` with the published size and SHA-256: from the record in ``directory`` if there
        is one, else from the hub (then recorded)."""
        record = directory / f"{self.filename}.pin.json"
        if not record.exists():
            published = self._published_pin()
            write_text_atomic(record, json.dumps(published, indent=2) + "\n")
        try:
            pin = json.loads(record.read_text())
            return WeightFile(self.filename, (self.url,), md5=None, num_bytes=pin["num_bytes"],
                              sha256_prefix=pin["sha256"])
        except (ValueError, KeyError, TypeError) as error:
            raise WeightsUnavailableError(f"{record} is not a readable record of {self.filename}'s size and SHA-256 "
                                          f"({error}); delete it to read them from the hub again") from error

    def _published_pin(self) -> dict[str, object]:
        try:
            request = urllib.request.Request(self.listing_url, headers={"User-Agent": "xception"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                listing = json.load(response)
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise WeightsUnavailableError(
                f"could not read the size and SHA-256 that the hub publishes for {self.repo}/{self.path} from "
                f"{self.listing_url}: {_reason(error)}. Download {self.url} yourself and pass its path as "
                "weights=<path> (the file is then checked against the model, not against a checksum)."
            ) from error
        entry = next((item for item in listing if isinstance(item, dict) and item.get("path") == self.path), None)
        lfs = (entry or {}).get("lfs") or {}
        sha256, num_bytes = lfs.get("oid"), lfs.get("size")
        if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256) and isinstance(num_bytes, int)):
            raise WeightsUnavailableError(
                f"the hub's listing {self.listing_url} publishes no SHA-256 and size for {self.path}, so the "
                "download could not be checked; download it yourself and pass its path as weights=<path>")
        return {"url": self.url, "sha256": sha256, "num_bytes": num_bytes}


class WeightsUnavailableError(XceptionError, RuntimeError):
    """The weights cannot be had: offline, every URL failed, or a file is not the one expected.

    One exception type for all of these, because the remedy is the same: put the right file in place by hand.
    """


def cache_dir() -> Path:
    """Where weights are cached: torch hub's ``checkpoints``, as torchvision and timm use, so that ``TORCH_HOME``
    or ``torch.hub.set_dir`` moves them all together."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks so that a large checkpoint never sits in memory whole."""
    return digests(path)[0]


def digests(path: Path) -> tuple[str, str]:
    """Hex MD5 and SHA-256 of a file, in one pass of 1 MiB chunks."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def verify_file(path: Path, file: WeightFile) -> None:
    """Refuse anything but the exact expected file, because a truncated or swapped checkpoint may load silently.

    The size is compared first: it costs nothing and catches truncated downloads. The file is never deleted,
    since it may be the user's own copy.
    """
    size = path.stat().st_size
    if size != file.num_bytes:
        problem = f"expected {file.num_bytes} bytes, found {size}"
    elif (found := file.checksum_problem(*digests(path))) is not None:
        problem = found
    else:
        return
    raise WeightsUnavailableError(
        f"{path} is not the expected {file.filename}: {problem}. It was left in place; delete or replace it, "
        f"then fetch it again from {file.urls[0]}"
    )


def fetch(file: WeightFile | HubFile, *, directory: Path | None = None, progress: bool = True) -> Path:
    """Path to a verified copy of ``file`` in ``directory`` (default :func:`cache_dir`), downloaded on first use.

    URLs are tried in order so that mirrors cover for a dead primary; the error when all fail says why each one
    failed and how to place the file by hand, which is the usual way on machines without internet.
    """
    directory = Path(directory if directory is not None else cache_dir())
    if isinstance(file, HubFile):
        file = file.pinned(directory)
    target = directory / file.filename
    if target.exists():
        verify_file(target, file)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in file.urls:
        try:
            _download(url, target, file, progress)
            return target
        except (OSError, ValueError, http.client.HTTPException, WeightsUnavailableError) as error:
            failures.append(f"  {url}: {_reason(error)}")
    mirrors = f" (or {', or '.join(file.urls[1:])})" if len(file.urls) > 1 else ""
    raise WeightsUnavailableError(
        f"could not download {file.filename}; every URL failed:\n" + "\n".join(failures) + "\n"
        f"Download {file.filename} from {file.urls[0]}{mirrors} and put it at {target}; "
        f"expected size {file.num_bytes} bytes, {file.pin()}. Or pass the path of a local copy as weights=<path>."
    )


def _download(url: str, target: Path, file: WeightFile, progress: bool) -> None:
    """Stream ``url`` into a ``.part`` file beside ``target``, hashing on the way, and rename it into place only if
    it is exactly ``file``: the rename is atomic, so a crash never leaves a broken file under the real name."""
    request = urllib.request.Request(url, headers={"User-Agent": "xception"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or file.num_bytes)
        md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        with atomic_path(target, suffix=".part") as part, open(part, "wb") as out:
            with tqdm(total=total, unit="B", unit_scale=True, desc=file.filename, disable=not progress) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > file.num_bytes:  # Do not let a wrong page or file fill the disk.
                        raise WeightsUnavailableError(f"size mismatch: expected {file.num_bytes} bytes, got more")
                    out.write(chunk)
                    md5.update(chunk)
                    sha256.update(chunk)
                    bar.update(len(chunk))
            out.close()  # Windows cannot rename an open file.
            if size != file.num_bytes:
                raise WeightsUnavailableError(f"size mismatch: expected {file.num_bytes} bytes, got {size}")
            if (problem := file.checksum_problem(md5.hexdigest(), sha256.hexdigest())) is not None:
                raise WeightsUnavailableError(f"checksum mismatch: {problem}")


def _reason(error: Exception) -> str:
    """One line on why a URL failed, short enough to list one per URL."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, Exception) else error
    if isinstance(error, WeightsUnavailableError):
        return str(error)
    return f"{type(error).__name__}: {error}"
