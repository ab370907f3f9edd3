"""Semantic segmentation as a task of the one training loop (see :mod:`.tasks`): the segmentation folder's
datasets, a DeepLab model with its backbone's pretrained weights, cross-entropy that skips the ignore index with
optional median-frequency class weights, and evaluation by mIoU, which picks the ``best`` checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import (
    SegmentationCollate,
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    median_frequency_weights,
)
from ..errors import InvalidArgumentError
from ..models import create_model, list_models
from ..models.registry import model_task
from ..weights import load_weights
from ..weights.download import parse_hub_spec
from .checkpoint import read_architecture
from .finetune import run_weights, saved_architecture
from .recipes import Recipe
from .segmentation_metrics import evaluate_segmentation

if TYPE_CHECKING:
    from .config import TrainConfig

# A classification run's architecture entries that are not the backbone's: its head, its input, its training-time
# regularisers and the stride the DeepLab model sets itself.
NOT_BACKBONE = frozenset({"num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate", "output_stride",
                          "multi_grid"})


def build_segmentation_model(config: TrainConfig, recipe: Recipe, num_classes: int, in_chans: int) -> nn.Module:
    """The recipe's DeepLab model (with ``model_options`` for its backbone and head), its backbone started from
    ``config.backbone_weights``: a registered name, a weight file, or a classification run folder, whose best
    (else last) weights are loaded and whose backbone architecture replaces the options' backbone knobs.
    With ``config.weights`` instead, the whole segmentation model: see :func:`pretrained_segmentation_model`."""
    if config.weights is not None:
        if config.backbone_weights is not None:
            raise InvalidArgumentError("give --weights (a whole segmentation model) or --backbone-weights (a "
                                       "classification backbone), not both")
        return pretrained_segmentation_model(config, recipe, num_classes, in_chans)
    name, options = recipe.model, {**recipe.model_options, **config.model_options}
    if model_task(name) != "segmentation":
        raise InvalidArgumentError(f"{name} is not a segmentation model: choose one of "
                                   f"{', '.join(list_models('segmentation'))} (or train {name} with xception train)")
    weights = config.backbone_weights
    if weights is not None and Path(weights).is_dir():
        weights_file = run_weights(Path(weights))
        run_model, architecture = read_architecture(weights_file)
        backbone = name.partition("_")[2]  # deeplabv3plus_<backbone>, deeplabv3_<backbone>
        if run_model != backbone:
            raise InvalidArgumentError(f"{weights} holds a {run_model} run but {name}'s backbone is {backbone}: use "
                                       f"--model {name.partition('_')[0]}_{run_model}, or another run")
        options = {**options, **{key: value for key, value in architecture.items() if key not in NOT_BACKBONE}}
        weights = str(weights_file)
    return create_model(name, num_classes=num_classes, in_chans=in_chans, output_stride=recipe.output_stride,
                        backbone_weights=weights, **options)


def pretrained_segmentation_model(config: TrainConfig, recipe: Recipe, num_classes: int, in_chans: int,
                                  ) -> nn.Module:
    """Fine-tuning a trained segmentation model: ``config.weights`` is a segmentation run folder or save_pretrained
    folder (its architecture is taken, and an explicit ``--output-stride`` may change its stride, which holds no
    weights), or a weight file for the recipe's model. Everything loads but, for another class count, the final
    1x1 classifier, which starts anew."""
    saved = saved_architecture(config.weights)
    if saved is None and not Path(config.weights).is_file() and parse_hub_spec(config.weights) is None:
        raise InvalidArgumentError(f"--weights {config.weights} is neither a segmentation run, a save_pretrained "
                                   "folder nor a weight file; registered names (tf_in1k, imagenet...) are "
                                   "classification weights: give them as --backbone-weights")
    if saved is None:
        name, options, weights = recipe.model, {**recipe.model_options, **config.model_options}, config.weights
        output_stride = recipe.output_stride
    else:
        name, architecture, weights = saved
        options = {key: value for key, value in architecture.items() if key not in ("num_classes", "in_chans")}
        output_stride = options.pop("output_stride", recipe.output_stride)
        if config.output_stride is not None:
            output_stride = config.output_stride
    if model_task(name) != "segmentation":  # the saved model's, or the recipe's that a bare file goes into
        raise InvalidArgumentError(f"{name} is a classification model, not a segmentation model: give "
                                   "classification weights as --backbone-weights to start a DeepLab model's backbone")
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, output_stride=output_stride, **options)
    load_weights(model, weights, new_head=True)
    return model


class SegmentationTask:
    """One class per pixel: pixels labelled ``ignore_index`` count nowhere, mIoU picks the best checkpoint."""

    name = "segmentation"
    score = "miou"
    accuracy = "pixel_accuracy"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.ignore_index = config.ignore_index

    def adopt_weights_preprocessing(self, recipe: Recipe) -> Recipe:
        """The recipe as it is: a segmentation crop is the recipe's (or --crop-size), whatever the weights."""
        return recipe

    def datasets(self, recipe: Recipe) -> tuple[Any, Any]:
        """Train (augmented, cropped) and val (full resolution) sets, checked before any training."""
        config = self.config
        if config.data == "fashion-mnist":
            raise InvalidArgumentError("segmentation trains on a folder: --data DIR with classes.txt, "
                                       "train/images/<stem>.jpg, train/labels/<stem>.png and val/ alike")
        if config.scale_range is not None and recipe.augmentation != "deeplab":
            raise InvalidArgumentError(f"--scale-range sets the random scale of the deeplab augmentation, but this run "
                                       f"trains with --augment {recipe.augmentation}, which does not scale: drop "
                                       "--scale-range, or use --augment deeplab")
        augmentation = SegmentationTrainTransform(recipe.img_size, self.ignore_index, recipe.augmentation,
                                                  scale_range=recipe.scale_range)
        train = SegmentationDataset.from_folder(config.data, "train", augmentation, ignore_index=self.ignore_index,
                                                seed=config.seed)
        val = SegmentationDataset.from_folder(config.data, "val", SegmentationEvalTransform(),
                                              ignore_index=self.ignore_index)
        if config.train_subset:
            train = train.first(config.train_subset)
        if config.val_subset:
            val = val.first(config.val_subset)
        return train, val

    def collate(self) -> Callable:
        return SegmentationCollate(self.ignore_index)

    def build_model(self, recipe: Recipe, num_classes: int, in_chans: int) -> nn.Module:
        return build_segmentation_model(self.config, recipe, num_classes, in_chans)

    def class_weights(self, train_set: SegmentationDataset, recipe: Recipe) -> torch.Tensor | None:
        if recipe.class_weights is None:
            return None
        if recipe.class_weights != "median-frequency":
            raise InvalidArgumentError(f"class weights {recipe.class_weights!r} are for classification: "
                                       "segmentation takes --class-weights median-frequency")
        return median_frequency_weights(train_set)

    def evaluate(self, model: nn.Module, loader: Any, num_classes: int, device: torch.device, precision: str,
                 channels_last: bool, world_size: int) -> dict[str, Any]:
        return evaluate_segmentation(model, loader, num_classes, device, precision, channels_last, world_size,
                                     ignore_index=self.ignore_index)

    def record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"val_loss": metrics["loss"], "val_miou": metrics["miou"],
                "val_pixel_accuracy": metrics["pixel_accuracy"], "val_per_class_iou": metrics["per_class_iou"]}

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"val mIoU {metrics['miou']:.4f}, pixel accuracy {metrics['pixel_accuracy']:.4f}"

    def run_info(self) -> dict[str, Any]:
        return {"task": self.name, "ignore_index": self.ignore_index}
