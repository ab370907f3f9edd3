"""ROC AUC, equal error rate and balanced accuracy against scikit-learn, and as evaluate() and `xception eval`
report them."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader

from xception.cli import main
from xception.data import collate_skipping
from xception.training import metrics as metrics_module
from xception.training.metrics import balanced_accuracy, equal_error_rate, evaluate, roc_auc

# Tied scores across the classes (0.8, 0.4) and within one (0.1).
TIED_SCORES = [0.9, 0.8, 0.8, 0.4, 0.4, 0.3, 0.1, 0.1, 0.8, 0.4]
TIED_LABELS = [1, 1, 0, 1, 0, 0, 0, 0, 1, 1]


def sklearn_eer(scores: Any, labels: Any, drop_intermediate: bool) -> float:
    """The EER on scikit-learn's ROC curve by the convention equal_error_rate documents: FNR - FPR crosses zero
    between two curve points, interpolated linearly along that segment."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
    fnr = 1 - tpr
    for i in range(1, len(fpr)):
        before, after = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
        if after <= 0:
            if after == 0:
                return float(fpr[i])
            fraction = before / (before - after)
            crossing_fpr = fpr[i - 1] + fraction * (fpr[i] - fpr[i - 1])
            crossing_fnr = fnr[i - 1] + fraction * (fnr[i] - fnr[i - 1])
            assert crossing_fpr == pytest.approx(crossing_fnr)
            return float(crossing_fpr)
    raise AssertionError("a ROC curve ends at FPR 1, FNR 0")


def random_case(seed: int, size: int, positive_share: float, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < positive_share).astype(np.int64)
    labels[:2] = [0, 1]  # both classes, whatever the draw
    scores = rng.normal(size=size) + labels  # positives score higher on average: a realistic, imperfect model
    if decimals is not None:
        scores = scores.round(decimals)  # coarse scores: many ties, across the classes too
    return scores, labels


def test_hand_computed_auc_and_eer_with_ties():
    scores, labels = [0.9, 0.8, 0.8, 0.4, 0.3, 0.1], [1, 1, 0, 1, 0, 0]
    # Of the 9 positive-negative pairs the positives win 7 and tie 1 (0.8 against 0.8).
    assert roc_auc(scores, labels) == pytest.approx(7.5 / 9)
    # ROC points (FPR, TPR): (0, 0), (0, 1/3), (1/3, 2/3): FPR = FNR = 1/3 at the third, no interpolation.
    assert equal_error_rate(scores, labels) == pytest.approx(1 / 3)


def test_auc_and_eer_of_separated_inverted_and_uninformative_scores():
    labels = [0, 0, 1, 1]
    assert roc_auc([0.1, 0.2, 0.3, 0.4], labels) == 1 and equal_error_rate([0.1, 0.2, 0.3, 0.4], labels) == 0
    assert roc_auc([0.4, 0.3, 0.2, 0.1], labels) == 0 and equal_error_rate([0.4, 0.3, 0.2, 0.1], labels) == 1
    assert roc_auc([0.5] * 4, labels) == 0.5 and equal_error_rate([0.5] * 4, labels) == 0.5


@pytest.mark.parametrize("drop_intermediate", [False, True])
def test_auc_and_eer_match_sklearn_on_the_tied_fixture(drop_intermediate: bool):
    assert roc_auc(TIED_SCORES, TIED_LABELS) == pytest.approx(roc_auc_score(TIED_LABELS, TIED_SCORES), abs=1e-12)
    assert equal_error_rate(TIED_SCORES, TIED_LABELS) == pytest.approx(
        sklearn_eer(TIED_SCORES, TIED_LABELS, drop_intermediate), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("size", "positive_share", "decimals"),
                         [(7, 0.5, None), (200, 0.5, None), (300, 0.1, None), (500, 0.3, 1)])
def test_auc_and_eer_match_sklearn_on_random_scores(seed: int, size: int, positive_share: float,
                                                    decimals: int | None):
    scores, labels = random_case(seed, size, positive_share, decimals)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    expected_eer = sklearn_eer(scores, labels, drop_intermediate=False)
    assert equal_error_rate(scores, labels) == pytest.approx(expected_eer, abs=1e-12)
    assert expected_eer == pytest.approx(sklearn_eer(scores, labels, drop_intermediate=True), abs=1e-12)
    # Tensors, float32 and labels as booleans give the same values as lists of Python numbers.
    as_tensors = torch.tensor(scores, dtype=torch.float32), torch.tensor(labels).bool()
    assert roc_auc(*as_tensors) == pytest.approx(roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], []])
