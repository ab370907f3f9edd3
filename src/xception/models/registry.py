"""The model registry: ``create_model`` and ``list_models``."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .backbone import FeatureExtractor, XceptionBase
    from .deeplab import DeepLab

# The family's classification networks, each name with the module and builder that make it. Builders are imported
# when a model is built, so that listing the models (``xception --help`` does, for its choices) imports no torch.
MODELS: dict[str, str] = {
    "xception": "xception:xception",
    "xception41": "aligned:xception41",
    "xception65": "aligned:xception65",
    "xception71": "aligned:xception71",
    "xception41p": "aligned:xception41p",
    "xception65p": "aligned:xception65p",
}
BACKBONES = tuple(MODELS)

# Semantic segmentation (Chen et al., ECCV 2018): DeepLabV3+ and, for the ablation, DeepLabV3 without its decoder,
# on every network above, as "module:builder:backbone".
SEGMENTATION_HEADS = ("deeplabv3plus", "deeplabv3")
SEGMENTATION_MODELS = tuple(f"{head}_{backbone}" for head in SEGMENTATION_HEADS for backbone in BACKBONES)
MODELS.update({f"{head}_{backbone}": f"deeplab:{head}:{backbone}"
               for head in SEGMENTATION_HEADS for backbone in BACKBONES})
TASKS = ("classification", "segmentation")

# Networks the paper compares Xception with, built here so that they train, checkpoint and evaluate like the
# family (``xception experiment inception``). Not of the family: create_model builds them, list_models and
# ``xception models`` leave them out, and they have no feature-map API.
BASELINES: dict[str, str] = {
    "inception_v3_compact": "inception:inception_v3_compact",
}

# The dataclasses that declare the models' options, their types and ranges, as "module:class": every builder holds
# its options to its own, and option_problem a value to them all, for the command line's --set.
OPTION_DECLARATIONS = ("options:NetworkOptions", "xception:XceptionConfig", "inception:InceptionOptions",
                       "deeplab:HeadOptions")


def _builder(name: str) -> Callable[..., nn.Module]:
    module, function, *backbone = (MODELS.get(name) or BASELINES[name]).split(":")
    builder = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return partial(builder, backbone=backbone[0]) if backbone else builder


def model_task(name: str) -> str:
    """``"segmentation"`` for the DeepLab models, ``"classification"`` for the others."""
    return "segmentation" if name in SEGMENTATION_MODELS else "classification"


def list_models(task: str | None = None) -> list[str]:
    """The family's names, which :func:`create_model` accepts (it also builds the :data:`BASELINES`): the
    classification networks and the segmentation models on them, or only those of ``task``
    (``"classification"`` or ``"segmentation"``)."""
    if task is not None and task not in TASKS:
        raise InvalidArgumentError(f"task must be one of {TASKS} or None, got {task!r}")
    return sorted(name for name in MODELS if task is None or model_task(name) == task)


def create_model(name: str, *, weights: str | Path | None = None, num_classes: int | None = None, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float | None = None, drop_path_rate: float = 0.0,
                 output_stride: int | None = None, multi_grid: tuple[int, ...] | None = None,
                 features_only: bool = False, out_indices: tuple[int, ...] | list[int] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **config: Any) -> XceptionBase | FeatureExtractor | DeepLab:
    """Build a registered model, optionally with weights (or one of the :data:`BASELINES`, without).

    Args:
        name: one of :func:`list_models`: a classification network (``"xception65"``) or a segmentation model
            (``"deeplabv3plus_xception65"``, ``"deeplabv3_xception65"``).
        weights: a registered weights name (see :func:`xception.list_weights`, e.g. ``"imagenet"``), or the
            path of a weight file: Keras HDF5, timm/Cadene state dict (.pth), or safetensors. A segmentation model
            has no registered weights: its ``weights`` is a file of the whole model, and ``backbone_weights``
            (in ``config``) loads a classification network's weights into its backbone.
        num_classes: classifier outputs (default 1000); 0 returns pooled features. Segmentation: classes per
            pixel (default 21, PASCAL VOC's).
        in_chans: input channels. Registered weights adapt their first convolution to it.
        global_pool: ``"avg"``, ``"max"`` or ``""`` (no pooling: the final feature map; needs num_classes=0).
        drop_rate: dropout before the classifier, active in training mode (default 0; the paper used 0.5 on
            ImageNet). Segmentation: dropout after the ASPP projection (default 0.1, as DeepLab's code).
        drop_path_rate: stochastic depth of the last residual block, rising linearly from 0 at the first.
        output_stride: 32, 16 or 8: later strides become dilation (DeepLab); weights load unchanged. Default 32,
            and 16 for segmentation (the paper's training setting).
        multi_grid: dilation multipliers for the last block's separable convolutions, e.g. (1, 2, 4).
        features_only: return a :class:`~xception.models.backbone.FeatureExtractor` giving the feature maps
            ``out_indices`` (default all; see its ``feature_info``) instead of logits.
        device, dtype: where and in which precision to create the parameters.
        **config: architecture knobs of the model (for "xception", see :class:`XceptionConfig`). Segmentation
            models take their backbone's knobs, the head's (``aspp_channels``, ``atrous_rates``,
            ``decoder_channels``, ``low_level_channels``, ``separable``: see :mod:`xception.models.deeplab`) and
            ``backbone_weights``.
    """
    if name not in MODELS and name not in BASELINES:
        raise InvalidArgumentError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    if features_only and name in BASELINES:
        raise InvalidArgumentError(f"{name} is a baseline for comparisons and has no feature-map API (features_only)")
    segmentation = model_task(name) == "segmentation"
    if segmentation:
        check_segmentation_arguments(name, weights, global_pool, features_only, out_indices)
        # Only what was given: the builder's defaults are the paper's segmentation settings.
        given = {"num_classes": num_classes, "drop_rate": drop_rate, "output_stride": output_stride}
        options = {key: value for key, value in given.items() if value is not None}
    else:
        options = {"num_classes": 1000 if num_classes is None else num_classes, "global_pool": global_pool,
                   "drop_rate": 0.0 if drop_rate is None else drop_rate,
                   "output_stride": 32 if output_stride is None else output_stride}
        if features_only:
            options["num_classes"], options["global_pool"] = 0, ""
        elif out_indices is not None:
            raise InvalidArgumentError("out_indices needs features_only=True")
    import torch

    from ..weights import load_weights
    from .backbone import FeatureExtractor

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _builder(name)(in_chans=in_chans, drop_path_rate=drop_path_rate, multi_grid=multi_grid, **options,
                               **config)
    if dtype is not None:
        model.to(dtype=dtype)
    if weights is not None:
        load_weights(model, weights)
    return FeatureExtractor(model, out_indices) if features_only else model


def option_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the option ``name`` ("must be an integer >= 0, got 'abc'"), where every model
    that has the option refuses it; None where one takes it, and for a name that no model has (building the model
    refuses it then, listing the model's own options). Lets the command line refuse a wrong ``--set`` before it
    loads data or builds a model, naming the flag; imports the networks' modules, hence torch."""
    from .options import value_problem

    problems = []
    for declaration in OPTION_DECLARATIONS:
        module, spec = declaration.split(":")
        declared = getattr(importlib.import_module(f"{__package__}.{module}"), spec)
        if name in {item.name for item in dataclasses.fields(declared)}:
            problem = value_problem(declared, name, value)
            if problem is None:
                return None
            problems.append(problem)
    return problems[0] if problems else None


def check_segmentation_arguments(name: str, weights: str | Path | None, global_pool: str, features_only: bool,
                                 out_indices: tuple[int, ...] | list[int] | None) -> None:
    """Refuse the classification-only arguments for a segmentation model, and registered weights names."""
    if features_only or out_indices is not None or global_pool != "avg":
        raise InvalidArgumentError(f"{name} is a segmentation model: global_pool, features_only and out_indices do "
                                   "not apply (its backbone, model.backbone, gives the feature maps)")
    if weights is not None:
        from ..weights.loading import registered_weights

        try:
            registered_weights(name, weights)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"{name} has no registered weights: weights= takes a weight file of the whole segmentation model; "
                f"for the backbone's pretrained weights pass backbone_weights={str(weights)!r}") from None
