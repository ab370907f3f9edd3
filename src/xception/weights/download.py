"""Download pretrained weight files once, check them and keep them in a cache.

Weights come from third-party hosts that move, go down or are unreachable from the machine at hand, and a
truncated or swapped checkpoint can load without complaint into a model that then gives wrong answers. So every
file is pinned in advance, and when nothing works the error says what to fetch and where to put it.

- Files on plain URLs (:class:`WeightFile`: the Keras files, timm's GitHub releases) are pinned by size and MD5
  or SHA-256 (or the SHA-256 prefix a publisher put in the name), downloaded into torch's cache through a
  temporary file that is renamed into place only once it checks out.
- Files on the Hugging Face Hub (:class:`HubFile`, and ``hf-hub:org/name[@revision]`` repositories) are
  downloaded by ``huggingface_hub`` into its own cache, the one timm and transformers share, at a pinned revision.
  ``huggingface_hub`` checks the size; :func:`hub_download` then checks the content against the SHA-256 pinned in
  the registry where one is published, and always against the Hub's own id for the file (the SHA-256 of a Git
  LFS file, the Git blob SHA-1 of a small one), which the cache names the file by.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import InvalidArgumentError, XceptionError
from ..files import atomic_path

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0
HUB_PREFIX = "hf-hub:"
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WeightFile:
    """A downloadable file pinned by checksum (and size, where published), so that no mirror can serve something
    else."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None
    num_bytes: int | None  # None: no size is published (a release file pinned by the SHA-256 prefix in its name)
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
        size = "" if self.num_bytes is None else f"size {self.num_bytes} bytes, "
        return size + " and ".join(pins)


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub model repository, fetched by ``huggingface_hub`` at a pinned ``revision``.

    ``revision`` is a commit where one is known (a branch moves; a commit names the exact files), ``sha256`` the
    file's published SHA-256 where one is known; each is checked. ``mirrors`` are the same weights elsewhere
    (another file, pinned on its own), tried in order when the Hub cannot be reached or serves something else.
    ``endpoint`` None is ``huggingface_hub``'s (``HF_ENDPOINT``, default https://huggingface.co).
    """

    repo: str  # "timm/xception65p.ra3_in1k"
    path: str = "model.safetensors"
    revision: str = "main"
    sha256: str | None = None
    mirrors: tuple[WeightFile, ...] = ()
    endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None and not SHA256.fullmatch(self.sha256):
            raise InvalidArgumentError(f"{self.repo}/{self.path}: sha256 must be 64 lowercase hex digits, "
                                       f"got {self.sha256!r}")
        if not self.revision:
            raise InvalidArgumentError(f"{self.repo}/{self.path}: give a revision (a commit, a tag or a branch)")

    @property
    def filename(self) -> str:
        return self.path

    @property
    def url(self) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, self.path, revision=self.revision, endpoint=hub_endpoint(self.endpoint))

    def pin(self) -> str:
        pins = [f"revision {self.revision}" + ("" if COMMIT.fullmatch(self.revision) else " (a branch: not pinned)")]
        if self.sha256 is not None:
            pins.append(f"SHA-256 {self.sha256}")
        return " and ".join(pins)


@dataclass(frozen=True)
class HubRepo:
    """A model repository on the Hub named as ``hf-hub:org/name[@revision]`` (the form timm and open_clip use)."""

    repo: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo}" + ("" if self.revision == "main" else f"@{self.revision}")


class WeightsUnavailableError(XceptionError, RuntimeError):
    """The weights cannot be had: offline, every URL failed, or a file is not the one expected.

    One exception type for all of these, because the remedy is the same: put the right file in place by hand.
    """


def parse_hub_spec(text: str | os.PathLike[str]) -> HubRepo | None:
    """``"hf-hub:org/name@revision"`` -> HubRepo; None for anything not starting with ``hf-hub:`` (a name or a
    path). A malformed repository id is an error that says what the form is."""
    if not isinstance(text, str) or not text.startswith(HUB_PREFIX):
        return None
    repo, _, revision = text[len(HUB_PREFIX):].partition("@")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise InvalidArgumentError(f"{text!r} is not a Hub repository: write hf-hub:org/name or "
                                   f"hf-hub:org/name@revision ({error})") from None
    if "@" in text and not revision:
        raise InvalidArgumentError(f"{text!r} ends with '@' but names no revision (a commit, a tag or a branch)")
    return HubRepo(repo, revision or "main")


def cache_dir() -> Path:
    """Where files from plain URLs are cached: torch hub's ``checkpoints``, as torchvision and timm use, so that
    ``TORCH_HOME`` or ``torch.hub.set_dir`` moves them all together."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_endpoint(endpoint: str | None = None) -> str | None:
    """``endpoint``, else ``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, when it is imported), else
    None: huggingface_hub's default."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def hub_cache_dir() -> Path:
    """``huggingface_hub``'s cache (``HF_HUB_CACHE``, ``HF_HOME``), which timm and transformers use too."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


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


