"""Semantic segmentation data: the folder layout, its checks, joint image-and-mask augmentation, padded batches.

The layout (CamVid in ``../shared/datasets/camvid`` is in it)::

    classes.txt                 class names, one per line, in index order
    train/images/<stem>.jpg     images (any of the image extensions; decoded as RGB)
    train/labels/<stem>.png     8-bit label maps of the same size: one class index per pixel
    val/images, val/labels      the same for the validation split

A label pixel is a class index 0..N-1 (N lines in classes.txt) or the ignore index (255 by default: "void",
"unlabelled"), which the loss and the metrics skip.

Everything that can be checked before training is checked when a split is built: the folders, classes.txt, one
label per image (and no label without its image), label files that are 8-bit single-channel, of their image's
size, with values in range. The label values are checked by decoding every label file once with PIL (a
histogram per file: about a second for CamVid's 468 files), because a label out of range would otherwise surface
as a device-side assertion or, worse, a silently wrong loss, hours into a run; the histograms also give the class
frequencies for median-frequency balancing. Images are only probed (their header, for the size); one that cannot
be decoded when its turn comes is logged and skipped, as in the classification datasets, so a single bad file
never stops a long run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import InvalidArgumentError
from .datasets import IMAGE_EXTENSIONS, SampleKey, _seeded_rngs, derive_seed
from .transforms import ImageError, open_image

logger = logging.getLogger("xception.data")

IGNORE_INDEX = 255
CLASSES_FILE = "classes.txt"
SEGMENTATION_AUGMENTATIONS = ("deeplab", "basic", "none")
SCALE_RANGE = (0.5, 2.0)  # DeepLab's random scaling (Chen et al. 2018, section 4)
IMAGE_PAD_VALUE = 128  # mid-grey: about 0 after the [-1, 1] normalisation, so padding adds no signal
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the stored image is transposed
_LABEL_MODES = frozenset({"L", "P"})  # 8-bit: grey levels, or palette indices (as Pascal VOC stores its labels)


# --------------------------------------------------------------------------------------------------- the layout

def read_classes(root: str | Path) -> list[str]:
    """The class names in ``root/classes.txt``, one per line in index order (blank lines ignored)."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise InvalidArgumentError(f"{path} is missing: a segmentation folder needs {CLASSES_FILE} with the class "
                                   "names, one per line, line i naming label value i")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise InvalidArgumentError(f"{path} names no classes: write one class name per line")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidArgumentError(f"{path} repeats the class names {repeated}: each line must name another class")
    return names


def _visible_files(folder: Path, extensions: frozenset[str]) -> dict[str, Path]:
    """The files of ``folder`` (not recursive, hidden ones ignored) with these extensions, by stem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in extensions:
            continue
        if path.stem in found:
            raise InvalidArgumentError(f"{found[path.stem].name} and {path.name} in {folder} share the stem "
                                       f"{path.stem!r}: each image needs a stem of its own to be paired with its label")
        found[path.stem] = path
    return found


def _listing(paths: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def find_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of ``root/split``, sorted by stem; every image with its label and vice versa."""
    split_dir = root / split
    if not split_dir.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(f"no split folder {split!r} in {root} (folders there: "
                                f"{', '.join(available) or 'none'}); expected {split}/images/<stem>.jpg and "
                                f"{split}/labels/<stem>.png")
    for sub in ("images", "labels"):
        if not (split_dir / sub).is_dir():
            raise FileNotFoundError(f"{split_dir} has no {sub}/ folder: expected {split}/images/<stem>.jpg and "
                                    f"{split}/labels/<stem>.png")
    images = _visible_files(split_dir / "images", IMAGE_EXTENSIONS)
    labels = _visible_files(split_dir / "labels", frozenset({".png"}))
    if not images:
        raise InvalidArgumentError(f"{split_dir / 'images'} holds no images (extensions: "
                                   f"{' '.join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))}): the split is empty")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise InvalidArgumentError(f"{len(unlabelled)} image(s) in {split_dir / 'images'} have no label file: "
                                   f"{_listing([images[s].name for s in unlabelled])}; each needs "
                                   f"{split}/labels/<stem>.png (or remove the image)")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise InvalidArgumentError(f"{len(orphans)} label file(s) in {split_dir / 'labels'} have no image: "
                                   f"{_listing([labels[s].name for s in orphans])}; add the images or remove the "
                                   "labels")
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as the decoder will give it (EXIF rotation applied), from the header; None when the file
    cannot be opened (it is then skipped when its turn comes)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            transposed = image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:
        return None
    return (height, width) if transposed else (width, height)


