"""Using a trained segmentation model: load a run, evaluate it on a split (mIoU, per-class IoU, pixel accuracy,
a confusion-matrix PNG), and predict label maps of images as colour-coded PNGs with overlays. ``xception segment
eval`` and ``predict`` call these and only print.

Test-time augmentation (``tta=True``) averages the softmax over the scales :data:`TTA_SCALES` and their mirror
images at the full size, the multi-scale and flip inference of DeepLab (Chen et al. 2018, section 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from .data import (
    IGNORE_INDEX,
    ResumableSampler,
    SegmentationCollate,
    SegmentationDataset,
    SegmentationEvalTransform,
    readable_samples,
)
from .data.transforms import ImageError, open_image
from .deploy import Deployment
from .errors import InvalidArgumentError
from .files import atomic_path
from .inference import image_files, plot_confusion, run_files, unique_stem
from .models import create_model
from .models.registry import model_task
from .precision import AUTO, choose_precision
from .training.checkpoint import read_architecture
from .training.segmentation_metrics import evaluate_segmentation, segment

# DeepLab's evaluation scales (Chen et al. 2017, "Rethinking atrous convolution", section 4.1; the same in
# DeepLabV3+, section 4): they span the training's random scale 0.5-2.0, so each view is one the network has
# trained on. On the three recorded CamVid runs (benchmarks/results/camvid.json, camvid-seed1/, camvid-seed2/),
# against 0.75-1.25 with flips (the same records at commit 6515ab5): 65.3 / 65.6 / 64.2% val mIoU against
# 64.7 / 65.4 / 63.7, at about 2.5 times the evaluation time.
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
OVERLAY_OPACITY = 0.5

# The colours of CamVid's own label_colors.txt (Brostow et al. 2009; mmsegmentation's CamVidDataset lists the
# same), by the class names of ../shared/datasets/camvid/classes.txt.
CAMVID_COLOURS = {
    "sky": (128, 128, 128), "building": (128, 0, 0), "pole": (192, 192, 128), "road": (128, 64, 128),
    "pavement": (0, 0, 192), "tree": (128, 128, 0), "sign_symbol": (192, 128, 128), "fence": (64, 64, 128),
    "car": (64, 0, 128), "pedestrian": (64, 64, 0), "bicyclist": (0, 128, 192),
}


def voc_palette(count: int) -> np.ndarray:
    """PASCAL VOC's colour map (the VOC devkit's labelcolormap): class i's bits spread over the high bits of red,
    green and blue in turn, so that neighbouring indices get distinct colours. (count, 3) uint8."""
    palette = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def palette_for(classes: list[str]) -> np.ndarray:
    """CamVid's colours where every class name is one of CamVid's, else PASCAL VOC's colour map."""
    if all(name.lower() in CAMVID_COLOURS for name in classes):
        return np.array([CAMVID_COLOURS[name.lower()] for name in classes], dtype=np.uint8)
    return voc_palette(len(classes))


@dataclass
class LoadedSegmenter:
    """A segmentation model ready for inference, with its class names and the label value its data ignores."""

    model: nn.Module
    classes: list[str]
    ignore_index: int = IGNORE_INDEX

    @property
    def palette(self) -> np.ndarray:
        return palette_for(self.classes)


def load_segmenter(checkpoint: str | Path) -> LoadedSegmenter:
    """A segmentation run folder (its best weights, else its last, with the classes and ignore index of its
    config.json) or a segmentation weight file saved by this library."""
    path = Path(checkpoint)
    weights, config = run_files(path)
    model_name, architecture = read_architecture(weights)
    if model_task(model_name) != "segmentation":
        raise InvalidArgumentError(f"{path} holds a {model_name}, a classification model: use xception eval or "
                                   "xception predict for it")
    model = create_model(model_name, weights=weights, **architecture).eval().to(memory_format=torch.channels_last)
    classes = config.get("classes") or [str(i) for i in range(model.num_classes)]
    return LoadedSegmenter(model, classes, config.get("ignore_index", IGNORE_INDEX))


