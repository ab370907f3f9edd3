"""Starting from pretrained weights: which model to build, loading it, and what trains when.

Fine-tuning follows the practice the ``finetune`` recipe cites: first the classifier alone on a frozen backbone
(its BatchNorm layers in inference mode, so that a few batches of new data cannot wreck statistics learnt on
millions of images), then the whole network with layer-wise learning-rate decay (the deeper from the classifier,
the smaller the step), optionally with the BatchNorm statistics frozen throughout.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError, WeightFileError
from ..files import read_json
from ..models import create_model
from ..weights import load_weights
from ..weights.download import WeightsUnavailableError, parse_hub_spec
from ..weights.loading import registered_weights
from ..weights.pretrained import is_pretrained_folder, pretrained_folder, read_pretrained
from .checkpoint import read_architecture
from .recipes import Recipe

HEAD = "head."
log = logging.getLogger("xception.train")


def build_model(weights: str | None, recipe: Recipe, model_options: dict[str, Any], num_classes: int,
                in_chans: int) -> nn.Module:
    """The model to train: the recipe's (with ``model_options``), or the architecture that comes with ``weights``
    (a run folder, a save_pretrained folder or Hub repository: see :func:`saved_architecture`); then the pretrained
    ``weights`` loaded into it, the classifier new where the class count differs."""
    name, options = recipe.model, {**recipe.model_options, **model_options}
    saved = saved_architecture(weights) if weights is not None else None
    if saved is not None:
        name, architecture, weights = saved
        # The saved architecture; the data decides the classes and the channels; the recipe the dropout.
        options = {key: value for key, value in architecture.items()
                   if key not in ("num_classes", "in_chans", "drop_rate", "drop_path_rate")}
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, drop_rate=recipe.drop_rate, **options)
    if weights is not None:
        load_weights(model, weights, new_head=True)
    return model


def saved_architecture(weights: str) -> tuple[str, dict[str, Any], str] | None:
    """The model name, architecture and weight file of weights that carry their architecture: a training run
    folder, a folder written by save_pretrained, or such a folder on the Hub (``hf-hub:org/name``); None for
    weights that do not (a registered name, a weight file, a Hub repository of another library)."""
    on_hub = parse_hub_spec(weights) is not None
    if not on_hub and not Path(weights).is_dir():
        return None
    if not on_hub and not is_pretrained_folder(weights):
        name, architecture = read_architecture(Path(weights))  # a training run
        return name, architecture, str(run_weights(Path(weights)))
    try:
        folder = pretrained_folder(weights)
    except WeightsUnavailableError:
        # No config.json there (or no network): the weights go into the recipe's model, and loading them gives
        # the download's own error if they cannot be fetched either.
        return None
    if not is_pretrained_folder(folder):  # e.g. a timm repository: its config.json is timm's
        return None
    config, file = read_pretrained(folder)
    return config.model, config.architecture, str(file)


def weights_preprocessing(weights: str, model: str) -> tuple[dict[str, Any], str] | None:
    """The image size the weights were made at, and from a training run also its augmentation and evaluation
    resize, with where they were read; None for weights that do not say (a bare weight file, a foreign folder)."""
    if parse_hub_spec(weights) is None and Path(weights).is_dir() and not is_pretrained_folder(weights):
        run_config = Path(weights) / "config.json"
        recipe = read_json(run_config).get("recipe", {}) if run_config.is_file() else {}
        settings = {key: recipe[key] for key in ("img_size", "augmentation", "eval_resize_ratio") if key in recipe}
        return (settings, f"the run {weights}") if "img_size" in settings else None
    registered = registered_weights(model, weights)
    if registered is not None:
        crop = registered.transform_config.get("crop_size")
        return ({"img_size": crop}, f"the {model} {weights} weights") if crop else None
    if parse_hub_spec(weights) is None and not is_pretrained_folder(weights):
        return None  # a weight file
    try:
        config, _ = read_pretrained(pretrained_folder(weights))
    except (WeightsUnavailableError, WeightFileError):
        return None  # not this library's folder, or not reachable: loading the weights says why, if it fails
    crop = (config.preprocessing or {}).get("crop_size")
    return ({"img_size": crop}, f"the weights {weights}") if crop else None


def adopt_weights_preprocessing(config: Any, recipe: Recipe) -> Recipe:
    """``recipe`` at the weights' own image size (and a run's augmentation and evaluation resize), where
    ``config`` (a TrainConfig) starts from weights and leaves these to the recipe; said when it changes them."""
    found = weights_preprocessing(config.weights, recipe.model) if config.weights is not None else None
    if found is None:
        return recipe
    settings, source = found
    adopted = {key: value for key, value in settings.items()
               if getattr(config, key, None) is None and value != getattr(recipe, key)}
    if adopted:
        log.info("from %s: %s (the recipe's: %s; set them to choose)", source,
                 ", ".join(f"{key} {value}" for key, value in adopted.items()),
                 ", ".join(f"{key} {getattr(recipe, key)}" for key in adopted))
    return replace(recipe, **adopted)


def run_weights(folder: Path) -> Path:
    """A finished run's weights: its best checkpoint, else its last."""
    for name in ("best.safetensors", "last.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise InvalidArgumentError(f"{folder} is a folder but holds no run's weights (best.safetensors or "
                               "last.safetensors): give a run folder, a weight file or a registered name")


def block_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth in blocks from the classifier: the head 0, the last block 1, ..., the stem deepest."""
    if not isinstance(getattr(model, "blocks", None), nn.Sequential):
        raise InvalidArgumentError(f"layer-wise learning-rate decay needs a model of the Xception family (blocks), "
                                   f"not {type(model).__name__}: leave --layer-decay unset")
    blocks = [name for name, _ in model.blocks.named_children()]
    depths = {}
    for name, _ in model.named_parameters():
        if name.startswith(HEAD):
            depths[name] = 0
        else:
            block = name.split(".")[1]
            depths[name] = len(blocks) - blocks.index(block)
    return depths


def parameter_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay for weights but not for BatchNorm parameters and biases (as Keras's kernel
    regularizers do), and with layer decay one pair of groups per depth, each with its ``lr_scale``."""
    depths = block_depths(model) if recipe.layer_decay else {}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        depth, decayed = depths.get(name, 0), parameter.ndim > 1
        group = groups.setdefault((depth, decayed), {
            "params": [], "weight_decay": recipe.weight_decay if decayed else 0.0,
            "lr_scale": recipe.layer_decay ** depth if recipe.layer_decay else 1.0})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def set_trainable(model: nn.Module, *, head_only: bool, freeze: str | None, freeze_bn: bool) -> None:
    """What trains in this phase (call after ``model.train()``): the classifier alone or everything, minus the
    parameters ``freeze`` matches. BatchNorm layers whose parameters are frozen, and all of them with
    ``freeze_bn``, run in inference mode, so their running statistics stay as they are."""
    pattern = re.compile(freeze) if freeze else None
    for name, parameter in model.named_parameters():
        frozen = (head_only and not name.startswith(HEAD)) or bool(pattern and pattern.search(name))
        parameter.requires_grad_(not frozen)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable = any(p.requires_grad for p in module.parameters(recurse=False))
            if freeze_bn or not trainable:
                module.eval()