def _label_histogram(path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """The 256-bin histogram of an 8-bit label file, after checking its mode and size."""
    try:
        with Image.open(path) as label:
            label.load()
            mode, size = label.mode, label.size
            histogram = np.asarray(label.histogram()[:256], dtype=np.int64) if mode in _LABEL_MODES else None
    except Exception as error:
        raise InvalidArgumentError(f"label file {path} cannot be read ({type(error).__name__}: {error}): fix or "
                                   "remove it and its image") from None
    if histogram is None:
        hint = (" (a colour-coded mask: convert its colours to class indices first)" if mode in ("RGB", "RGBA")
                else "")
        raise InvalidArgumentError(f"label file {path} is a {mode} image; labels must be 8-bit single-channel PNGs "
                                   f"(mode L or P) holding one class index per pixel{hint}")
    if image_size is not None and size != image_size:
        raise InvalidArgumentError(f"label file {path} is {size[0]}x{size[1]} but its image is "
                                   f"{image_size[0]}x{image_size[1]}: a label map must have its image's size")
    return histogram


def scan_labels(pairs: Sequence[tuple[Path, Path]], num_classes: int, ignore_index: int) -> np.ndarray:
    """Check every label file and count its pixels: an int64 array (files, num_classes + 1), the class counts and
    then the file's total pixel count (ignored pixels included)."""
    counts = np.zeros((len(pairs), num_classes + 1), dtype=np.int64)
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_classes] = True
    allowed[ignore_index] = True
    for row, (image, label) in enumerate(pairs):
        histogram = _label_histogram(label, _image_size(image))
        bad = np.flatnonzero((histogram > 0) & ~allowed)
        if len(bad):
            raise InvalidArgumentError(f"label file {label} holds the values {bad.tolist()}, which are neither a "
                                       f"class (0..{num_classes - 1}, {num_classes} classes in {CLASSES_FILE}) nor "
                                       f"the ignore index {ignore_index}: fix the labels, add the classes to "
                                       f"{CLASSES_FILE}, or set --ignore-index")
        counts[row, :num_classes] = histogram[:num_classes]
        counts[row, num_classes] = histogram.sum()
    return counts


# --------------------------------------------------------------------------------------------------- the dataset

SegmentationTransform = Any  # (tv_tensors.Image uint8, tv_tensors.Mask uint8) -> (float image, int64 mask)