def segmentation_deploy_inputs(loaded: LoadedSegmenter, data: str | Path, calibration_count: int,
                                held_out_count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``xception deploy`` measures a segmentation model on, at full resolution: the first
    ``calibration_count`` training images of the segmentation folder ``data`` (int8 calibrates on them), and
    ``held_out_count`` validation images, evenly spaced, with their label maps (the mIoU is compared on them)."""
    def images(split: str, count: int, spread: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dataset = SegmentationDataset.from_folder(data, split, SegmentationEvalTransform(),
                                                  ignore_index=loaded.ignore_index)
        chosen = (torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long().tolist() if spread
                  else range(min(count, len(dataset))))
        return readable_samples(dataset, chosen)

    calibration, held_out = images("train", calibration_count, False), images("val", held_out_count, True)
    sizes = {tuple(image.shape[-2:]) for image, _ in calibration + held_out}
    if len(sizes) != 1:
        raise InvalidArgumentError(f"the images of {data} come in {len(sizes)} sizes ({sorted(sizes)[:3]}...): "
                                   "deploy measures one size; give a folder of images of the size you will run")
    if not calibration or not held_out:
        raise InvalidArgumentError(f"{data} needs readable train and val images to deploy with")
    return (torch.stack([image for image, _ in calibration]), torch.stack([image for image, _ in held_out]),
            torch.stack([mask.long() for _, mask in held_out]))


def segmenter_from_deployment(deployment: Deployment) -> LoadedSegmenter:
    """A deployed segmentation model (:func:`xception.load_deployed`) with the classes it records."""
    return LoadedSegmenter(deployment.model, deployment.classes, deployment.record.get("ignore_index", IGNORE_INDEX))


def evaluate_segmenter(loaded: LoadedSegmenter, data: str | Path, split: str = "val", *, batch_size: int = 4,
                       workers: int = 0, tta: bool = False, precision: str = AUTO,
                       confusion_png: Path | None = None) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (by class name; None for a class absent from both the labels and
    the predictions) of ``loaded`` on ``split`` of a segmentation folder, at full resolution; the confusion matrix
    (rows normalised: the share of each true class's pixels predicted as each class) drawn to ``confusion_png``.
    ``precision``: autocast, ``auto`` being the machine's fastest native one (``metrics["precision"]`` says)."""
    choice = choose_precision(precision, "cpu")
    dataset = SegmentationDataset.from_folder(data, split, SegmentationEvalTransform(),
                                              ignore_index=loaded.ignore_index)
    generic = [str(i) for i in range(len(loaded.classes))]
    if dataset.classes != loaded.classes and not (loaded.classes == generic
                                                  and len(dataset.classes) == len(loaded.classes)):
        raise InvalidArgumentError(f"the data's classes {dataset.classes} differ from the model's {loaded.classes}")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        sampler=ResumableSampler(len(dataset), shuffle=False),
                        collate_fn=SegmentationCollate(loaded.ignore_index))
    metrics = evaluate_segmentation(loaded.model, loader, len(dataset.classes), torch.device("cpu"), choice.name,
                                    channels_last=True, ignore_index=loaded.ignore_index,
                                    scales=TTA_SCALES if tta else (1.0,), flip=tta)
    metrics["precision"] = choice.to_json()
    metrics["per_class_iou"] = dict(zip(dataset.classes, metrics["per_class_iou"], strict=True))
    if confusion_png is not None:
        confusion = torch.tensor(metrics["confusion"], dtype=torch.float64)
        shares = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
        metrics["confusion_png"] = str(plot_confusion(shares.tolist(), dataset.classes, confusion_png))
    return metrics


def save_png(array: np.ndarray, path: Path) -> Path:
    """An (H, W) or (H, W, 3) uint8 array as a PNG, written atomically."""
    with atomic_path(path, suffix=".png") as temporary:
        Image.fromarray(array).save(temporary, format="PNG")
    return path


@torch.no_grad()
def predict_masks(loaded: LoadedSegmenter, inputs: Iterable[str | Path], output: str | Path, *, tta: bool = False,
                  precision: str = AUTO) -> list[dict[str, Any]]:
    """For each image (files, and the images inside folders): ``<stem>.mask.png``, the predicted class of each
    pixel in the palette's colours, and ``<stem>.overlay.png``, those colours blended over the image, in
    ``output``. One result per file: ``{"file", "mask", "overlay", "classes": {name: share of pixels}}``, or
    ``{"file", "error"}`` for a file that cannot be read; the others are still predicted."""
    output = Path(output)
    precision = choose_precision(precision, "cpu").name
    palette = loaded.palette
    results: list[dict[str, Any]] = []
    used: set[str] = set()
    for path in image_files(inputs):
        try:
            image = TF.pil_to_tensor(open_image(path, "RGB"))
        except (ImageError, OSError) as error:
            results.append({"file": str(path), "error": str(error)})
            continue
        batch = (image.float().div(127.5).sub(1.0))[None].contiguous(memory_format=torch.channels_last)
        prediction = segment(loaded.model, batch, precision=precision, scales=TTA_SCALES if tta else (1.0,),
                             flip=tta).argmax(1)[0].numpy()
        colours = palette[prediction]
        overlay = ((1 - OVERLAY_OPACITY) * image.permute(1, 2, 0).numpy() + OVERLAY_OPACITY * colours).round()
        stem = unique_stem(path, used)
        mask_path = save_png(colours, output / f"{stem}.mask.png")
        overlay_path = save_png(overlay.astype(np.uint8), output / f"{stem}.overlay.png")
        counts = np.bincount(prediction.ravel(), minlength=len(loaded.classes)) / prediction.size
        results.append({"file": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "classes": {name: round(float(share), 4) for name, share in zip(loaded.classes, counts,
                                                                                         strict=True) if share > 0}})
    return results
