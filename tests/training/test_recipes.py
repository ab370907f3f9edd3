"""The recipes' learning-rate schedules are the sources' (the paper's section 4.3, and this project's compact one)."""

import math

import pytest

from xception.training.recipes import RECIPES, get_recipe


def test_imagenet_paper_decays_by_0_94_every_two_epochs_and_scales_with_the_batch():
    recipe = get_recipe("imagenet-paper")
    assert (recipe.optimizer, recipe.momentum, recipe.weight_decay, recipe.drop_rate) == ("sgd", 0.9, 1e-5, 0.5)
    steps_per_epoch, batch = 100, 32
    assert recipe.learning_rate(0, steps_per_epoch, batch, 10_000) == pytest.approx(0.045)
    assert recipe.learning_rate(199, steps_per_epoch, batch, 10_000) == pytest.approx(0.045)
    assert recipe.learning_rate(200, steps_per_epoch, batch, 10_000) == pytest.approx(0.045 * 0.94)
    assert recipe.learning_rate(0, steps_per_epoch, 64, 10_000) == pytest.approx(0.09)  # linear batch scaling


def test_jft_paper_decays_by_0_9_every_three_million_samples():
    recipe = get_recipe("jft-paper")
    assert (recipe.optimizer, recipe.lr, recipe.drop_rate) == ("rmsprop", 0.001, 0.0)
    step = 3_000_000 // 32
    assert recipe.learning_rate(step - 1, 1000, 32, 10**6) == pytest.approx(0.001)
    assert recipe.learning_rate(step, 1000, 32, 10**6) == pytest.approx(0.001 * 0.9)


def test_compact_warms_up_then_follows_a_cosine_to_zero():
    recipe = get_recipe("compact")
    steps_per_epoch, total = 100, 900
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    assert recipe.learning_rate(0, steps_per_epoch, 128, total) == pytest.approx(0.1 / warmup)
    middle = warmup + (total - warmup) // 2
    assert recipe.learning_rate(middle, steps_per_epoch, 128, total) == pytest.approx(
        0.1 * 0.5 * (1 + math.cos(math.pi * (middle - warmup) / (total - warmup))))
    assert recipe.learning_rate(total, steps_per_epoch, 128, total) == pytest.approx(0.0, abs=1e-12)


def test_no_recipe_hard_codes_a_precision():
    """Every recipe runs at the machine's fastest native precision (xception.precision.choose_precision): bf16 is
    twice as fast as fp32 where it is native and ten times slower where it is not."""
    assert {name: recipe.precision for name, recipe in RECIPES.items()} == dict.fromkeys(RECIPES, "auto")


def test_overrides_and_unknown_names():
    assert get_recipe("compact", epochs=3, lr=None).epochs == 3
    with pytest.raises(ValueError, match="available"):
        get_recipe("nope")
    assert set(RECIPES) == {"imagenet-paper", "jft-paper", "compact", "finetune", "camvid"}


def test_finetune_recipe_names_its_sources_and_phases():
    recipe = RECIPES["finetune"]
    for source in ("keras.io/guides/transfer_learning", "layer_decay", "linear probe"):
        assert source in recipe.source
    assert 0 < recipe.head_steps < recipe.min_steps
    assert recipe.freeze_lr_scale > 1 and 0 < recipe.layer_decay < 1


def test_the_head_only_steps_run_at_their_own_multiple_of_the_schedule():
    recipe = get_recipe("finetune", head_steps=20, freeze_lr_scale=10.0, warmup_steps=0)
    plain = get_recipe("finetune", head_steps=0, warmup_steps=0)
    steps_per_epoch, total, batch = 10, 100, recipe.reference_batch_size
    for step in (0, 5, 19):
        assert recipe.learning_rate(step, steps_per_epoch, batch, total) == pytest.approx(
            10 * plain.learning_rate(step, steps_per_epoch, batch, total))
    for step in (20, 50, 99):
        assert recipe.learning_rate(step, steps_per_epoch, batch, total) == plain.learning_rate(
            step, steps_per_epoch, batch, total)


def test_camvid_follows_deeplabs_poly_schedule_to_zero():
    """DeepLab's "poly" policy: lr x (1 - step / total) ** 0.9 after the warm-up (Chen et al. 2018, section 4)."""
    recipe = get_recipe("camvid")
    assert (recipe.task, recipe.schedule, recipe.poly_power, recipe.output_stride) == ("segmentation", "poly", 0.9, 16)
    assert recipe.model.startswith("deeplabv3plus_") and "DeepLabV3+" in recipe.source
    steps_per_epoch, total, batch = 40, 400, recipe.reference_batch_size
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    for step in (warmup, warmup + 100, total - 1):
        expected = recipe.lr * (1 - (step - warmup) / (total - warmup)) ** 0.9
        assert recipe.learning_rate(step, steps_per_epoch, batch, total) == pytest.approx(expected)
    assert recipe.learning_rate(total, steps_per_epoch, batch, total) == 0.0
