"""Fashion-MNIST: the IDX files from Debian's dataset-fashion-mnist package, or downloaded once with torchvision."""

from __future__ import annotations

import gzip
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torchvision

from ..errors import InvalidArgumentError

logger = logging.getLogger("xception.data")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_IDX_UBYTE = 0x08
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}


# --------------------------------------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (LeCun's MNIST format, gzip-compressed or raw) as a uint8 tensor of the shape in its header.

    Only unsigned-byte data is accepted, which covers MNIST-style labels (magic 0x0801) and images (0x0803). A file
    whose size disagrees with its header is refused rather than silently reshaped: a truncated download would
    otherwise become a smaller, plausible-looking dataset.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError) as err:
            raise InvalidArgumentError(f"{path}: corrupt or truncated gzip data ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise InvalidArgumentError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'missing'}; "
                                   f"expected 00000801 for labels or 00000803 for images)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise InvalidArgumentError(f"{path}: IDX data type 0x{dtype_code:02x} is not supported; only unsigned bytes "
                                   f"(0x08) are")
    if ndim == 0:
        raise InvalidArgumentError(f"{path}: IDX header declares zero dimensions")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise InvalidArgumentError(f"{path}: truncated IDX header ({len(raw)} bytes, a {ndim}-d header needs "
                                   f"{header_bytes})")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_bytes + math.prod(shape)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise InvalidArgumentError(f"{path}: IDX file {problem}: header shape {tuple(shape)} needs {expected} bytes, "
                                   f"found {len(raw)}")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)
    return torch.from_numpy(data.copy())


def fashion_mnist_cache_dir() -> Path:
    """Where torchvision's FashionMNIST(download=True) puts the files when rooted in torch's cache."""
    return Path(torch.hub.get_dir()) / "datasets" / "FashionMNIST" / "raw"


def _fashion_mnist_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) of a split in a directory, gzip-compressed or not; None when either is missing."""
    prefix = _FASHION_MNIST_PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [directory / f"{prefix}-{kind}-ubyte{suffix}" for suffix in (".gz", "")]
        existing = [candidate for candidate in candidates if candidate.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def fetch_fashion_mnist() -> Path:
    """Download Fashion-MNIST with torchvision into torch's cache and return the directory holding the files.

    The Debian package is the preferred source (no network at training time), so this is the last resort and says
    how to get the data another way when the download fails.
    """
    cache = fashion_mnist_cache_dir()
    try:
        torchvision.datasets.FashionMNIST(str(cache.parent.parent), train=True, download=True)
    except Exception as err:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed and downloading it failed ({type(err).__name__}: {err}). "
            f"install the Debian package: apt-get install dataset-fashion-mnist, or put the four files "
            f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist) into {cache}"
        ) from err
    return cache


def load_fashion_mnist(split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) as uint8 images (N, 28, 28) and int64 labels (N,).

    Looks in ``root`` (when given), then the Debian package's directory, then torchvision's download cache, and
    downloads only when none of them has the files.
    """
    if split not in _FASHION_MNIST_PREFIX:
        raise InvalidArgumentError(f"Fashion-MNIST split must be one of {sorted(_FASHION_MNIST_PREFIX)}, got {split!r}")
    directories = [*([Path(root)] if root is not None else []), FASHION_MNIST_DIR, fashion_mnist_cache_dir()]
    files = next((found for d in directories if (found := _fashion_mnist_files(d, split)) is not None), None)
    if files is None:
        files = _fashion_mnist_files(fetch_fashion_mnist(), split)
        if files is None:
            raise FileNotFoundError(f"the Fashion-MNIST download finished but the {split} files are not in "
                                    f"{fashion_mnist_cache_dir()}")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InvalidArgumentError(f"Fashion-MNIST {split}: expected images (N, 28, 28) and labels (N,), got "
                                   f"{tuple(images.shape)} in {files[0]} and {tuple(labels.shape)} in {files[1]}")
    return images, labels.long()


