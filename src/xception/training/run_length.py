"""How a run fits its data: the batch of a training set smaller than a few batches, and the epochs a recipe's floor
in optimizer steps asks for. Both are decided from the data's size alone, so a resumed run decides the same, and
both are said at the start and recorded in config.json."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from ..errors import InvalidArgumentError
from .recipes import Recipe

log = logging.getLogger("xception.train")

# A set this small gets a batch that gives at least this many optimizer steps an epoch (where the recipe's batch
# would give fewer): one or two steps an epoch leave the optimizer a handful of updates in the whole run.
MIN_STEPS_PER_EPOCH = 4


@dataclass(frozen=True)
class RunLength:
    """The steps of a run as its data and recipe make them: ``config.json``'s ``steps``."""

    per_epoch: int
    epochs: int
    head: int  # the first steps, which train the classifier alone
    warmup: int  # the first steps, whose learning rate rises linearly from 0

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs

    def to_json(self) -> dict[str, int]:
        return {"per_epoch": self.per_epoch, "epochs": self.epochs, "total": self.total, "head": self.head,
                "warmup": self.warmup}


def fit_batch(recipe: Recipe, train_size: int, *, explicit: bool, accumulation: int, world_size: int) -> Recipe:
    """The recipe with its batch capped so that ``train_size`` images (all ranks') make
    :data:`MIN_STEPS_PER_EPOCH` optimizer steps, where the batch is the recipe's (``explicit``: the user's, which
    stays; a set smaller than one global batch is then refused). The global batch stays batch x accumulation x
    ranks."""
    per_batch = accumulation * world_size  # images a step takes per image of --batch-size
    global_batch = recipe.batch_size * per_batch
    if train_size >= MIN_STEPS_PER_EPOCH * global_batch or (explicit and train_size >= global_batch):
        return recipe
    capped = max(1, train_size // (MIN_STEPS_PER_EPOCH * per_batch)) if train_size >= per_batch else 0
    if explicit or capped == 0:
        remedy = "--batch-size" if capped else "--batch-size or --grad-accumulation, or use fewer processes"
        raise InvalidArgumentError(f"the training set ({train_size} images) is smaller than one global batch "
                                   f"({global_batch} = --batch-size x --grad-accumulation x processes): lower "
                                   + remedy)
    log.info("the training set (%d images) is smaller than %d batches of %d: batch %d, for %d steps an epoch "
             "(--batch-size to choose another)", train_size, MIN_STEPS_PER_EPOCH, recipe.batch_size, capped,
             train_size // (capped * per_batch))
    return replace(recipe, batch_size=capped)


def fit_epochs(recipe: Recipe, steps_per_epoch: int, *, explicit: bool) -> tuple[Recipe, RunLength]:
    """The recipe with enough epochs for its ``min_steps`` and its classifier-alone phase (unless the epochs are the
    user's, ``explicit``), and the run's length in steps."""
    if steps_per_epoch == 0:  # fit_batch leaves at least one global batch; a rank's shard could still fall short
        raise InvalidArgumentError("the training set gives no complete global batch to every process: lower "
                                   "--batch-size or --grad-accumulation, or use fewer processes")
    epochs = recipe.epochs
    if not explicit:
        needed = max(recipe.min_steps, recipe.head_steps + 1 if recipe.head_steps else 0)
        epochs = max(epochs, math.ceil(needed / steps_per_epoch))
        if epochs != recipe.epochs:
            log.info("%d epochs of %d steps: the %s recipe runs at least %d steps", epochs, steps_per_epoch,
                     recipe.name, needed)
    length = RunLength(steps_per_epoch, epochs, min(recipe.head_steps, steps_per_epoch * epochs),
                       math.ceil(recipe.warmup_length(steps_per_epoch)))
    if recipe.head_steps >= length.total:
        log.warning("the run's %d steps all train the classifier alone (the recipe's head phase is %d steps): "
                    "more --epochs, or a smaller --head-steps, trains the rest too", length.total, recipe.head_steps)
    return replace(recipe, epochs=epochs), length
