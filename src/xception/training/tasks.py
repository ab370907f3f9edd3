"""What a run learns: the few parts of the one training loop that depend on the task.

The loop (:mod:`.loop`), its step, checkpoints, exact resume, DDP and precision are the same for every task. A
task supplies the rest: its datasets and how their samples batch, its model, the loss's class weights and ignored
label, how a batch is counted (top-1 of images, accuracy of labelled pixels), the evaluation, the score that picks
the ``best`` checkpoint, and the epoch's record. :func:`task_for` picks it from ``TrainConfig.task``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import collate_skipping
from ..errors import InvalidArgumentError
from ..models.registry import model_task
from .data import build_datasets, class_weights
from .finetune import adopt_weights_preprocessing, build_model
from .metrics import evaluate
from .recipes import Recipe

if TYPE_CHECKING:
    from .config import TrainConfig


class ClassificationTask:
    """One class per image: top-1 picks the best checkpoint."""

    name = "classification"
    score = "top1"  # the evaluation's key that picks the best checkpoint
    accuracy = "top1"  # what the training batches count: the record's train_<accuracy>
    ignore_index = -100  # cross_entropy's default: no class label is ignored

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def adopt_weights_preprocessing(self, recipe: Recipe) -> Recipe:
        """The recipe at the image size (and, from a run, the augmentation and evaluation resize) of the weights it
        starts from, where the config leaves them to the recipe (:func:`.finetune.weights_preprocessing`)."""
        return adopt_weights_preprocessing(self.config, recipe)

    def datasets(self, recipe: Recipe) -> tuple[Any, Any]:
        return build_datasets(self.config, recipe)

    def collate(self) -> Callable:
        return collate_skipping

    def build_model(self, recipe: Recipe, num_classes: int, in_chans: int) -> nn.Module:
        if model_task(recipe.model) != self.name:
            raise InvalidArgumentError(f"{recipe.model} is a segmentation model: train it with xception segment train")
        return build_model(self.config.weights, recipe, self.config.model_options, num_classes, in_chans)

    def class_weights(self, train_set: Any, recipe: Recipe) -> torch.Tensor | None:
        return class_weights(train_set, recipe)

    def evaluate(self, model: nn.Module, loader: Any, num_classes: int, device: torch.device, precision: str,
                 channels_last: bool, world_size: int) -> dict[str, Any]:
        return evaluate(model, loader, num_classes, device, precision, channels_last, world_size=world_size)

    def record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The validation entries of an epoch's record."""
        return {"val_loss": metrics["loss"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
                "val_balanced_accuracy": metrics["balanced_accuracy"]}

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"val top-1 {metrics['top1']:.4f} top-5 {metrics['top5']:.4f}"

    def run_info(self) -> dict[str, Any]:
        """What config.json records besides the config, recipe, classes and channels."""
        return {"task": self.name}


def task_for(config: TrainConfig) -> Any:
    """The task object of ``config.task``."""
    if config.task == "segmentation":
        from .segmentation import SegmentationTask

        return SegmentationTask(config)
    return ClassificationTask(config)
