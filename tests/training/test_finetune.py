"""Fine-tuning from pretrained weights: the head-only phase, frozen BatchNorm statistics, layer-wise learning
rates, and exact resume in either phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import xception
from xception.training import TrainConfig, train
from xception.training import loop as loop_module
from xception.training.finetune import block_depths, parameter_groups, weights_preprocessing
from xception.training.recipes import get_recipe
from xception.training.step import optimizer_step

# A narrow compact network: every run here trains in seconds.
TINY = {"stem_stride": 1, "stem_padding": "same", "stem_widths": (8, 16), "entry_widths": (16, 32),
        "middle_repeats": 1, "exit_widths": (32, 48), "tail_widths": (48, 64), "bn_momentum": 0.1}
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Weights of another task (5 classes), with BatchNorm statistics of their own, so that any change shows."""
    torch.manual_seed(0)
    model = xception.create_model("xception", num_classes=5, in_chans=1, **TINY)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return xception.save_weights(model, tmp_path_factory.mktemp("pretrained") / "five.safetensors")


def finetune(pretrained: Path, output: Path, **overrides) -> dict:
    options = {"data": "fashion-mnist", "recipe": "finetune", "weights": str(pretrained), "model_options": TINY,
               "img_size": 28, "batch_size": 32, "train_subset": 256, "val_subset": 100, "epochs": 2,
               "head_steps": 6, "precision": "fp32", "deterministic": True, "progress": False, "output": output,
               **overrides}
    return train(TrainConfig(**options))


def test_head_only_phase_leaves_everything_but_the_classifier_bitwise_unchanged(pretrained, tmp_path):
    finetune(pretrained, tmp_path, epochs=1, head_steps=8, freeze_bn=False)
    before, after = load_file(pretrained), load_file(tmp_path / "last.safetensors")
    backbone = [name for name in before if not name.startswith("head.")]
    assert backbone and all(torch.equal(before[name], after[name]) for name in backbone)
    assert after["head.predictions.weight"].shape == (10, 64)  # a new classifier for the 10 new classes
    assert not torch.equal(after["head.predictions.weight"], torch.zeros_like(after["head.predictions.weight"]))


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_the_running_statistics(pretrained, tmp_path, freeze_bn: bool):
    finetune(pretrained, tmp_path, freeze_bn=freeze_bn)
    before, after = load_file(pretrained), load_file(tmp_path / "last.safetensors")
    statistics = [name for name in before if name.endswith(STATISTICS)]
    weights = [name for name in before if name.endswith("weight") and not name.startswith("head.")]
    assert not all(torch.equal(before[name], after[name]) for name in weights)  # the backbone trained
    unchanged = all(torch.equal(before[name], after[name]) for name in statistics)
    assert unchanged == freeze_bn


def test_each_group_learns_at_base_rate_times_decay_to_its_depth():
    model = xception.create_model("xception", num_classes=3, **TINY)
    recipe = get_recipe("finetune", layer_decay=0.5)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe), lr=1.0)
    optimizer_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), lr=0.2)
    depths = block_depths(model)
    blocks = [name for name, _ in model.blocks.named_children()]
    assert depths["head.predictions.weight"] == 0
    assert depths[f"blocks.{blocks[-1]}.layers.sepconv1.depthwise.weight"] == 1
    assert depths["blocks.block1.conv1.weight"] == len(blocks)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert rate[id(parameter)] == pytest.approx(0.2 * 0.5 ** depths[name]), name
    decayed = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decayed[id(model.blocks.block1.conv1.weight)] == recipe.weight_decay
    assert decayed[id(model.blocks.block1.conv1_bn.weight)] == 0.0