def test_auc_and_eer_are_none_with_one_class(labels: list[int]):
    scores = [0.2, 0.5, 0.5][:len(labels)]
    assert roc_auc(scores, labels) is None and equal_error_rate(scores, labels) is None


def test_scores_and_labels_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])


def test_balanced_accuracy_on_a_hand_computed_confusion_matrix():
    # Rows: true classes. Class 2 has no samples and is left out of the mean, not counted as recall 0.
    confusion = torch.tensor([[8, 2, 0, 0],
                              [1, 3, 0, 0],
                              [0, 0, 0, 0],
                              [0, 5, 0, 5]])
    assert balanced_accuracy(confusion) == pytest.approx((8 / 10 + 3 / 4 + 5 / 10) / 3)
    true, predicted = np.nonzero(confusion.numpy())
    counts = confusion.numpy()[true, predicted]
    y_true, y_pred = np.repeat(true, counts), np.repeat(predicted, counts)
    assert balanced_accuracy(confusion) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert balanced_accuracy(torch.zeros(3, 3, dtype=torch.int64)) == 0.0


class FixedLogits(nn.Module):
    """A model whose 'image' is the sample's index and whose output is that sample's fixed logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.long()]


def loader_of(indices: list[int], labels: torch.Tensor, unreadable: Collection[int] = ()) -> DataLoader:
    """Batches of 4 in evaluate's (images, labels, number skipped) format; ``unreadable`` samples are None, as
    the datasets give undecodable files."""
    samples = [None if i in unreadable else (torch.tensor(float(i)), int(labels[i])) for i in indices]
    return DataLoader(samples, batch_size=4, collate_fn=collate_skipping)


def binary_case(size: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (size,), generator=generator)
    labels[:2] = torch.tensor([0, 1])
    logits = torch.randn(size, 2, generator=generator)
    logits[:, 1] += labels  # informative but imperfect
    logits[5] = logits[6]  # a tie between two samples
    return logits, labels


def test_evaluate_reports_balanced_accuracy_auc_and_eer_of_class_1_probability():
    logits, labels = binary_case()
    unreadable = {8, 9, 10, 11, 20}  # a whole batch of them (8-11), which evaluate skips
    kept = torch.tensor([i for i in range(len(labels)) if i not in unreadable])
    result = evaluate(FixedLogits(logits), loader_of(list(range(len(labels))), labels, unreadable), 2,
                      torch.device("cpu"))
    probability = logits[kept].softmax(1)[:, 1]
    assert result["samples"] == len(kept) and result["skipped"] == len(unreadable)
    assert result["roc_auc"] == pytest.approx(roc_auc(probability, labels[kept]), abs=1e-12)
    assert result["eer"] == pytest.approx(equal_error_rate(probability, labels[kept]), abs=1e-12)
    assert result["roc_auc"] == pytest.approx(roc_auc_score(labels[kept].numpy(), probability.numpy()), abs=1e-12)
    predicted = logits[kept].argmax(1)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels[kept], predicted))
    assert result["top1"] == pytest.approx(float((predicted == labels[kept]).double().mean()))


def test_evaluate_ranks_confident_predictions_that_float32_softmax_rounds_to_one():
    # Both positives (margins 30, 40) outrank every negative (20, -1), but float32 softmax gives class 1
    # probability 1.0 at all three large margins: ranked by it, the ties would halve two of the four pairs.
    logits = torch.tensor([[0.0, 30.0], [0.0, 40.0], [0.0, 20.0], [0.0, -1.0]])
    labels = torch.tensor([1, 1, 0, 0])
    assert roc_auc(logits.softmax(1)[:, 1], labels) == 0.75
    result = evaluate(FixedLogits(logits), loader_of(list(range(4)), labels), 2, torch.device("cpu"))
    assert result["roc_auc"] == 1 and result["eer"] == 0


def test_evaluate_with_one_class_reports_null_auc_and_eer():
    logits = torch.randn(6, 2)
    labels = torch.ones(6, dtype=torch.int64)
    result = evaluate(FixedLogits(logits), loader_of(list(range(6)), labels), 2, torch.device("cpu"))
    assert result["roc_auc"] is None and result["eer"] is None
    assert json.loads(json.dumps(result))["eer"] is None
    assert result["balanced_accuracy"] == result["top1"]  # one class present: its recall is both


def test_evaluate_of_more_classes_reports_balanced_accuracy_only():
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 12 + [1] * 3 + [2] * 1 + [3] * 2)  # imbalanced, and class 4 absent
    logits = torch.randn(len(labels), 5, generator=generator)
    logits[torch.arange(0, len(labels), 2), labels[::2]] += 3  # every other sample right for sure
    logits[:, 4] -= 10  # never predicted either: scikit-learn warns about a predicted class with no samples
    result = evaluate(FixedLogits(logits), loader_of(list(range(len(labels))), labels), 5, torch.device("cpu"))
    assert "roc_auc" not in result and "eer" not in result
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


class ThreadedCollectives:
    """torch.distributed's all_reduce and all_gather for ranks that are threads of this process: the ranks'
    evaluations meet at these calls as processes would, without the seconds that starting processes take. Like
    the real all_gather it refuses tensors of different shapes."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.local = threading.local()

    def exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # no rank writes its next value before every rank has read this one
        return values

    def all_reduce(self, tensor: torch.Tensor) -> None:
        tensor.copy_(torch.stack(self.exchange(tensor)).sum(0))

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        values = self.exchange(tensor)
        assert all(value.shape == tensor.shape for value in values), "all_gather needs equal shapes"
        for output, value in zip(outputs, values, strict=True):
            output.copy_(value)


