"""Measuring a model on a data set, and recording a run's metrics: JSON lines, TensorBoard, curves."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..files import save_figure
from ..precision import autocast

log = logging.getLogger("xception.train")


def roc_auc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int]) -> float | None:
    """Area under the ROC curve of ``scores`` (higher: more likely positive) against ``labels`` (1 positive,
    0 negative): the Mann-Whitney statistic, the probability that a random positive scores above a random
    negative, ties counting half; equal to ``sklearn.metrics.roc_auc_score``. None when only one class is
    present, where the area is undefined."""
    scores, positive = _binary_inputs(scores, labels)
    num_positive = int(positive.sum())
    num_negative = len(positive) - num_positive
    if num_positive == 0 or num_negative == 0:
        return None
    ranks = _midranks(scores)
    # Rank-sum form: O(n log n), where counting pairs would be O(n²) on a large validation set.
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)


def equal_error_rate(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int]) -> float | None:
    """The error rate where the false positive rate equals the false negative rate (1 - true positive rate), for
    ``scores`` (higher: more likely positive) against ``labels`` (1 positive, 0 negative).

    Convention: the ROC curve is the points (FPR, TPR) of the thresholds "score >= t" at each distinct score,
    from (0, 0) (nothing positive) to (1, 1), as ``sklearn.metrics.roc_curve`` gives them. FNR - FPR falls
    along it from 1 to -1; the EER is read where it crosses zero, interpolating linearly between the two points
    that bracket the crossing (on that segment FPR and FNR are equal at the crossing, so it is either). A curve
    point with FPR = FNR exactly gives that value. Dropping collinear points, as ``roc_curve`` does by default,
    does not change the result. None when only one class is present."""
    scores, positive = _binary_inputs(scores, labels)
    num_positive = int(positive.sum())
    num_negative = len(positive) - num_positive
    if num_positive == 0 or num_negative == 0:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, sorted_positive = scores[order], positive[order]
    # One curve point per distinct score: the last sample of each run of tied scores.
    last_of_tie = torch.ones(len(sorted_scores), dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_positives = torch.cumsum(sorted_positive, 0, dtype=torch.float64)[last_of_tie]
    false_positives = torch.cumsum(~sorted_positive, 0, dtype=torch.float64)[last_of_tie]
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, false_positives / num_negative])
    fnr = 1 - torch.cat([zero, true_positives / num_positive])
    gap = fnr - fpr  # non-increasing, 1 at the first point and -1 at the last
    i = int(torch.nonzero(gap <= 0)[0])
    if gap[i] == 0:
        return float(fpr[i])
    fraction = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + fraction * (fpr[i] - fpr[i - 1]))


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean per-class recall over the classes that have samples (rows of ``confusion``: true classes, columns:
    predicted); 0 when there are none. Unlike top-1 it weighs a rare class as much as a common one."""
    confusion = torch.as_tensor(confusion)
    per_class_total = confusion.sum(1)
    present = per_class_total > 0
    if not present.any():
        return 0.0
    return float((confusion.diag()[present].double() / per_class_total[present]).mean())


def _binary_inputs(scores: torch.Tensor | Sequence[float],
                   labels: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 on the CPU: exact ties stay ties and the counts stay exact on large sets.
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    positive = torch.as_tensor(labels).detach().cpu().flatten() != 0
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    return scores, positive


def _midranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).double()
    return (last_rank - (counts - 1) / 2)[inverse]


def _gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's 1-D ``tensor``, concatenated in rank order. The ranks may hold different lengths (the last
    batch), and all_gather needs equal ones: pad to the longest, then cut each back."""
    length = torch.tensor([len(tensor)], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:int(n)] for part, n in zip(gathered, lengths, strict=True)])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False, world_size: int = 1) -> dict[str, Any]:
    """Top-1/top-5 accuracy, balanced accuracy, loss, per-class accuracy and the confusion matrix (summed over
    ranks); with two classes also ``roc_auc`` and ``eer`` (:func:`roc_auc`, :func:`equal_error_rate`) of class
    1's probability over every rank's samples, None where the samples hold one class only."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    binary = num_classes == 2
    margins: list[torch.Tensor] = []
    binary_labels: list[torch.Tensor] = []
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
        if binary:
            # The logit margin orders samples exactly as class 1's softmax probability does (it is its logit),
            # but float32 softmax rounds every margin above ~17 to 1.0, and such ties would lower the AUC.
            margins.append(logits[:, 1] - logits[:, 0])
            binary_labels.append(labels)
    if world_size > 1:
        for tensor in (confusion, top5_correct, loss_sum, skipped):
            dist.all_reduce(tensor)
    model.train(was_training)
    total = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp(min=1)
    metrics = {
        "top1": float(confusion.diag().sum()) / max(total, 1),
        "top5": float(top5_correct) / max(total, 1),
        "balanced_accuracy": balanced_accuracy(confusion.cpu()),
        "loss": float(loss_sum) / max(total, 1),
        "samples": total,
        "skipped": int(skipped),
        "per_class": (confusion.diag() / per_class_total).tolist(),
        "confusion": confusion.cpu().tolist(),
    }
    if binary:
        scores = torch.cat(margins) if margins else torch.zeros(0, device=device)
        targets = torch.cat(binary_labels) if binary_labels else torch.zeros(0, dtype=torch.int64, device=device)
        if world_size > 1:  # every rank collects and computes the same values, as for the reduced totals
            scores, targets = _gather(scores, world_size), _gather(targets, world_size)
        metrics["roc_auc"] = roc_auc(scores, targets)
        metrics["eer"] = equal_error_rate(scores, targets)
    return metrics


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


ACCURACY_TITLES = {"top1": "Top-1 accuracy", "pixel_accuracy": "Pixel accuracy"}


def plot_history(history: list[dict[str, Any]], path: Path, accuracy: str = "top1") -> None:
    """Training curves per epoch: loss, and train/val ``accuracy`` (top-1, or segmentation's pixel accuracy,
    drawn with the validation mIoU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_axis.plot(epochs, [r["val_loss"] for r in history], label="val")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy_axis.plot(epochs, [r[f"train_{accuracy}"] for r in history], label="train")
    accuracy_axis.plot(epochs, [r[f"val_{accuracy}"] for r in history], label="val")
    if "val_miou" in history[0]:
        accuracy_axis.plot(epochs, [r["val_miou"] for r in history], label="val mIoU")
    accuracy_axis.set(xlabel="epoch", ylabel=accuracy.replace("_", " "), title=ACCURACY_TITLES[accuracy])
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)
