"""Measuring a model on a data set, and recording a run's metrics: JSON lines, TensorBoard, curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..precision import autocast

log = logging.getLogger("xception.train")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False, world_size: int = 1) -> dict[str, Any]:
    """Top-1/top-5 accuracy, loss, per-class accuracy and the confusion matrix (summed over ranks)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels, num_skipped in loader:
        skipped += num_skipped
        if len(labels) == 0:
            continue
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        k = min(5, num_classes)
        top5_correct += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    if world_size > 1:
        for tensor in (confusion, top5_correct, loss_sum, skipped):
            dist.all_reduce(tensor)
    model.train(was_training)
    total = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp(min=1)
    return {
        "top1": float(confusion.diag().sum()) / max(total, 1),
        "top5": float(top5_correct) / max(total, 1),
        "loss": float(loss_sum) / max(total, 1),
        "samples": total,
        "skipped": int(skipped),
        "per_class": (confusion.diag() / per_class_total).tolist(),
        "confusion": confusion.cpu().tolist(),
    }


class MetricsLogger:
    """Metrics as JSON lines (``metrics.jsonl``) and, where TensorBoard is installed, as event files."""

    def __init__(self, output: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = output / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # appended line by line: a killed run keeps what it logged
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Training curves: loss, and train/val top-1, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_axis.plot(epochs, [r["val_loss"] for r in history], label="val")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy_axis.plot(epochs, [r["train_top1"] for r in history], label="train")
    accuracy_axis.plot(epochs, [r["val_top1"] for r in history], label="val")
    accuracy_axis.set(xlabel="epoch", ylabel="top-1", title="Top-1 accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
