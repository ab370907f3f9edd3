"""One training step, the one ``xception train``, ``xception benchmark --mode train`` and the training profile run.

A step is split where gradient accumulation needs it: :func:`forward_backward` for each micro-batch, then
:func:`optimizer_step` once the micro-batches of an optimizer step are in; :func:`train_step` is both, for a
step without accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import autocast
from .losses import lovasz_softmax


def forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, precision: str,
                     scaler: torch.amp.GradScaler, label_smoothing: float = 0.0, accumulation: int = 1,
                     class_weights: torch.Tensor | None = None, ignore_index: int = -100,
                     lovasz_weight: float = 0.0,
                     output_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast, cross-entropy in float32, backward of the loss scaled for accumulation (and for
    fp16 loss scaling). ``labels``: class indices, or soft targets (MixUp, CutMix); for segmentation (B, H, W)
    class indices against (B, C, H, W) logits, pixels labelled ``ignore_index`` left out of the loss (-100,
    cross_entropy's default, ignores nothing in practice), plus ``lovasz_weight`` x the Lovász-softmax loss.
    ``output_size``: the segmentation model's logits at that size, for labels sampled at a stride
    (:func:`~xception.data.sample_labels`). Returns the unscaled loss and the logits, detached. A non-finite loss
    is returned before its backward, for the caller to stop on."""
    with autocast(images.device, precision):
        logits = model(images) if output_size is None else model(images, output_size=output_size)
        loss = F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing,
                               ignore_index=ignore_index)
        if lovasz_weight:
            loss = loss + lovasz_weight * lovasz_softmax(logits, labels, ignore_index=ignore_index)
        if ignore_index >= 0 and not (labels != ignore_index).any():
            # Every pixel ignored (a crop of void alone): cross_entropy's mean is 0/0. Nothing to learn, but a zero
            # loss still runs the backward, so that DDP's ranks all reduce their gradients.
            loss = logits.float().sum() * 0.0
    if torch.isfinite(loss):
        scaler.scale(loss / accumulation).backward()
    return loss.detach(), logits.detach()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                   lr: float | None = None, clip_grad_norm: float | None = None) -> None:
    """Set the learning rate (if given, times each group's ``lr_scale``), clip the gradient norm (if asked), step,
    and clear the gradients."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay scales each depth's rate
    if clip_grad_norm:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, labels: torch.Tensor, *, precision: str, label_smoothing: float = 0.0,
               clip_grad_norm: float | None = None) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss."""
    loss, _ = forward_backward(model, images, labels, precision=precision, scaler=scaler,
                               label_smoothing=label_smoothing)
    optimizer_step(model, optimizer, scaler, clip_grad_norm=clip_grad_norm)
    return loss