def git_blob_sha1(path: Path) -> str:
    """The id Git (and so the Hub, as the ETag of a file not in LFS) gives a file: SHA-1 of a header and the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, file: WeightFile) -> None:
    """Refuse anything but the exact expected file, because a truncated or swapped checkpoint may load silently.

    The size is compared first: it costs nothing and catches truncated downloads. The file is never deleted,
    since it may be the user's own copy.
    """
    size = path.stat().st_size
    if file.num_bytes is not None and size != file.num_bytes:
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
    """Path to a verified copy of ``file``, downloaded on first use: a :class:`WeightFile` into ``directory``
    (default :func:`cache_dir`), a :class:`HubFile` into the Hub's cache (its mirrors into ``directory``).

    Sources are tried in order so that mirrors cover for a dead primary; the error when all fail says why each one
    failed and how to place the file by hand, which is the usual way on machines without internet.
    """
    directory = Path(directory if directory is not None else cache_dir())
    if isinstance(file, HubFile):
        return fetch_hub_file(file, directory=directory, progress=progress)
    target, failures = try_urls(file, directory, progress)
    if not failures:
        return target
    mirrors = f" (or {', or '.join(file.urls[1:])})" if len(file.urls) > 1 else ""
    raise WeightsUnavailableError(
        f"could not download {file.filename}; every URL failed:\n" + "\n".join(failures) + "\n"
        f"Download {file.filename} from {file.urls[0]}{mirrors} and put it at {target}; "
        f"expected {file.pin()}. Or pass the path of a local copy as weights=<path>."
    )


def try_urls(file: WeightFile, directory: Path, progress: bool) -> tuple[Path, list[str]]:
    """The cached (verified) or downloaded copy of ``file`` in ``directory``, and why each URL failed (empty when
    the file is there)."""
    target = directory / file.filename
    if target.exists():
        verify_file(target, file)
        return target, []
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in file.urls:
        try:
            _download(url, target, file, progress)
            return target, []
        except (OSError, ValueError, http.client.HTTPException, WeightsUnavailableError) as error:
            failures.append(f"  {url}: {_reason(error)}")
    return target, failures


def fetch_hub_file(file: HubFile, *, directory: Path, progress: bool = True) -> Path:
    """The Hub first where its revision is a commit: its copy is then pinned by commit (and SHA-256 where
    published), is safetensors (no pickle) and lands in the cache timm shares. Its mirrors (in torch's cache) come
    after it, or before it when the Hub's revision is a branch, which pins nothing, and a mirror is pinned."""
    failures: list[str] = []

    def from_hub() -> Path | None:
        try:
            return hub_download(file.repo, file.path, revision=file.revision, sha256=file.sha256,
                                endpoint=file.endpoint, progress=progress)
        except WeightsUnavailableError as error:
            failures.append(f"  the Hub, {file.url}: {error}")
            return None

    def from_mirrors() -> Path | None:
        for mirror in file.mirrors:
            target, mirror_failures = try_urls(mirror, directory, progress)
            if not mirror_failures:
                return target
            failures.extend(mirror_failures)
        return None

    order = (from_hub, from_mirrors) if COMMIT.fullmatch(file.revision) or not file.mirrors else (from_mirrors,
                                                                                                 from_hub)
    for source in order:
        if (path := source()) is not None:
            return path
    places = [f"with `hf download {file.repo} {file.path} --revision {file.revision}` on a machine with network "
              f"access, then copy its cache to this machine's ({hub_cache_dir()}; or set HF_HUB_CACHE)"]
    places += [f"download {mirror.urls[0]} and put it at {directory / mirror.filename} ({mirror.pin()})"
               for mirror in file.mirrors]
    raise WeightsUnavailableError(
        f"could not get {file.path} of {file.repo} at revision {file.revision}:\n" + "\n".join(failures) + "\n"
        f"Fetch it {'; or '.join(places)}; or pass the path of a local copy as weights=<path>."
    )


class _NoProgress(tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def hub_download(repo: str, filename: str, *, revision: str = "main", sha256: str | None = None,
                 endpoint: str | None = None, progress: bool = True) -> Path:
    """``filename`` of the Hub model repository ``repo`` at ``revision``, from ``huggingface_hub``'s cache or
    downloaded into it, checked against ``sha256`` (when given) and against the Hub's own id of the file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from ..version import __version__

    try:
        path = Path(hf_hub_download(repo, filename, revision=revision, endpoint=hub_endpoint(endpoint),
                                    library_name="xception", library_version=__version__,
                                    tqdm_class=None if progress else _NoProgress))
    except (OSError, ValueError, EntryNotFoundError, *_transport_errors()) as error:
        raise WeightsUnavailableError(_hub_reason(error)) from error
    check_hub_file(path, sha256)
    return path


def hub_repo_file(repo: HubRepo, filename: str) -> Path:
    """``filename`` of an ``hf-hub:`` repository, or an error naming the repository, file and revision and how to
    put them in place by hand."""
    try:
        return hub_download(repo.repo, filename, revision=repo.revision)
    except WeightsUnavailableError as error:
        raise WeightsUnavailableError(
            f"could not get {filename} of {repo.repo} at revision {repo.revision} from the Hub: {error}\n"
            f"Fetch it with `hf download {repo.repo} {filename} --revision {repo.revision}` on a machine with network "
            f"access, then copy its cache to this machine's ({hub_cache_dir()}; or set HF_HUB_CACHE); or pass the "
            "path of a local copy instead: the file as weights=<path>, a save_pretrained folder to from_pretrained"
        ) from error


def check_hub_file(path: Path, sha256: str | None = None) -> None:
    """Refuse a file from the Hub's cache that is not ``sha256`` (when pinned) or not the file the Hub named: the
    cache stores each file under the Hub's id for it, the SHA-256 of a Git LFS file or the Git SHA-1 of a small
    one. The file is left where it is; the message says which one to delete."""
    blob = Path(os.path.realpath(path))
    hub_id = blob.name if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob.name) else None
    found_sha256 = digests(path)[1] if sha256 is not None or (hub_id and len(hub_id) == 64) else None
    if sha256 is not None and found_sha256 != sha256:
        problem = f"the pinned SHA-256 is {sha256}, the file's {found_sha256}"
    elif hub_id and len(hub_id) == 64 and found_sha256 != hub_id:
        problem = f"the Hub lists its SHA-256 (Git LFS id) as {hub_id}, the file's is {found_sha256}"
    elif hub_id and len(hub_id) == 40 and (found_sha1 := git_blob_sha1(path)) != hub_id:
        problem = f"the Hub lists its Git blob id as {hub_id}, the file's is {found_sha1}"
    else:
        return
    raise WeightsUnavailableError(f"{path} is not the file expected: {problem}. It was left in the cache; delete "
                                  f"{blob} (and {path}) to download it again")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's own errors, which ``huggingface_hub`` lets through on a broken download (httpx2 in
    huggingface_hub 2, httpx in 1, requests before)."""
    errors = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _hub_reason(error: BaseException) -> str:
    """One line on why the Hub failed: huggingface_hub's messages are long and say 'check your connection'; keep
    the first line and what caused it."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause).strip():
        first += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    return f"{type(error).__name__}: {first}"


def _download(url: str, target: Path, file: WeightFile, progress: bool) -> None:
    """Stream ``url`` into a ``.part`` file beside ``target``, hashing on the way, and rename it into place only if
    it is exactly ``file``: the rename is atomic, so a crash never leaves a broken file under the real name."""
    request = urllib.request.Request(url, headers={"User-Agent": "xception"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or file.num_bytes or 0) or None
        md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        with atomic_path(target, suffix=".part") as part, open(part, "wb") as out:
            with tqdm(total=total, unit="B", unit_scale=True, desc=file.filename, disable=not progress) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    size += len(chunk)
                    if file.num_bytes is not None and size > file.num_bytes:  # a wrong page must not fill the disk
                        raise WeightsUnavailableError(f"size mismatch: expected {file.num_bytes} bytes, got more")
                    out.write(chunk)
                    md5.update(chunk)
                    sha256.update(chunk)
                    bar.update(len(chunk))
            out.close()  # Windows cannot rename an open file.
            if file.num_bytes is not None and size != file.num_bytes:
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
