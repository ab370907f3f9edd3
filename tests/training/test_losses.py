"""The Lovász-softmax loss against hand computations and against 1 - IoU, which it equals on hard predictions
(Berman et al., CVPR 2018, section 3: the Lovász extension agrees with the set function on the cube's vertices)."""

from __future__ import annotations

import math

import pytest
import torch

from xception.training.losses import lovasz_softmax
from xception.training.segmentation_metrics import confusion_matrix, per_class_iou


def test_a_hand_computed_two_class_example() -> None:
    """Three pixels, labels 1 0 1, P(class 1) = 0.8 0.3 0.4.
    Class 1: errors 0.2 0.3 0.6, sorted 0.6 (fg) 0.3 (bg) 0.2 (fg); the Jaccard loss after each: 1 - 1/2,
    1 - 1/3, 1 - 0/3, increments 1/2 1/6 1/3, loss 0.6/2 + 0.3/6 + 0.2/3 = 5/12.
    Class 0: errors 0.2 0.3 0.6, sorted 0.6 (bg) 0.3 (fg) 0.2 (bg); Jaccard 1 - 1/2, 1 - 0/2, 1 - 0/3, increments
    1/2 1/2 0, loss 0.3 + 0.15 = 9/20. Mean (5/12 + 9/20) / 2 = 13/30."""
    p1 = torch.tensor([0.8, 0.3, 0.4])
    logits = torch.stack([(1 - p1).log(), p1.log()]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[1, 0, 1]]])
    assert lovasz_softmax(logits, labels).item() == pytest.approx(13 / 30, abs=1e-6)


def test_on_hard_predictions_it_is_one_minus_the_iou_of_the_classes_present() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 9, 11))
    labels[labels == 3] = 2  # class 3 absent from the labels: left out of the mean
    labels[0, :2] = 255
    predicted = labels.clone()
    wrong = torch.rand(labels.shape) < 0.3
    predicted[wrong] = torch.randint(0, 4, (int(wrong.sum()),))
    predicted[predicted == 255] = 3
    logits = torch.nn.functional.one_hot(predicted, 4).permute(0, 3, 1, 2).float() * 100.0  # softmax: one-hot
    ious = per_class_iou(confusion_matrix(predicted, labels, 4, ignore_index=255))
    expected = sum(1 - iou for iou in ious[:3]) / 3
    assert lovasz_softmax(logits, labels, ignore_index=255).item() == pytest.approx(expected, abs=1e-5)
    perfect = torch.nn.functional.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 100.0
    assert lovasz_softmax(perfect, labels, ignore_index=255).item() == pytest.approx(0.0, abs=1e-6)


def test_ignored_pixels_change_nothing_and_all_ignored_gives_zero() -> None:
    torch.manual_seed(1)
    labels = torch.randint(0, 3, (2, 5, 6))
    labels[:, :2] = 255
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    changed = logits.detach().clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 6) * 10
    assert lovasz_softmax(changed, labels, ignore_index=255).item() == pytest.approx(
        lovasz_softmax(logits, labels, ignore_index=255).item(), abs=1e-7)
    loss = lovasz_softmax(logits, labels, ignore_index=255)
    loss.backward()
    assert math.isfinite(loss.item()) and logits.grad[:, :, :2].abs().max() == 0
    assert logits.grad[:, :, 2:].abs().max() > 0
    nothing = lovasz_softmax(logits, torch.full_like(labels, 255), ignore_index=255)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_gradient_descent_on_it_lowers_it() -> None:
    """Descending the loss moves the probabilities toward the labels: the loss falls, step after step."""
    torch.manual_seed(2)
    labels = torch.randint(0, 3, (1, 8, 8))
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=100.0)  # the gradient is spread over 64 pixels
    losses = []
    for _ in range(20):
        loss = lovasz_softmax(logits, labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