# 8 steps an epoch, the first 6 the classifier's alone: stopped in the head-only phase, then in the full one (the
# phases change mid-epoch)
@pytest.mark.parametrize("stop_at", [4, 12])
def test_a_run_interrupted_in_either_phase_resumes_bit_for_bit(pretrained, tmp_path, monkeypatch, stop_at: int):
    finetune(pretrained, tmp_path / "reference")
    original = loop_module.stop_check

    def interrupt(config, run, total_steps, started, mid_epoch):
        return "interrupted" if run.step == stop_at else original(config, run, total_steps, started, mid_epoch)

    monkeypatch.setattr(loop_module, "stop_check", interrupt)
    assert finetune(pretrained, tmp_path / "resumed")["stopped"] == "interrupted"
    monkeypatch.setattr(loop_module, "stop_check", original)
    assert finetune(pretrained, tmp_path / "resumed", resume=True)["stopped"] == "finished"
    expected, actual = load_file(tmp_path / "reference" / "last.safetensors"), load_file(
        tmp_path / "resumed" / "last.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_run_folder_brings_its_architecture(pretrained, tmp_path):
    first = tmp_path / "first"
    finetune(pretrained, first, epochs=1)
    # No model options: the architecture comes from the run's checkpoint.
    result = train(TrainConfig(data="fashion-mnist", recipe="finetune", weights=str(first), img_size=28,
                               batch_size=32, train_subset=128, val_subset=50, epochs=1, head_steps=4,
                               precision="fp32", progress=False, output=tmp_path / "second"))
    assert result["steps"] == 4
    assert load_file(tmp_path / "second" / "last.safetensors")["blocks.block1.conv1.weight"].shape == (8, 1, 3, 3)


def test_a_few_images_of_some_classes_and_eval_on_those_classes(pretrained, tmp_path, capsys):
    from xception.cli import main

    result = finetune(pretrained, tmp_path, classes="Sandal,Shirt,7", train_per_class=32, train_subset=None,
                      val_subset=None, epochs=1)
    assert result["steps"] == 3  # 96 images at 32 a batch
    assert json.loads((tmp_path / "config.json").read_text())["classes"] == ["Sandal", "Shirt", "Sneaker"]
    # eval on the whole test split picks the run's classes out of the data's ten by name
    assert main(["eval", "--checkpoint", str(tmp_path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["samples"] == 3000 and len(metrics["per_class"]) == 3


AUGMENTED = {"augmentation": "randaugment", "mixup": 0.2, "cutmix": 1.0, "random_erasing": 0.25,
             "class_weights": "balanced"}


def test_augmented_run_records_its_options_and_resumes_bit_for_bit(pretrained, tmp_path, monkeypatch):
    """MixUp/CutMix draw from torch's random state and RandAugment from the per-sample seeded one: both are
    reproduced after an interruption."""
    finetune(pretrained, tmp_path / "reference", **AUGMENTED)
    recorded = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert {key: recorded["train"][key] for key in AUGMENTED} == AUGMENTED
    assert {key: recorded["recipe"][key] for key in AUGMENTED} == AUGMENTED
    original = loop_module.stop_check
    monkeypatch.setattr(loop_module, "stop_check", lambda config, run, *rest, **kw: "interrupted" if run.step == 11
                        else original(config, run, *rest, **kw))
    finetune(pretrained, tmp_path / "resumed", **AUGMENTED)
    monkeypatch.setattr(loop_module, "stop_check", original)
    finetune(pretrained, tmp_path / "resumed", resume=True, **AUGMENTED)
    expected, actual = load_file(tmp_path / "reference" / "last.safetensors"), load_file(
        tmp_path / "resumed" / "last.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_balanced_class_weights_follow_the_counts():
    from xception.data import ImageDataset, eval_transform
    from xception.training.data import class_weights

    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    dataset = ImageDataset.in_memory(torch.zeros(10, 4, 4, dtype=torch.uint8), labels, eval_transform(4, 1),
                                     ["a", "b", "c"])
    weights = class_weights(dataset, get_recipe("finetune", class_weights="balanced"))
    torch.testing.assert_close(weights, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert class_weights(dataset, get_recipe("finetune")) is None


def test_registered_weights_bring_their_own_evaluation_preprocessing(tmp_path):
    from PIL import Image

    from xception.data import ClassificationTransform
    from xception.training.data import load_split_datasets

    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / split / name / "0.png")
    config = TrainConfig(data=str(tmp_path), recipe="finetune", weights="imagenet")
    _, val = load_split_datasets(config, config.resolved_recipe())
    assert isinstance(val.transform, ClassificationTransform)
    assert val.transform == xception.get_weights("xception", "imagenet").transforms()
    file_config = TrainConfig(data=str(tmp_path), recipe="finetune", weights=str(tmp_path / "x.safetensors"))
    _, val = load_split_datasets(file_config, file_config.resolved_recipe())
    assert not isinstance(val.transform, ClassificationTransform)  # a file: the recipe's own evaluation transform


def test_a_few_dozen_images_train_at_the_weights_size_with_a_capped_batch_and_the_recipe_s_steps(pretrained,
                                                                                                  tmp_path):
    """Nothing set but the data and a run to start from: the run's image size and augmentation (not the recipe's
    299 pixels and Inception crops), a batch that gives several steps an epoch, and the recipe's floors in steps,
    all recorded in config.json."""
    first = tmp_path / "first"
    train(TrainConfig(data="fashion-mnist", recipe="compact", model_options=TINY, train_subset=64, val_subset=50,
                      epochs=1, batch_size=32, precision="fp32", progress=False, output=first))
    options = {"data": "fashion-mnist", "recipe": "finetune", "weights": str(first), "classes": "5,6",
               "train_per_class": 20, "val_subset": 50, "head_steps": 6, "min_steps": 60, "precision": "fp32",
               "progress": False}
    result = train(TrainConfig(**options, output=tmp_path / "second"))
    recorded = json.loads((tmp_path / "second" / "config.json").read_text())
    recipe = recorded["recipe"]
    assert (recipe["img_size"], recipe["augmentation"], recipe["eval_resize_ratio"]) == (28, "compact", 1.0)
    assert (recipe["batch_size"], recipe["epochs"]) == (10, 15)  # 40 images: 4 steps an epoch, 60 steps
    assert recorded["steps"] == {"per_epoch": 4, "epochs": 15, "total": 60, "head": 6, "warmup": 8}
    assert result["steps"] == 60 and len(result["history"]) == 15

    train(TrainConfig(**options, img_size=32, augmentation="basic", max_steps=1, output=tmp_path / "third"))
    recipe = json.loads((tmp_path / "third" / "config.json").read_text())["recipe"]
    assert (recipe["img_size"], recipe["augmentation"]) == (32, "basic")  # what the user sets wins


def test_weights_say_the_size_they_were_made_at(pretrained, tmp_path):
    run = tmp_path / "run"
    finetune(pretrained, run, epochs=1, img_size=32)
    assert weights_preprocessing(str(run), "xception") == (
        {"img_size": 32, "augmentation": "inception", "eval_resize_ratio": 333 / 299}, f"the run {run}")
    shared = xception.save_pretrained(run, tmp_path / "shared")
    assert weights_preprocessing(str(shared), "xception")[0] == {"img_size": 32}
    assert weights_preprocessing("imagenet", "xception")[0] == {"img_size": 299}  # the registered transform's crop
    assert weights_preprocessing(str(pretrained), "xception") is None  # a bare weight file does not say
