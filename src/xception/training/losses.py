"""The Lovász-softmax loss: a convex surrogate of the segmentation's own measure, 1 - IoU, per class.

Berman, Rannen Triki and Blaschko, "The Lovász-Softmax loss: A tractable surrogate for the optimization of the
intersection-over-union measure in neural networks", CVPR 2018. For class c, take each labelled pixel's error
``|[label == c] - p_c|``; sort the errors in decreasing order; the loss is their dot product with the increments
of the Jaccard loss ``1 - |fg ∩ kept| / |fg ∪ errors so far|`` as the pixels are added in that order (the Lovász
extension of the set function "1 - IoU of class c"). On hard (0/1) predictions it *is* 1 - IoU of the class, and
it is piecewise linear in the probabilities in between, so its gradient pushes on the pixels that decide the IoU:
thin and small classes, which cross-entropy averages away. The loss here is the mean over the classes present in
the batch's labels (the paper's ``classes='present'``), computed over the whole batch's pixels at once.

It costs a sort of every labelled pixel per class: about 0.03 s for four 112x112 label maps of 11 classes on this
project's 2-core machine and 0.18 s at 224x224 (measured with a scratch timing script); hence ``label_stride``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Lovász-softmax of (B, C, H, W) logits against (B, H, W) class indices, pixels labelled ``ignore_index`` left
    out; the mean over the classes present in ``labels``. Computed in float32. Zero (still connected to the
    logits, so a backward runs) when no pixel is labelled."""
    num_classes = logits.shape[1]
    probabilities = logits.float().softmax(1).transpose(0, 1).reshape(num_classes, -1)
    labels = labels.reshape(-1)
    labelled = labels != ignore_index
    probabilities, labels = probabilities[:, labelled], labels[labelled]
    if labels.numel() == 0:
        return logits.float().sum() * 0.0
    foreground = F.one_hot(labels, num_classes).T.to(probabilities.dtype)  # (C, pixels)
    errors, order = (foreground - probabilities).abs().sort(dim=1, descending=True)
    foreground = foreground.gather(1, order)
    # The Jaccard loss after the first k sorted pixels are counted as errors, for every k; its increments weigh
    # the sorted errors.
    total = foreground.sum(1, keepdim=True)
    intersection = total - foreground.cumsum(1)
    union = total + (1.0 - foreground).cumsum(1)
    jaccard = 1.0 - intersection / union
    increments = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    per_class = (errors * increments).sum(1)
    return per_class[total.squeeze(1) > 0].mean()
