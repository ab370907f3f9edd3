"""The segmentation experiment's settings: how much each DeepLab variant trains on CamVid (or any folder in the
segmentation layout), the quick preset, the data check and the command that reproduces a run.

The variants themselves, like every experiment's, are in :mod:`.definitions`; this module depends on nothing else
of the package, so that :mod:`.definitions` can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data import SegmentationDataset
from ..errors import InvalidArgumentError
from ..training.recipes import get_recipe

SEGMENTATION_RECIPE = "camvid"
# The recorded runs' batch (benchmarks/results/decoder/), the camvid recipe's until it moved to batches of 4.
RECORDED_BATCH_SIZE = 8
CAMVID = "../shared/datasets/camvid"  # relative to where the command runs: the repository's root in the README


@dataclass(frozen=True)
class SegmentationSettings:
    """How much each variant of a segmentation experiment trains. The defaults are the full run, sized for about 3
    minutes per baseline run on this project's 2-core machine: the first epochs of a camvid run there (45 steps of 8
    crops of 320 pixels with the network at full resolution, then the val split) took about a minute each.
    :data:`SEGMENTATION_QUICK` is ``--quick``."""

    data: str = CAMVID  # a folder in the segmentation layout
    seeds: int = 3  # runs of each variant of the claim (DeepLabV3+ and DeepLabV3), seeds 0..seeds-1
    # Runs of each other factor (backbone, output stride, crop): fewer, so that five variants fit about half an hour;
    # their differences are read against the baseline's seed spread.
    factor_seeds: int = 2
    epochs: int = 3  # the camvid recipe's warm-up (1 epoch) and poly schedule are fitted to this many
    batch_size: int | None = RECORDED_BATCH_SIZE  # None: the camvid recipe's (4)
    # The baseline's training crop: 320, as recorded, with the network at full resolution (the camvid recipe has
    # since moved to 448-pixel crops with the network at half resolution; see FULL_SCALE in .definitions).
    crop_size: int = 320
    small_crop_size: int = 240  # the smaller-crop variant's
    train_subset: int | None = None  # first N training images only
    val_subset: int | None = None  # first N validation images only (each scored at full resolution)
    quick: bool = False  # labels the results as a smoke test rather than evidence
    workers: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("seeds", "factor_seeds", "epochs"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_subset", "val_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1 when given, got {value}")
        if self.batch_size is not None and self.batch_size < 2:
            raise InvalidArgumentError(f"batch_size must be >= 2 for DeepLab's image-pooling BatchNorm, got "
                                       f"{self.batch_size}")
        for name in ("crop_size", "small_crop_size"):
            value = getattr(self, name)
            if value < 16:
                raise InvalidArgumentError(f"{name} must be >= 16 pixels, got {value}")

    def seeds_for(self, fewer: bool) -> int:
        """Runs of a variant: all the seeds for the claim's variants, ``factor_seeds`` (at most as many) for the
        others (``fewer``)."""
        return min(self.factor_seeds, self.seeds) if fewer else self.seeds


SEGMENTATION_FULL = SegmentationSettings()
SEGMENTATION_QUICK = SegmentationSettings(seeds=1, factor_seeds=1, epochs=1, batch_size=4, crop_size=96,
                                          small_crop_size=80, train_subset=8, val_subset=4, quick=True)


def make_segmentation_settings(*, quick: bool = False, data: str | None = None, seeds: int | None = None,
                               epochs: int | None = None) -> SegmentationSettings:
    """The full or quick preset with the command line's choices on top; an explicit ``seeds`` sets the claim's
    runs, and the factors' stay at the preset's count or fewer."""
    preset = SEGMENTATION_QUICK if quick else SEGMENTATION_FULL
    return replace(preset, data=data or preset.data, seeds=seeds or preset.seeds, epochs=epochs or preset.epochs)


def segmentation_command_line(name: str, settings: SegmentationSettings, output: str | Path) -> str:
    """The ``xception experiment`` command that runs ``name`` with ``settings``, for the outputs to quote."""
    preset = SEGMENTATION_QUICK if settings.quick else SEGMENTATION_FULL
    parts = ["xception experiment", name, *(["--data", settings.data] if settings.data != preset.data else []),
             *(["--quick"] if settings.quick else []),
             *(["--seeds", str(settings.seeds)] if settings.seeds != preset.seeds else []),
             *(["--epochs", str(settings.epochs)] if settings.epochs != preset.epochs else []),
             *(["--output", str(output)] if Path(output) != Path("runs/experiments") else [])]
    hidden = replace(settings, data=preset.data, seeds=preset.seeds, epochs=preset.epochs, progress=preset.progress)
    return " ".join(parts) + ("" if hidden == preset else " (other settings through the Python API)")


def count_segmentation_data(settings: SegmentationSettings) -> dict[str, Any]:
    """Classes, channels and images of the folder, every label file checked (as training will check it) before
    anything trains: an experiment of half an hour must not fail at its tenth run."""
    train = SegmentationDataset.from_folder(settings.data, "train")
    val = SegmentationDataset.from_folder(settings.data, "val")
    train_images = min(len(train), settings.train_subset or len(train))
    val_images = min(len(val), settings.val_subset or len(val))
    batch_size = settings.batch_size or get_recipe(SEGMENTATION_RECIPE).batch_size
    if train_images < batch_size:
        subset = f" (a subset of {settings.train_subset} requested)" if settings.train_subset else ""
        raise InvalidArgumentError(f"{settings.data} is too small for the experiment: its training split gives "
                                   f"{train_images} images{subset}, fewer than one batch of {batch_size}")
    if len(train.classes) < 2:
        raise InvalidArgumentError(f"{settings.data} has {len(train.classes)} class: mIoU needs at least 2 classes")
    return {"data": settings.data, "num_classes": len(train.classes), "in_chans": train.in_chans,
            "train_images": train_images, "val_images": val_images, "train_available": len(train),
            "val_available": len(val), "crop_size": settings.crop_size,
            "small_crop_size": settings.small_crop_size}
