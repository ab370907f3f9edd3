"""Training data: Fashion-MNIST and image folders, a resumable sampler, per-sample seeded augmentation.

Two properties drive the design. Runs must be reproducible and resumable: the sampler's order is a function of
(seed, epoch) alone and can start mid-epoch, and every sample's augmentation is seeded from (seed, epoch, index), so
neither the number of DataLoader workers nor an interruption changes what the model sees. And a long run must not
die on data: everything that can be checked up front (missing folders, empty classes, mismatched class lists) fails
at construction with a message naming the problem, while a single undecodable file is logged and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..errors import InvalidArgumentError
from .transforms import ImageError, ImageInput, Transform, open_image

logger = logging.getLogger("xception.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
PROBE_FILES_PER_CLASS = 3  # how many files per class from_folder opens to decide in_chans

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


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
            raise InvalidArgumentError(f"num_samples must be positive, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidArgumentError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and num_samples < world_size:
            raise InvalidArgumentError(f"drop_last with {num_samples} samples and world_size {world_size} leaves "
                                       f"every rank with nothing")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        if chunk < 1:
            raise InvalidArgumentError(f"chunk must be positive, got {chunk}")
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
            raise InvalidArgumentError(f"start position must be in 0..{self.samples_per_rank}, got {position}")
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

    def label_list(self) -> list[int]:
        return self.labels.tolist()

    def select(self, indices: list[int], labels: list[int]) -> _TensorImages:
        return _TensorImages(self.images[indices], torch.tensor(labels, dtype=torch.int64))


@dataclass(frozen=True)
class _ImageFiles:
    files: tuple[tuple[Path, int], ...]
    mode: str

    def __len__(self) -> int:
        return len(self.files)

    def label_list(self) -> list[int]:
        return [label for _, label in self.files]

    def select(self, indices: list[int], labels: list[int]) -> _ImageFiles:
        return _ImageFiles(tuple((self.files[i][0], label) for i, label in zip(indices, labels, strict=True)),
                           self.mode)

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
            raise InvalidArgumentError(f"images must be a uint8 tensor (N, H, W) or (N, C, H, W), got {images.dtype} "
                                       f"{tuple(images.shape)}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(images),):
            raise InvalidArgumentError(f"need one label per image: {len(images)} images, labels of shape "
                                       f"{tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise InvalidArgumentError(f"labels must lie in 0..{len(classes) - 1} for {len(classes)} classes, found "
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
            raise InvalidArgumentError(f"split folder {split_dir} has no class folders; expected "
                                       f"{split_dir}/<class>/<images>")
        if classes is None:
            classes = found
        elif sorted(classes) != found:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            duplicated = sorted({name for name in classes if list(classes).count(name) > 1})
            raise InvalidArgumentError(f"classes given do not match the class folders in {split_dir}: "
                                       f"no folder for {missing}, folders not in classes {extra}, "
                                       f"repeated {duplicated}")
        per_class = {name: _image_files(split_dir / name) for name in classes}
        empty = [name for name, paths in per_class.items() if not paths]
        if len(empty) == len(classes):
            raise InvalidArgumentError(f"split {split_dir} contains no image files (extensions: "
                                       f"{' '.join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))})")
        if empty:
            raise InvalidArgumentError(f"class folders without image files in {split_dir}: {', '.join(empty)}")
        probed = [_stored_as_grayscale(path) for paths in per_class.values() for path in paths[:PROBE_FILES_PER_CLASS]]
        opened = [grayscale for grayscale in probed if grayscale is not None]
        in_chans = 1 if opened and all(opened) else 3
        files = tuple((path, label) for label, name in enumerate(classes) for path in per_class[name])
        return cls(_ImageFiles(files, "L" if in_chans == 1 else "RGB"), transform, classes, in_chans, seed)

    def subset(self, classes: Sequence[str | int] | None = None, per_class: int | None = None) -> ImageDataset:
        """These classes only (names or indices, in the order given; labels renumbered from 0, names kept), and at
        most the first ``per_class`` samples of each: for small and partial sets."""
        chosen = (list(range(len(self.classes))) if classes is None
                  else [resolve_class(name, self.classes, owner="the data") for name in classes])
        if len(set(chosen)) != len(chosen):
            raise InvalidArgumentError(f"classes repeated in {list(classes)}")
        new_label = {old: new for new, old in enumerate(chosen)}
        taken = dict.fromkeys(chosen, 0)
        indices, labels = [], []
        for index, label in enumerate(self.source.label_list()):
            if label in new_label and (per_class is None or taken[label] < per_class):
                taken[label] += 1
                indices.append(index)
                labels.append(new_label[label])
        missing = [self.classes[label] for label, count in taken.items() if count == 0]
        if missing:
            raise InvalidArgumentError(f"no samples of the classes {missing} in this split")
        return ImageDataset(self.source.select(indices, labels), self.transform, [self.classes[c] for c in chosen],
                            self.in_chans, self.seed)

    def spread(self, count: int) -> ImageDataset:
        """At most ``count`` samples, evenly spaced over the set (a folder lists its images class by class, so the
        first ``count`` would be one class): a quick check on a large split."""
        if count >= len(self):
            return self
        indices = torch.linspace(0, len(self) - 1, count).round().long().tolist()
        labels = self.source.label_list()
        return ImageDataset(self.source.select(indices, [labels[i] for i in indices]), self.transform, self.classes,
                            self.in_chans, self.seed)

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


def resolve_class(target: int | str, classes: Sequence[str], owner: str = "the model") -> int:
    """A class given by name or by index (a name wins where a name is also a number) as its index in ``classes``,
    whose ``owner`` the error messages name."""
    if isinstance(target, str):
        if target in classes:
            return list(classes).index(target)
        if not re.fullmatch(r"-?\d+", target.strip()):
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise InvalidArgumentError(f"unknown class {target!r}: {owner}'s classes are {shown} "
                                       f"(or an index 0..{len(classes) - 1})")
        target = int(target)
    if isinstance(target, bool) or not 0 <= target < len(classes):
        raise InvalidArgumentError(f"class index {target} is out of range: {owner} has {len(classes)} classes "
                                   f"(0..{len(classes) - 1})")
    return target


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


def readable_samples(dataset: Any, indices: Iterable[int]) -> list[Any]:
    """The samples of ``dataset`` at ``indices`` that could be read (a dataset returns None for a corrupt file)."""
    samples = (dataset[SampleKey(0, index)] for index in indices)
    return [sample for sample in samples if sample is not None]


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


