"""Measuring a segmentation model: the pixel confusion matrix, IoU per class, mIoU, pixel accuracy; evaluation
over a data set (all-reduced under DDP), with optional flip and multi-scale inference.

Convention for the mean IoU: the mean over the classes present in the ground truth or in the prediction of the
whole evaluated set. A class absent from both has IoU 0/0, undefined rather than 0 or 1, and is left out, as the
common implementations do (``np.nanmean`` over the per-class IoU in VainF/DeepLabV3Plus-Pytorch's
``StreamSegMetrics`` and in mmsegmentation's ``IoUMetric``). The confusion matrix is accumulated over the whole
set before any division (not averaged per image), so large and small images weigh by their pixels. Pixels
labelled with the ignore index count nowhere: not in the matrix, not in the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..precision import autocast


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows the true class and columns the predicted one, over the
    pixels whose label is not ``ignore_index``. ``predictions`` and ``labels``: class indices of the same shape."""
    valid = labels != ignore_index
    pairs = labels[valid] * num_classes + predictions[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_iou(confusion: torch.Tensor) -> list[float | None]:
    """IoU of each class, true positives / (true positives + false positives + false negatives); None for a class
    absent from both the ground truth and the prediction (its IoU is undefined)."""
    confusion = torch.as_tensor(confusion).double()
    true_positives = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positives
    return [None if u == 0 else float(tp / u) for tp, u in zip(true_positives, union, strict=True)]


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean of :func:`per_class_iou` over the classes where it is defined (see the module documentation);
    0 when no pixel was counted."""
    defined = [iou for iou in per_class_iou(confusion) if iou is not None]
    return sum(defined) / len(defined) if defined else 0.0


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """The fraction of counted (not ignored) pixels whose class is right; 0 when none were counted."""
    confusion = torch.as_tensor(confusion)
    total = int(confusion.sum())
    return float(confusion.diag().sum()) / total if total else 0.0


def segment(model: nn.Module, images: torch.Tensor, *, precision: str = "fp32", scales: Sequence[float] = (1.0,),
            flip: bool = False) -> torch.Tensor:
    """Per-pixel class scores at the input's size, as float32 (B, C, H, W): the model's logits, or with test-time
    augmentation (several ``scales``, or ``flip``) the log of the softmax averaged over every scale and its
    mirror image, each resized bilinearly back to the full size before averaging. Both feed ``argmax`` and
    ``F.cross_entropy`` alike (the log of a probability distribution is its own log-softmax). A scale that would
    shrink the images below the model's ``min_input_size`` is left out (small images get the others)."""
    height, width = images.shape[-2:]
    minimum = getattr(model, "min_input_size", 1)
    scales = [scale for scale in scales if scale >= 1.0 or min(round(height * scale), round(width * scale)) >= minimum]
    scales = scales or [1.0]
    if tuple(scales) == (1.0,) and not flip:
        with autocast(images.device, precision):
            return model(images).float()
    total = None
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="bilinear",
            align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            with autocast(images.device, precision):
                logits = model(scaled.flip(-1) if mirrored else scaled).float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probabilities = logits.softmax(1)
            total = probabilities if total is None else total + probabilities
    views = len(scales) * (2 if flip else 1)
    return (total / views).clamp_min(1e-12).log()


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
                          precision: str = "fp32", channels_last: bool = False, world_size: int = 1, *,
                          ignore_index: int = 255, scales: Sequence[float] = (1.0,),
                          flip: bool = False) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU (by index; None where undefined), the mean cross-entropy per counted
    pixel and the confusion matrix over ``loader``'s (images, masks, skipped) batches, summed over the ranks.
    ``scales`` and ``flip``: test-time augmentation (see :func:`segment`)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # images evaluated, images skipped
    for images, masks, num_skipped in loader:
        counts[1] += num_skipped
        if len(masks) == 0:
            continue
        images, masks = images.to(device), masks.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        scores = segment(model, images, precision=precision, scales=scales, flip=flip)
        loss_sum += F.cross_entropy(scores, masks, ignore_index=ignore_index, reduction="sum").double()
        confusion += confusion_matrix(scores.argmax(1), masks, num_classes, ignore_index)
        counts[0] += len(masks)
    if world_size > 1:
        for tensor in (confusion, loss_sum, counts):
            dist.all_reduce(tensor)
    model.train(was_training)
    pixels = int(confusion.sum())
    return {"miou": mean_iou(confusion.cpu()), "pixel_accuracy": pixel_accuracy(confusion.cpu()),
            "per_class_iou": per_class_iou(confusion.cpu()), "loss": float(loss_sum) / max(pixels, 1),
            "pixels": pixels, "images": int(counts[0]), "skipped": int(counts[1]),
            "confusion": confusion.cpu().tolist()}
