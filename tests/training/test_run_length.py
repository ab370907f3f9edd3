"""How a run fits its data: the batch of a small training set and the finetune recipe's floors in optimizer steps,
at the sizes people fine-tune on (a few dozen images) and at large ones."""

from __future__ import annotations

import pytest

from xception.errors import InvalidArgumentError
from xception.training.recipes import get_recipe
from xception.training.run_length import MIN_STEPS_PER_EPOCH, fit_batch, fit_epochs

FINETUNE = get_recipe("finetune")


def fitted(train_size: int, *, batch_explicit: bool = False, epochs_explicit: bool = False, accumulation: int = 1,
           world_size: int = 1, recipe=FINETUNE):
    recipe = fit_batch(recipe, train_size, explicit=batch_explicit, accumulation=accumulation, world_size=world_size)
    steps_per_epoch = train_size // world_size // recipe.batch_size // accumulation
    return fit_epochs(recipe, steps_per_epoch, explicit=epochs_explicit)


@pytest.mark.parametrize("train_size", [50, 125, 500, 5_000, 50_000])
def test_the_head_phase_and_the_run_are_as_many_steps_whatever_the_data_size(train_size: int):
    recipe, length = fitted(train_size)
    assert length.head == FINETUNE.head_steps  # the new classifier gets as many updates from 50 images as from 50,000
    assert length.warmup == FINETUNE.warmup_steps > 0  # and the warm-up as many steps
    assert length.total >= FINETUNE.min_steps and length.total > length.head
    assert length.per_epoch >= MIN_STEPS_PER_EPOCH
    assert recipe.epochs == max(FINETUNE.epochs, -(-FINETUNE.min_steps // length.per_epoch))


def test_a_small_set_gets_a_smaller_batch_and_a_large_one_keeps_the_recipe_s():
    assert fitted(50)[0].batch_size == 50 // MIN_STEPS_PER_EPOCH  # 12: four steps an epoch instead of one
    assert fitted(50_000)[0].batch_size == FINETUNE.batch_size
    # Under torchrun the global batch (batch x accumulation x ranks) is what the cap keeps to several steps.
    recipe, length = fitted(200, accumulation=2, world_size=2)
    assert recipe.batch_size == 200 // (MIN_STEPS_PER_EPOCH * 4) and length.per_epoch == MIN_STEPS_PER_EPOCH


def test_an_explicit_batch_or_epoch_count_wins():
    recipe, length = fitted(50, batch_explicit=True, epochs_explicit=True, recipe=get_recipe("finetune",
                                                                                              batch_size=16))
    assert (recipe.batch_size, recipe.epochs, length.per_epoch) == (16, FINETUNE.epochs, 3)
    with pytest.raises(InvalidArgumentError, match=r"\(50 images\) is smaller than one global batch \(64"):
        fitted(50, batch_explicit=True, recipe=get_recipe("finetune", batch_size=64))
    with pytest.raises(InvalidArgumentError, match="or use fewer processes"):
        fitted(3, world_size=4)
    with pytest.raises(InvalidArgumentError, match="no complete global batch"):
        fit_epochs(FINETUNE, 0, explicit=False)


def test_steps_are_recorded_whole():
    _, length = fitted(500)
    assert length.to_json() == {"per_epoch": 15, "epochs": length.epochs, "total": 15 * length.epochs,
                                "head": FINETUNE.head_steps, "warmup": FINETUNE.warmup_steps}