class SegmentationDataset(Dataset):
    """Image and label-map pairs, indexed by :class:`SampleKey`, augmented reproducibly: each sample's random
    transform is seeded from (seed, epoch, index), as :class:`~xception.data.ImageDataset` does, so neither the
    worker count nor a resumed run changes what the model sees.

    A sample is ``(image, mask)``: a float (3, H, W) image in [-1, 1] and an int64 (H, W) mask; or None when the
    image cannot be decoded (logged; :class:`SegmentationCollate` counts it)."""

    in_chans = 3  # images are decoded as RGB

    def __init__(self, pairs: Sequence[tuple[Path, Path]], classes: Sequence[str], counts: np.ndarray,
                 transform: SegmentationTransform | None, *, ignore_index: int = IGNORE_INDEX, seed: int = 0) -> None:
        self.pairs = list(pairs)
        self.classes = list(classes)
        self.counts = counts
        self.transform = transform
        self.ignore_index = ignore_index
        self.seed = seed

    @classmethod
    def from_folder(cls, root: str | Path, split: str, transform: SegmentationTransform | None = None, *,
                    ignore_index: int = IGNORE_INDEX, seed: int = 0) -> SegmentationDataset:
        """``root/split`` in the segmentation layout (see the module documentation), checked before any training."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
        if not 0 <= ignore_index <= 255:
            raise InvalidArgumentError(f"the ignore index must be an 8-bit label value 0..255, got {ignore_index}")
        classes = read_classes(root)
        if ignore_index < len(classes):
            raise InvalidArgumentError(f"the ignore index {ignore_index} is also class {classes[ignore_index]!r} "
                                       f"of {root / CLASSES_FILE}: choose another --ignore-index")
        pairs = find_pairs(root, split)
        return cls(pairs, classes, scan_labels(pairs, len(classes), ignore_index), transform,
                   ignore_index=ignore_index, seed=seed)

    def first(self, count: int) -> SegmentationDataset:
        """The first ``count`` pairs only (small runs and tests)."""
        return SegmentationDataset(self.pairs[:count], self.classes, self.counts[:count], self.transform,
                                   ignore_index=self.ignore_index, seed=self.seed)

    def class_pixels(self) -> np.ndarray:
        """Labelled pixels of each class over the split."""
        return self.counts[:, :-1].sum(0)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.transform is None:
            raise RuntimeError("SegmentationDataset.transform is not set")
        image_path, label_path = self.pairs[key.index]
        try:
            image = TF.pil_to_tensor(open_image(image_path, "RGB"))
            with Image.open(label_path) as label:
                mask = torch.from_numpy(np.array(label, dtype=np.uint8))
        except (ImageError, OSError) as error:
            logger.warning("skipping unreadable image %s: %s", image_path, error)
            return None
        if image.shape[-2:] != mask.shape:
            raise InvalidArgumentError(f"{image_path} decodes to {image.shape[-1]}x{image.shape[-2]} but its label "
                                       f"{label_path} is {mask.shape[1]}x{mask.shape[0]}")
        with _seeded_rngs(derive_seed(self.seed, key.epoch, key.index)):
            return self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask.unsqueeze(0)))


def median_frequency_weights(dataset: SegmentationDataset) -> torch.Tensor:
    """Median frequency balancing (Eigen and Fergus, ICCV 2015, section 4; SegNet's class weights for CamVid,
    Badrinarayanan et al. 2017): weight_c = median(freq) / freq_c, where freq_c is the pixels of class c divided by
    the total pixels of the images in which c is present. A class absent from the split gets weight 0 (it has no
    pixels to weigh) and is left out of the median."""
    class_pixels = dataset.counts[:, :-1].astype(np.float64)
    totals = dataset.counts[:, -1:].astype(np.float64)
    present_totals = (totals * (class_pixels > 0)).sum(0)
    present = present_totals > 0
    if not present.any():
        raise InvalidArgumentError("the training labels hold no class pixels at all: nothing to weigh")
    frequency = np.zeros(len(dataset.classes))
    frequency[present] = class_pixels.sum(0)[present] / present_totals[present]
    weights = np.zeros(len(dataset.classes))
    weights[present] = np.median(frequency[present]) / frequency[present]
    absent = [name for name, here in zip(dataset.classes, present, strict=True) if not here]
    if absent:
        logger.warning("classes without a pixel in the training labels (weight 0): %s", ", ".join(absent))
    return torch.tensor(weights, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------- transforms

def check_scale_range(scale_range: Any) -> tuple[float, float]:
    """``scale_range`` as a (low, high) tuple of floats, refused unless 0 < low <= high."""
    try:
        low, high = (float(value) for value in scale_range)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"the scale range (--scale-range LOW HIGH) must be two numbers, got "
                                   f"{scale_range!r}") from None
    if not 0 < low <= high or not math.isfinite(high):
        raise InvalidArgumentError(f"the scale range (--scale-range LOW HIGH) needs 0 < LOW <= HIGH, got {low:g} "
                                   f"{high:g}: e.g. DeepLab's 0.5 2.0")
    return low, high


class RandomScale(v2.Transform):
    """Resize the image and its mask by one random factor in ``scale_range`` (DeepLab's scale augmentation).

    torchvision's kernels do the work and dispatch on the type: the image is resized bilinearly (antialiased),
    a ``tv_tensors.Mask`` always with nearest-neighbour interpolation, so no label value is ever blended."""

    def __init__(self, scale_range: tuple[float, float] = SCALE_RANGE) -> None:
        super().__init__()
        self.scale_range = check_scale_range(scale_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        factor = low + float(torch.rand(())) * (high - low)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)


@dataclass(frozen=True)
class _Finish:
    """uint8 image -> float [-1, 1] (as the classification transforms scale it); (1, H, W) mask -> int64 (H, W)."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.as_subclass(torch.Tensor).to(torch.float32).div_(127.5).sub_(1.0)
        return image, mask.as_subclass(torch.Tensor)[0].long()


@dataclass(frozen=True)
class SegmentationTrainTransform:
    """Joint augmentation of an image and its mask with torchvision's ``transforms.v2`` (the mask a
    ``tv_tensors.Mask``, so every geometric step treats it with nearest-neighbour interpolation and pads it with
    the ignore index).

    "deeplab": random scale (by a factor drawn uniformly from ``scale_range``, DeepLab's 0.5-2.0 by default),
    random ``crop_size`` square crop (padded where the scaled image is smaller: mid-grey image, ignored mask),
    horizontal flip, colour jitter; the augmentation of DeepLabV3+ (Chen et al. 2018), plus photometric jitter.
    "basic": crop and flip. "none": the crop alone (batches need one size)."""

    crop_size: int
    ignore_index: int = IGNORE_INDEX
    style: str = "deeplab"
    scale_range: tuple[float, float] = SCALE_RANGE

    _steps: v2.Compose = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.style not in SEGMENTATION_AUGMENTATIONS:
            raise InvalidArgumentError(f"segmentation augmentation must be one of "
                                       f"{', '.join(SEGMENTATION_AUGMENTATIONS)}, got {self.style!r}")
        # frozen: set once here, a list (from JSON) kept as a tuple
        object.__setattr__(self, "scale_range", check_scale_range(self.scale_range))
        object.__setattr__(self, "_steps", self._build())  # frozen: set once here

    def _build(self) -> v2.Compose:
        crop = v2.RandomCrop(self.crop_size, pad_if_needed=True,
                             fill={tv_tensors.Image: IMAGE_PAD_VALUE, tv_tensors.Mask: self.ignore_index})
        steps: list[Any] = [RandomScale(self.scale_range)] if self.style == "deeplab" else []
        steps.append(crop)
        if self.style != "none":
            steps.append(v2.RandomHorizontalFlip())
        if self.style == "deeplab":
            steps.append(v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25))  # the mask passes through
        return v2.Compose(steps)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _Finish()(*self._steps(image, mask))


