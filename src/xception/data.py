"""Training data: Fashion-MNIST and image folders, a resumable sampler, per-sample seeded augmentation.

Two properties drive the design. Runs must be reproducible and resumable: the sampler's order is a function of
(seed, epoch) alone and can start mid-epoch, and every sample's augmentation is seeded from (seed, epoch, index), so
neither the number of DataLoader workers nor an interruption changes what the model sees. And a long run must not
die on data: everything that can be checked up front (missing folders, empty classes, mismatched class lists) fails
at construction with a message naming the problem, while a single undecodable file is logged and skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# The decoder lives with the evaluation transforms of registered weights, which use it too; imported here for
# the datasets, and so that ``xception.data.open_image`` keeps working.
from .transforms import ImageError, decode_image, open_image

logger = logging.getLogger("xception.data")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
PROBE_FILES_PER_CLASS = 3  # how many files per class from_folder opens to decide in_chans

_IDX_UBYTE = 0x08
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_TRAIN_STYLES = ("inception", "compact")

ImageInput = Image.Image | torch.Tensor
Transform = Callable[[ImageInput], torch.Tensor]


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
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'missing'}; "
                         f"expected 00000801 for labels or 00000803 for images)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX data type 0x{dtype_code:02x} is not supported; only unsigned bytes (0x08) are")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, a {ndim}-d header needs {header_bytes})")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_bytes + math.prod(shape)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {problem}: header shape {tuple(shape)} needs {expected} bytes, "
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
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FASHION_MNIST_PREFIX)}, got {split!r}")
    directories = [*([Path(root)] if root is not None else []), FASHION_MNIST_DIR, fashion_mnist_cache_dir()]
    files = next((found for d in directories if (found := _fashion_mnist_files(d, split)) is not None), None)
    if files is None:
        files = _fashion_mnist_files(fetch_fashion_mnist(), split)
        if files is None:
            raise FileNotFoundError(f"the Fashion-MNIST download finished but the {split} files are not in "
                                    f"{fashion_mnist_cache_dir()}")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: expected images (N, 28, 28) and labels (N,), got "
                         f"{tuple(images.shape)} in {files[0]} and {tuple(labels.shape)} in {files[1]}")
    return images, labels.long()


# --------------------------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class SampleKey:
    """One sample of one epoch: the epoch is part of the key so that augmentation can be seeded from it."""

    epoch: int
    index: int


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, without the collisions of ``seed + epoch`` style arithmetic."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class ResumableSampler(Sampler[SampleKey]):
    """Deterministic order for (seed, epoch); shards across ranks like DistributedSampler (pad by wrapping so every
    rank gets the same count); start(position) skips the first ``position`` samples of this rank's epoch order, so a
    run resumed mid-epoch sees exactly the samples the interrupted run would have seen next.

    Rank ``r`` takes chunks r, r + world_size, ... of ``chunk`` consecutive positions of the (padded or
    truncated) epoch order, so the ranks' shards are disjoint apart from the wrapped padding. With ``chunk`` equal
    to the per-rank batch size, the ranks' batches of one step together are exactly the global batch that one
    process with gradient accumulation over ``world_size`` micro-batches would see, batch norm included.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, chunk: int = 1) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and num_samples < world_size:
            raise ValueError(f"drop_last with {num_samples} samples and world_size {world_size} leaves every rank "
                             f"with nothing")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.chunk = chunk
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_rank(self) -> int:
        """Samples of a whole epoch on each rank (every rank gets the same number)."""
        unit = self.world_size * self.chunk
        if self.drop_last:
            return self.num_samples // unit * self.chunk
        return -(-self.num_samples // unit) * self.chunk

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; starts from its beginning (a resume calls set_start afterwards)."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, position: int) -> None:
        """Skip the first ``position`` samples of this rank's order for the current epoch."""
        if not 0 <= position <= self.samples_per_rank:
            raise ValueError(f"start position must be in 0..{self.samples_per_rank}, got {position}")
        self.start = position

    def epoch_order(self) -> list[int]:
        """Every dataset index this rank visits in the current epoch, in order, ignoring the start position."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.samples_per_rank * self.world_size
        while len(order) < total:  # wrap around, as often as needed when there are fewer samples than ranks
            order += order[: total - len(order)]
        chunks = [order[i: i + self.chunk] for i in range(self.rank * self.chunk, total, self.world_size * self.chunk)]
        return [index for chunk in chunks for index in chunk]

    def __iter__(self) -> Iterator[SampleKey]:
        for index in self.epoch_order()[self.start:]:
            yield SampleKey(self.epoch, index)

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


# --------------------------------------------------------------------------------------------------- datasets

class _ImageSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[ImageInput, int] | None: ...


@dataclass(frozen=True)
class _TensorImages:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[ImageInput, int]:
        return self.images[index], int(self.labels[index])


@dataclass(frozen=True)
class _ImageFiles:
    files: tuple[tuple[Path, int], ...]
    mode: str

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[ImageInput, int] | None:
        path, label = self.files[index]
        try:
            return open_image(path, self.mode), label
        except (ImageError, OSError) as err:
            logger.warning("skipping unreadable image %s: %s", path, err)
            return None


@contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` for one sample, then put back what was there.

    Restoring matters with num_workers=0, where the caller's random stream (dropout, its own shuffling) would
    otherwise depend on which samples were loaded. Only the CPU generator is touched: torch.manual_seed would also
    reseed CUDA.
    """
    torch_state, python_state = torch.default_generator.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(python_state)


class ImageDataset(Dataset):
    """Labelled images indexed by SampleKey, augmented reproducibly.

    Each sample's augmentation is seeded from (seed, epoch, index), so results do not depend on the worker count or
    on resuming. Build one with ``in_memory`` (tensors, e.g. Fashion-MNIST) or ``from_folder`` (an ImageNet-style
    tree). ``transform`` is a plain attribute: a folder's ``in_chans`` is known only once it has been probed, so a
    caller may construct with ``transform=None`` and assign ``train_transform(size, dataset.in_chans, style)`` later.
    """

    def __init__(self, source: _ImageSource, transform: Transform | None, classes: Sequence[str], in_chans: int,
                 seed: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.classes = list(classes)
        self.in_chans = in_chans
        self.seed = seed

    @classmethod
    def in_memory(cls, images: torch.Tensor, labels: torch.Tensor | Sequence[int], transform: Transform | None,
                  classes: Sequence[str], seed: int = 0) -> ImageDataset:
        """uint8 images (N, H, W) (grayscale) or (N, C, H, W) with integer labels in 0..len(classes)-1."""
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be a uint8 tensor (N, H, W) or (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"labels must lie in 0..{len(classes) - 1} for {len(classes)} classes, found "
                             f"{int(labels.min())}..{int(labels.max())}")
        return cls(_TensorImages(images, labels), transform, classes, in_chans=images.shape[1], seed=seed)

    @classmethod
    def from_folder(cls, root: Path, split: str, transform: Transform | None, seed: int = 0,
                    classes: Sequence[str] | None = None) -> ImageDataset:
        """Images under ``root/split/<class>/`` (the ImageNet layout), found and checked before any training.

        Classes are the sorted class-folder names, or ``classes`` in the order given (to keep a trained model's
        label indices), which must name exactly the folders present. Files are found recursively by extension
        (jpg jpeg png bmp gif tif tiff webp, any case); hidden files and folders are ignored.

        ``in_chans`` is 1 when every probed file (the first PROBE_FILES_PER_CLASS per class; only headers are read)
        is stored as grayscale, otherwise 3: a colour-mode file with gray pixels counts as colour, and files that
        cannot be opened are left out of the vote (3 when none can).
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
        split_dir = root / split
        if not split_dir.is_dir():
            available = ", ".join(_visible_subfolders(root)) or "none"
            raise FileNotFoundError(f"no split folder {split!r} in {root} (available splits: {available})")
        found = _visible_subfolders(split_dir)
        if not found:
            raise ValueError(f"split folder {split_dir} has no class folders; expected {split_dir}/<class>/<images>")
        if classes is None:
            classes = found
        elif sorted(classes) != found:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            duplicated = sorted({name for name in classes if list(classes).count(name) > 1})
            raise ValueError(f"classes given do not match the class folders in {split_dir}: "
                             f"no folder for {missing}, folders not in classes {extra}, repeated {duplicated}")
        per_class = {name: _image_files(split_dir / name) for name in classes}
        empty = [name for name, paths in per_class.items() if not paths]
        if len(empty) == len(classes):
            raise ValueError(f"split {split_dir} contains no image files (extensions: "
                             f"{' '.join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))})")
        if empty:
            raise ValueError(f"class folders without image files in {split_dir}: {', '.join(empty)}")
        probed = [_stored_as_grayscale(path) for paths in per_class.values() for path in paths[:PROBE_FILES_PER_CLASS]]
        opened = [grayscale for grayscale in probed if grayscale is not None]
        in_chans = 1 if opened and all(opened) else 3
        files = tuple((path, label) for label, name in enumerate(classes) for path in per_class[name])
        return cls(_ImageFiles(files, "L" if in_chans == 1 else "RGB"), transform, classes, in_chans, seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int] | None:
        """The augmented sample, or None when its file cannot be decoded (logged; a bad file never stops a run)."""
        if self.transform is None:
            raise RuntimeError("ImageDataset.transform is not set")
        loaded = self.source.load(key.index)
        if loaded is None:
            return None
        image, label = loaded
        with _seeded_rngs(derive_seed(self.seed, key.epoch, key.index)):
            return self.transform(image), label


def _visible_subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _stored_as_grayscale(path: Path) -> bool | None:
    """Whether the file's header declares a grayscale mode; None when it cannot be opened (it is skipped later)."""
    try:
        with Image.open(path) as image:
            return image.mode in _GRAYSCALE_MODES
    except Exception:
        return None


def collate_skipping(batch: Sequence[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DataLoader collate_fn that drops undecodable (None) samples: (images, labels, number skipped).

    When every sample was dropped the images and labels are empty float32 / int64 tensors, so the caller can skip
    the step by checking ``len(labels) == 0``.
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int64), skipped
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, skipped


# --------------------------------------------------------------------------------------------------- transforms
# The steps below that run on every sample of small data are plain functional calls on uint8 tensors: a 28x28 image
# costs a few microseconds per step that way, against tens for the generic v2 transform classes.

@dataclass(frozen=True)
class _ToImageTensor:
    """PIL image or uint8 (H, W) / (C, H, W) tensor -> uint8 (in_chans, H, W) tensor; tensors skip PIL entirely."""

    in_chans: int

    def __call__(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return TF.pil_to_tensor(decode_image(image, "L" if self.in_chans == 1 else "RGB"))
        if image.dtype != torch.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 tensor (H, W) or (C, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.ndim == 2:
            image = image.unsqueeze(0)
        channels = image.shape[0]
        if channels == self.in_chans:
            return image
        if channels == 1 and self.in_chans == 3:
            return image.expand(3, -1, -1)
        if channels == 3 and self.in_chans == 1:
            return TF.rgb_to_grayscale(image)
        raise ValueError(f"cannot turn a {channels}-channel image into {self.in_chans} channels")


@dataclass(frozen=True)
class _ResizeCrop:
    """Resize (an int: the shorter side; a pair: exact height and width), then centre-crop to ``crop`` if given.

    Both steps return their input untouched when it already has the size asked for.
    """

    resize: int | tuple[int, int]
    crop: int | None = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if isinstance(self.resize, int):
            resized = min(height, width) == self.resize
            size = [self.resize]
        else:
            resized = (height, width) == tuple(self.resize)
            size = list(self.resize)
        if not resized:  # already the size asked for: the common case of small images, kept cheap
            image = TF.resize(image, size, antialias=True)
        if self.crop is None or image.shape[-2:] == (self.crop, self.crop):
            return image
        return TF.center_crop(image, [self.crop])


@dataclass(frozen=True)
class _PadCropFlip:
    """Zero-pad by ``padding``, crop back to the original size at a random offset, flip left-right half the time."""

    padding: int = 4

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = torch.nn.functional.pad(image, [self.padding] * 4)[..., top: top + height, left: left + width]
        return image.flip(-1) if torch.rand(()) < 0.5 else image


@dataclass(frozen=True)
class _Normalize:
    """uint8 0..255 -> float32 -1..1, exactly (mean = std = 0.5 after scaling to 0..1)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).div_(127.5).sub_(1.0)


def _check_channels(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


def train_transform(img_size: int, in_chans: int, style: str, *, erasing: float = 0.0) -> Transform:
    """Training augmentation: PIL image or uint8 tensor -> float (in_chans, img_size, img_size) in [-1, 1].

    "inception": RandomResizedCrop (scale 0.08-1), horizontal flip and, for RGB, mild colour jitter; the recipe
    for photographs at ImageNet scale. "compact": for small images such as Fashion-MNIST or CIFAR, where a random
    resized crop destroys too much: resize to img_size if needed, pad by 4 and crop back at random, flip.
    ``erasing`` is the probability of random erasing (after normalisation, erased to 0); off by default.
    """
    _check_channels(in_chans)
    if style == "inception":
        steps: list[Callable] = [_ToImageTensor(in_chans),
                                 v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), antialias=True),
                                 v2.RandomHorizontalFlip()]
        if in_chans == 3:
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    elif style == "compact":
        steps = [_ToImageTensor(in_chans), _ResizeCrop(img_size, img_size), _PadCropFlip(padding=4)]
    else:
        raise ValueError(f"style must be one of {', '.join(_TRAIN_STYLES)}, got {style!r}")
    steps.append(_Normalize())
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, value=0))
    return v2.Compose(steps)


def eval_transform(img_size: int, in_chans: int, resize_ratio: float = 1.0) -> Transform:
    """Deterministic evaluation preprocessing: PIL image or uint8 tensor -> float (in_chans, img_size, img_size).

    The evaluation transform of models trained here, from their recipe; registered pretrained weights have their own,
    ``Weights.transforms()``. PIL images go through the same decoder (:func:`~xception.transforms.decode_image`).

    Resizes the shorter side to round(img_size * resize_ratio) and centre-crops img_size. The default ratio 1.0 is a
    plain resize to img_size x img_size (a non-square image is squeezed, not cropped; a 28x28 image at img_size 28 is
    left untouched). Output in [-1, 1].
    """
    _check_channels(in_chans)
    if resize_ratio < 1.0:
        raise ValueError(f"resize_ratio must be >= 1.0 (the crop has to fit), got {resize_ratio}")
    if resize_ratio == 1.0:
        resize = _ResizeCrop((img_size, img_size))
    else:
        resize = _ResizeCrop(round(img_size * resize_ratio), img_size)
    return v2.Compose([_ToImageTensor(in_chans), resize, _Normalize()])
