"""When a deploy candidate is correct enough: its outputs on held-out images against the fp32 model's, judged the
way its task is judged. A classifier is held to top-1 agreement (the share of images whose class is the fp32
model's); a segmentation model to its mIoU on the held-out labels, within a bound of the fp32 model's mIoU (a
quantized model that moves a boundary by a pixel agrees on fewer pixels but is no worse). Both report the share of
outputs (images, or labelled pixels) whose class is the fp32 model's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import IGNORE_INDEX
from ..training.segmentation_metrics import confusion_matrix, mean_iou


class TopOneAgreement:
    """Accepts a classifier whose top-1 class is the fp32 model's on at least ``minimum`` of the images."""

    def __init__(self, minimum: float = 0.99) -> None:
        self.minimum = minimum

    @property
    def bound(self) -> str:
        return f"top-1 agreement with fp32 >= {self.minimum:.1%}"

    def measure(self, reference: torch.Tensor, output: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        predicted = output.argmax(1)
        return {"agreement": float((predicted == reference.argmax(1)).double().mean()),
                "top1": float((predicted == labels).double().mean()),
                "reference_top1": float((reference.argmax(1) == labels).double().mean())}

    def rejects(self, measured: dict[str, Any]) -> str | None:
        """Why the candidate is rejected, or None."""
        if measured["agreement"] < self.minimum:
            return f"top-1 agreement with fp32 {measured['agreement']:.2%} < {self.minimum:.1%}"
        return None


class MeanIoUAgreement:
    """Accepts a segmentation model whose mIoU on the held-out labels is at most ``max_drop`` below the fp32
    model's (in points of percent)."""

    def __init__(self, max_drop: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        self.max_drop = max_drop
        self.ignore_index = ignore_index

    @property
    def bound(self) -> str:
        return f"mIoU within {self.max_drop:g} point(s) of fp32's"

    def measure(self, reference: torch.Tensor, output: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        classes = reference.shape[1]
        predicted, expected = output.argmax(1), reference.argmax(1)
        labelled = labels != self.ignore_index
        return {"agreement": float((predicted == expected)[labelled].double().mean()),
                "miou": 100 * mean_iou(confusion_matrix(predicted, labels, classes, self.ignore_index)),
                "reference_miou": 100 * mean_iou(confusion_matrix(expected, labels, classes, self.ignore_index))}

    def rejects(self, measured: dict[str, Any]) -> str | None:
        drop = measured["reference_miou"] - measured["miou"]
        if drop > self.max_drop:
            return f"mIoU {measured['miou']:.2f} is {drop:.2f} points below fp32's {measured['reference_miou']:.2f}"
        return None


# What each task is held to: the model's ``task`` attribute picks.
AGREEMENTS: dict[str, type[TopOneAgreement] | type[MeanIoUAgreement]] = {
    "classification": TopOneAgreement, "segmentation": MeanIoUAgreement}