@dataclass(frozen=True)
class SegmentationEvalTransform:
    """Evaluation at full resolution: no resize, no crop; the image scaled to [-1, 1]."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _Finish()(image, mask)


# --------------------------------------------------------------------------------------------------- batches

def sample_labels(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """The label nearest the centre of each ``stride`` x ``stride`` cell of (..., H, W) label maps: a view, no
    label blended. The loss of a model that predicts on this grid (``output_size``) is the full-resolution one
    sampled (``--label-stride``); the network itself is unchanged, and evaluation stays at full resolution."""
    if stride < 1:
        raise InvalidArgumentError(f"the label stride must be a positive integer, got {stride}")
    offset = stride // 2  # a cell's centre lies at offset (stride - 1) / 2: this rounds it up to a pixel
    return masks[..., offset::stride, offset::stride]


@dataclass(frozen=True)
class SegmentationCollate:
    """DataLoader ``collate_fn``: drops undecodable (None) samples and pads the rest to the batch's largest size
    (image with 0, the normalised mid-grey; mask with the ignore index, so padding never counts). Returns (images,
    masks, number skipped), as :func:`~xception.data.collate_skipping` does for classification."""

    ignore_index: int = IGNORE_INDEX

    def __call__(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        kept = [sample for sample in batch if sample is not None]
        skipped = len(batch) - len(kept)
        if not kept:
            return torch.empty(0, 3, 0, 0), torch.empty(0, 0, 0, dtype=torch.int64), skipped
        height = max(mask.shape[0] for _, mask in kept)
        width = max(mask.shape[1] for _, mask in kept)
        images = torch.zeros(len(kept), kept[0][0].shape[0], height, width)
        masks = torch.full((len(kept), height, width), self.ignore_index, dtype=torch.int64)
        for i, (image, mask) in enumerate(kept):
            images[i, :, : mask.shape[0], : mask.shape[1]] = image
            masks[i, : mask.shape[0], : mask.shape[1]] = mask
        return images, masks, skipped
