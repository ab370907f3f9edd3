"""Segmentation training through the one loop: metrics against hand counts, the ignore index ignored by loss and
metrics, a run that learns, resumes bit for bit after SIGKILL, and starts its backbone from a classification run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from segmentation_samples import write_segmentation_folder
from torch import nn

from xception.errors import InvalidArgumentError
from xception.models import create_model
from xception.models.deeplab import DeepLab
from xception.training import TrainConfig, train
from xception.training.losses import lovasz_softmax
from xception.training.recipes import get_recipe
from xception.training.segmentation import SegmentationTask, build_segmentation_model
from xception.training.segmentation_metrics import (
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
    segment,
)
from xception.training.step import forward_backward
from xception.training.tasks import ClassificationTask

# A narrow DeepLabV3+ so that every run takes seconds; 'same' stem padding keeps a stride-4 map for the decoder.
TINY = {"stem_widths": (8, 16), "stem_padding": "same", "entry_widths": (16, 32), "middle_repeats": 0,
        "exit_widths": (32, 48), "tail_widths": (48, 64), "aspp_channels": 16, "decoder_channels": 16,
        "low_level_channels": 8, "input_scale": 1.0}  # the camvid recipe's half resolution would need larger images
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only spins on a busy CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_segmentation_folder(tmp_path_factory.mktemp("segmentation") / "data", train=48, val=8,
                                     size=(48, 64))


def test_metrics_against_a_hand_computed_confusion_matrix() -> None:
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    # Counted pixels (255 left out): true 0 -> 0 0 0 | 0 -> 1 | 1 -> 1 1 | 2 -> 2 | 2 -> 0.
    expected = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    confusion = confusion_matrix(predicted, labels, 4, ignore_index=255)
    assert torch.equal(confusion[:3, :3], expected) and confusion[3].sum() == confusion[:, 3].sum() == 0
    # IoU = TP / (TP + FP + FN): class 0 2 / (2 + 1 + 1), class 1 2 / (2 + 1), class 2 1 / (1 + 1); class 3 absent
    # from both labels and predictions: undefined, left out of the mean.
    assert per_class_iou(confusion) == pytest.approx([0.5, 2 / 3, 0.5, None])
    assert mean_iou(confusion) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert pixel_accuracy(confusion) == pytest.approx(5 / 7)
    assert mean_iou(torch.zeros(3, 3, dtype=torch.int64)) == 0.0


def test_the_ignore_index_is_ignored_by_the_loss_and_the_metrics() -> None:
    """Changing the predictions at ignored pixels changes neither the loss (nor its gradient elsewhere) nor any
    metric; changing them at a labelled pixel does."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 5, 6))
    labels[:, :2] = 255
    logits = torch.randn(2, 3, 5, 6)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 6) * 10  # only the ignored rows

    def loss_and_metrics(scores: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        model = nn.Identity()
        parameter = scores.clone().requires_grad_(True)
        loss, _ = forward_backward(lambda _: model(parameter), torch.zeros(1), labels, precision="fp32",
                                   scaler=torch.amp.GradScaler("cpu", enabled=False), ignore_index=255)
        return loss.item(), parameter.grad, mean_iou(confusion_matrix(scores.argmax(1), labels, 3, 255))

    loss, grad, miou = loss_and_metrics(logits)
    loss_changed, grad_changed, miou_changed = loss_and_metrics(changed)
    assert loss == loss_changed and miou == miou_changed
    assert torch.equal(grad[:, :, 2:], grad_changed[:, :, 2:]) and (grad_changed[:, :, :2] == 0).all()
    assert loss == pytest.approx(F.cross_entropy(logits[:, :, 2:], labels[:, 2:]).item())
    flipped = logits.clone()
    flipped[0, :, 3, 3] = -flipped[0, :, 3, 3] * 10
    assert loss_and_metrics(flipped)[0] != loss
    # A batch with nothing but ignored pixels has nothing to learn: a zero loss, not 0/0.
    all_ignored, _ = forward_backward(nn.Identity(), logits.requires_grad_(True), torch.full_like(labels, 255),
                                      precision="fp32", scaler=torch.amp.GradScaler("cpu", enabled=False),
                                      ignore_index=255)
    assert all_ignored.item() == 0.0


def test_the_lovasz_term_and_the_output_size_reach_the_loss() -> None:
    """forward_backward adds lovasz_weight x the Lovász-softmax to the cross-entropy, and asks the model for its
    logits at output_size (labels sampled at a stride)."""
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    logits = torch.randn(2, 3, 4, 5)
    asked = []

    def model(images: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        asked.append(output_size)
        return logits.clone().requires_grad_(True)

    def loss(weight: float, output_size: tuple[int, int] | None = None) -> float:
        value, _ = forward_backward(model, torch.zeros(2, 3, 8, 10), labels, precision="fp32",
                                    scaler=torch.amp.GradScaler("cpu", enabled=False), ignore_index=255,
                                    lovasz_weight=weight, output_size=output_size)
        return value.item()

    plain = loss(0.0)
    assert plain == pytest.approx(F.cross_entropy(logits, labels, ignore_index=255).item())
    assert loss(0.5, output_size=(4, 5)) == pytest.approx(
        plain + 0.5 * lovasz_softmax(logits, labels, ignore_index=255).item(), abs=1e-6)
    assert asked == [None, (4, 5)]


def test_flip_inference_of_a_mirror_symmetric_model_is_its_softmax() -> None:
    """A 1x1 convolution sees each pixel alone, so the mirror image's prediction mirrored back is the same: the
    average of the two softmaxes is the softmax, and segment() returns its log."""
    model = nn.Conv2d(3, 4, 1)
    images = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        expected = model(images).log_softmax(1)
        torch.testing.assert_close(segment(model, images, flip=True), expected)
        multi = segment(model, images, scales=(0.5, 1.0, 1.5), flip=True)
    assert multi.shape == (2, 4, 7, 9) and torch.allclose(multi.exp().sum(1), torch.ones(2, 7, 9))


def config(data: Path, output: Path, **options) -> TrainConfig:
    values = {"task": "segmentation", "data": str(data), "output": output, "model_options": TINY, "batch_size": 8,
              "img_size": 48, "precision": "fp32", "augmentation": "basic", "progress": False, **options}
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained_run(data: Path, tmp_path_factory, one_thread) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("segmentation-run")
    # 0.2 at the camvid recipe's reference batch of 4: 0.4 at the batch of 8 here
    return output, train(config(data, output, epochs=6, lr=0.2, class_weights="median-frequency"))


def test_test_time_scales_below_the_models_minimum_are_left_out() -> None:
    """An image too small for a scale of the multi-scale inference still gets the scales it can take."""
    torch.manual_seed(0)
    model = create_model("deeplabv3plus_xception", num_classes=3, **TINY).eval()
    side = model.min_input_size + 2  # 0.75 of it is below the minimum
    images = torch.randn(1, 3, side, side)
    with torch.no_grad():
        with_small_scale = segment(model, images, scales=(0.75, 1.0, 1.25), flip=True)
        without = segment(model, images, scales=(1.0, 1.25), flip=True)
        assert torch.equal(with_small_scale, without)
        assert segment(model, images, scales=(0.5,)).shape == (1, 3, side, side)  # the image at its own size


def test_segmentation_training_writes_everything_and_learns(trained_run) -> None:
    output, result = trained_run
    for name in ("best.safetensors", "best.state.safetensors", "last.safetensors", "metrics.jsonl", "curves.png",
                 "config.json"):
        assert (output / name).is_file(), name
    history = result["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4, 5, 6] and result["steps"] == 6 * (48 // 8)
    assert {"train_pixel_accuracy", "val_miou", "val_pixel_accuracy", "val_per_class_iou"} <= set(history[-1])
    # Predicting the background everywhere scores about 0.28 mIoU (0.84 IoU for one class of three); six short
    # epochs find the boxes too.
    assert result["best_miou"] == max(record["val_miou"] for record in history) > 0.4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    saved = json.loads((output / "config.json").read_text())
    assert (saved["task"], saved["ignore_index"], saved["classes"]) == ("segmentation", 255,
                                                                         ["background", "box", "square"])


def test_resume_after_sigkill_is_bit_identical(data: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "xception", "segment", "train", "--data", str(data), *TINY_ARGS, "--epochs", "2",
               "--batch-size", "8", "--crop-size", "48", "--train-subset", "32", "--val-subset", "4",
               "--deterministic", "--checkpoint-every", "2", "--precision", "fp32"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run([*command, "--output", str(reference)], check=True, capture_output=True, env=ONE_THREAD)

    process = subprocess.Popen([*command, "--output", str(interrupted)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ONE_THREAD)
    state = interrupted / "last.state.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)  # past the first checkpoint (step 2 of 4 in the first epoch), before the run ends
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    subprocess.run([*command, "--output", str(interrupted), "--resume"], check=True, capture_output=True,
                   env=ONE_THREAD)
    expected, actual = load_file(str(reference / "last.safetensors")), load_file(str(interrupted / "last.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_two_processes_match_one_with_the_same_global_batch(data: Path, tmp_path: Path, free_port: str) -> None:
    """torchrun with 2 CPU processes of batch 4 against 1 process of 2 x 4 by gradient accumulation: the same
    weights, and the same validation mIoU from the confusion matrices all-reduced over the ranks' halves of the
    validation set. (No dropout: each rank draws its own masks.)"""
    command = ["segment", "train", "--data", str(data), *TINY_ARGS, "--set", "drop_rate=0", "--epochs", "1",
               "--batch-size", "4", "--crop-size", "48", "--train-subset", "16", "--val-subset", "4",
               "--deterministic", "--precision", "fp32", "--augment", "basic"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "xception", *command, "--grad-accumulation", "2", "--output", str(single)],
                   check=True, capture_output=True, env=ONE_THREAD)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
                    "-m", "xception", *command, "--output", str(ddp)], check=True, capture_output=True, env=ONE_THREAD)
    expected, actual = load_file(str(single / "last.safetensors")), load_file(str(ddp / "last.safetensors"))
    trained = [name for name in expected if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for name in trained:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    records = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (single, ddp)]
    assert records[0]["val_miou"] == records[1]["val_miou"]
    assert records[0]["val_per_class_iou"] == records[1]["val_per_class_iou"]


def test_options_of_the_other_task_and_recipes_of_the_other_task_are_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"mixup \(--mixup\) does not apply to segmentation"):
        config(data, tmp_path, mixup=0.2)
    with pytest.raises(InvalidArgumentError, match=r"ignore_index \(--ignore-index\) does not apply to class"):
        TrainConfig(ignore_index=0)
    with pytest.raises(InvalidArgumentError, match=r"scale_range \(--scale-range\) does not apply to class"):
        TrainConfig(scale_range=(0.5, 2.0))
    with pytest.raises(InvalidArgumentError, match=r"lovasz_weight \(--lovasz-weight\) does not apply to class"):
        TrainConfig(lovasz_weight=1.0)
    with pytest.raises(InvalidArgumentError, match=r"label_stride \(--label-stride\) does not apply to class"):
        TrainConfig(label_stride=2)
    with pytest.raises(InvalidArgumentError, match=r"label_stride \(--label-stride\) must be >= 1"):
        config(data, tmp_path, label_stride=0)
    with pytest.raises(InvalidArgumentError, match=r"lovasz_weight \(--lovasz-weight\) must be >= 0"):
        config(data, tmp_path, lovasz_weight=-1.0)
    with pytest.raises(InvalidArgumentError, match="recipe 'compact' trains classification models"):
        config(data, tmp_path, recipe="compact").resolved_recipe()
    with pytest.raises(InvalidArgumentError, match="'balanced' are for classification"):
        train(config(data, tmp_path, class_weights="balanced", epochs=1))
    with pytest.raises(InvalidArgumentError, match="segmentation trains on a folder"):
        train(TrainConfig(task="segmentation", output=tmp_path, progress=False))
    assert TrainConfig(task="segmentation").recipe == "camvid" and TrainConfig().recipe == "compact"
    classification_model = config(data, tmp_path, model="xception", model_options={})
    with pytest.raises(InvalidArgumentError, match="xception is not a segmentation model: choose one of"):
        build_segmentation_model(classification_model, classification_model.resolved_recipe(), 3, 3)
    segmentation_model = TrainConfig(model="deeplabv3plus_xception")
    with pytest.raises(InvalidArgumentError, match="is a segmentation model: train it with xception segment train"):
        ClassificationTask(segmentation_model).build_model(segmentation_model.resolved_recipe(), 10, 1)


def test_the_scale_range_reaches_the_training_augmentation(data: Path, tmp_path: Path) -> None:
    """--scale-range (a list from the command line or JSON) overrides the recipe's DeepLab 0.5-2.0 in the
    transform of the training set; a bad range is refused when the config is made, and a range with an
    augmentation that does not scale when the data are set up, before any training."""
    assert get_recipe("camvid").scale_range == (0.5, 2.0)
    for scale_range, expected in ((None, (0.5, 2.0)), ([0.75, 1.5], (0.75, 1.5))):
        options = config(data, tmp_path, augmentation="deeplab", scale_range=scale_range)
        recipe = options.resolved_recipe()
        train_set, *_ = SegmentationTask(options).datasets(recipe)
        assert recipe.scale_range == expected and train_set.transform.scale_range == expected
    with pytest.raises(InvalidArgumentError, match=r"needs 0 < LOW <= HIGH, got 2 1"):
        config(data, tmp_path, scale_range=(2, 1))
    basic = config(data, tmp_path, augmentation="basic", scale_range=(0.75, 1.5))
    with pytest.raises(InvalidArgumentError, match="trains with --augment basic, which does not scale"):
        SegmentationTask(basic).datasets(basic.resolved_recipe())


def test_a_run_with_the_lovasz_term_on_a_label_grid_learns(data: Path, tmp_path: Path, monkeypatch,
                                                            one_thread) -> None:
    """--lovasz-weight 1 --label-stride 2: every training forward answers on the 24x24 grid of the 48-pixel crops'
    sampled labels (evaluation at full size), both knobs are recorded with the run, and it learns as the
    cross-entropy run of test_segmentation_training_writes_everything_and_learns does."""
    grids = []
    forward = DeepLab.forward

    def recording(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = forward(self, x, output_size)
        grids.append((self.training, tuple(x.shape[-2:]), tuple(logits.shape[-2:])))
        return logits

    monkeypatch.setattr(DeepLab, "forward", recording)
    result = train(config(data, tmp_path, epochs=6, lr=0.2, lovasz_weight=1.0, label_stride=2))
    training = {(size, out) for is_training, size, out in grids if is_training}
    assert training == {((48, 48), (24, 24))}
    assert all(size == out for is_training, size, out in grids if not is_training)
    assert result["best_miou"] > 0.4 and result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    saved = json.loads((tmp_path / "config.json").read_text())["recipe"]
    assert (saved["lovasz_weight"], saved["label_stride"]) == (1.0, 2)


def test_the_backbone_starts_from_a_classification_run(tmp_path: Path) -> None:
    """A classification run folder: its best weights go into the backbone, its architecture too; its classifier
    does not. (A weights file saved by save_weights is what a run's best.safetensors is.)"""
    import xception

    backbone_options = {key: TINY[key] for key in ("stem_widths", "stem_padding", "entry_widths", "middle_repeats",
                                                   "exit_widths", "tail_widths")}
    classifier = create_model("xception", num_classes=5, **backbone_options)
    run = tmp_path / "classification-run"
    xception.save_weights(classifier, run / "best.safetensors")
    head_only = {key: value for key, value in TINY.items() if key not in backbone_options}
    segmentation = config(tmp_path, tmp_path / "out", model_options=head_only, backbone_weights=str(run))
    model = build_segmentation_model(segmentation, segmentation.resolved_recipe(), num_classes=3, in_chans=3)
    backbone = model.backbone.state_dict()
    shared = [key for key in classifier.state_dict() if not key.startswith("head.")]
    assert shared and all(torch.equal(backbone[key], classifier.state_dict()[key]) for key in shared)
    wrong = config(tmp_path, tmp_path / "out", model="deeplabv3plus_xception65", backbone_weights=str(run),
                   model_options={})
    with pytest.raises(InvalidArgumentError, match="holds a xception run but deeplabv3plus_xception65's backbone"):
        build_segmentation_model(wrong, wrong.resolved_recipe(), num_classes=3, in_chans=3)


def test_a_segmentation_run_fine_tunes_whole_on_other_classes(trained_run, data: Path, tmp_path: Path) -> None:
    """--weights takes a segmentation run whole: its architecture (a given --output-stride may change the stride,
    which holds no weights), every weight, and for another class count a new classifier only."""
    import xception

    run, _ = trained_run
    trained = load_file(run / "best.safetensors")
    same = config(data, tmp_path / "same", weights=str(run), model_options={})  # no TINY: the run brings it
    model = build_segmentation_model(same, same.resolved_recipe(), num_classes=3, in_chans=3)
    assert model.input_scale == 1.0 and model.output_stride == 16
    assert all(torch.equal(tensor, trained[key]) for key, tensor in model.state_dict().items())

    other = config(data, tmp_path / "other", weights=str(run), model_options={}, output_stride=8)
    model = build_segmentation_model(other, other.resolved_recipe(), num_classes=5, in_chans=3)
    assert model.output_stride == 8 and model.classifier.out_channels == 5
    kept = [key for key in trained if not key.startswith("classifier.")]
    assert kept and all(torch.equal(model.state_dict()[key], trained[key]) for key in kept)
    assert not torch.equal(model.classifier.weight[:3], trained["classifier.weight"])  # new, not a slice

    # A bare weight file goes into the recipe's model (the TINY options here).
    file = config(data, tmp_path / "file", weights=str(run / "best.safetensors"))
    model = build_segmentation_model(file, file.resolved_recipe(), num_classes=3, in_chans=3)
    assert all(torch.equal(tensor, trained[key]) for key, tensor in model.state_dict().items())

    classifier_run = tmp_path / "classification-run"
    xception.save_weights(create_model("xception", num_classes=5, stem_widths=(8, 16)),
                          classifier_run / "best.safetensors")
    wrong = config(data, tmp_path / "wrong", weights=str(classifier_run), model_options={})
    with pytest.raises(InvalidArgumentError, match="a classification model, not a segmentation model: give"):
        build_segmentation_model(wrong, wrong.resolved_recipe(), num_classes=3, in_chans=3)
    into_classifier = config(data, tmp_path / "into", weights=str(run / "best.safetensors"), model="xception",
                             model_options={})
    with pytest.raises(InvalidArgumentError, match="xception is a classification model, not a segmentation"):
        build_segmentation_model(into_classifier, into_classifier.resolved_recipe(), num_classes=3, in_chans=3)
    registered = config(data, tmp_path / "registered", weights="tf_in1k")
    with pytest.raises(InvalidArgumentError, match="classification weights: give them as --backbone-weights"):
        build_segmentation_model(registered, registered.resolved_recipe(), num_classes=3, in_chans=3)
    both = config(data, tmp_path / "both", weights=str(run), backbone_weights=str(classifier_run))
    with pytest.raises(InvalidArgumentError, match="not both"):
        build_segmentation_model(both, both.resolved_recipe(), num_classes=3, in_chans=3)