def test_evaluate_gathers_every_rank_samples_for_auc_and_eer(monkeypatch: pytest.MonkeyPatch):
    logits, labels = binary_case(31)
    # Uneven shards (14 and 15 readable samples), as a last partial batch or unreadable files make them.
    shards = [list(range(0, 31, 2)), list(range(1, 31, 2))]
    collectives = ThreadedCollectives(2)
    monkeypatch.setattr(metrics_module, "dist", collectives)
    results: list[dict[str, Any] | None] = [None, None]
    errors: list[BaseException] = []

    def rank(index: int) -> None:
        collectives.local.rank = index
        try:
            results[index] = evaluate(FixedLogits(logits), loader_of(shards[index], labels, {4, 6}), 2,
                                      torch.device("cpu"), world_size=2)
        except BaseException as error:  # re-raised in the test's thread, where pytest sees it
            errors.append(error)
            collectives.barrier.abort()

    threads = [threading.Thread(target=rank, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    monkeypatch.undo()
    single = evaluate(FixedLogits(logits), loader_of(list(range(31)), labels, {4, 6}), 2, torch.device("cpu"))
    assert results[0] == results[1]
    for key in ("roc_auc", "eer", "balanced_accuracy", "top1"):
        assert results[0][key] == pytest.approx(single[key], abs=1e-12), key
    for key in ("samples", "skipped", "confusion"):
        assert results[0][key] == single[key], key


def fake_eval(monkeypatch: pytest.MonkeyPatch, metrics: dict[str, Any], classes: list[str]) -> None:
    """`xception eval` on given metrics: no model, data or figure."""
    from xception import inference

    monkeypatch.setattr(inference, "load_model", lambda *args: None)
    monkeypatch.setattr(inference, "evaluate_on", lambda *args, **kwargs: (metrics, classes))
    monkeypatch.setattr(inference, "plot_confusion", lambda confusion, classes, path: Path(path))


BASE = {"top1": 0.9, "top5": 1.0, "balanced_accuracy": 0.75, "loss": 0.3, "samples": 40, "skipped": 0,
        "per_class": [0.95, 0.55], "confusion": [[19, 1], [9, 11]]}


@pytest.mark.parametrize(("extra", "summary"), [
    ({"roc_auc": 0.875, "eer": 0.125}, "balanced accuracy 0.7500, ROC AUC 0.8750, EER 0.1250 on 40 images"),
    ({"roc_auc": None, "eer": None}, "balanced accuracy 0.7500, ROC AUC n/a (one class), EER n/a (one class) on"),
    ({}, "top-5 1.0000, balanced accuracy 0.7500 on 40 images"),
])
def test_eval_command_prints_balanced_accuracy_and_binary_metrics(monkeypatch, capsys, tmp_path, extra, summary):
    fake_eval(monkeypatch, {**BASE, **extra}, ["cat", "dog"])
    assert main(["eval", "--weights", "imagenet", "--output", str(tmp_path), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert summary in lines[0]
    printed = json.loads(lines[-1])
    assert printed["balanced_accuracy"] == 0.75
    assert {key: printed[key] for key in extra} == extra and "confusion" not in printed
