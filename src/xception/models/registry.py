"""The model registry: ``create_model`` and ``list_models``."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .backbone import FeatureExtractor, XceptionBase

# The family, each name with the module and builder that make it. Builders are imported when a model is built, so
# that listing the models (``xception --help`` does, for its choices) imports no torch.
MODELS: dict[str, str] = {
    "xception": "xception:xception",
    "xception41": "aligned:xception41",
    "xception65": "aligned:xception65",
    "xception71": "aligned:xception71",
    "xception41p": "aligned:xception41p",
    "xception65p": "aligned:xception65p",
}

# Networks the paper compares Xception with, built here so that they train, checkpoint and evaluate like the
# family (``xception experiment inception``). Not of the family: create_model builds them, list_models and
# ``xception models`` leave them out, and they have no feature-map API.
BASELINES: dict[str, str] = {
    "inception_v3_compact": "inception:inception_v3_compact",
}


def _builder(name: str) -> Callable[..., nn.Module]:
    module, function = (MODELS.get(name) or BASELINES[name]).split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def list_models() -> list[str]:
    """The Xception family's names, which :func:`create_model` accepts (it also builds the :data:`BASELINES`)."""
    return sorted(MODELS)


def create_model(name: str, *, weights: str | Path | None = None, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 output_stride: int = 32, multi_grid: tuple[int, ...] | None = None, features_only: bool = False,
                 out_indices: tuple[int, ...] | list[int] | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **config: Any) -> XceptionBase | FeatureExtractor:
    """Build a registered model, optionally with weights (or one of the :data:`BASELINES`, without).

    Args:
        name: one of :func:`list_models`.
        weights: a registered weights name (see :func:`xception.list_weights`, e.g. ``"imagenet"``), or the
            path of a weight file: Keras HDF5, timm/Cadene state dict (.pth), or safetensors.
        num_classes: classifier outputs; 0 returns pooled features.
        in_chans: input channels. Registered weights adapt their first convolution to it.
        global_pool: ``"avg"``, ``"max"`` or ``""`` (no pooling: the final feature map; needs num_classes=0).
        drop_rate: dropout before the classifier, active in training mode (the paper used 0.5 on ImageNet).
        drop_path_rate: stochastic depth of the last residual block, rising linearly from 0 at the first.
        output_stride: 32, 16 or 8: later strides become dilation (DeepLab); weights load unchanged.
        multi_grid: dilation multipliers for the last block's separable convolutions, e.g. (1, 2, 4).
        features_only: return a :class:`~xception.models.backbone.FeatureExtractor` giving the feature maps
            ``out_indices`` (default all; see its ``feature_info``) instead of logits.
        device, dtype: where and in which precision to create the parameters.
        **config: architecture knobs of the model (for "xception", see :class:`XceptionConfig`).
    """
    if name not in MODELS and name not in BASELINES:
        raise InvalidArgumentError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    if features_only and name in BASELINES:
        raise InvalidArgumentError(f"{name} is a baseline for comparisons and has no feature-map API (features_only)")
    if features_only:
        num_classes, global_pool = 0, ""
    elif out_indices is not None:
        raise InvalidArgumentError("out_indices needs features_only=True")
    import torch

    from ..weights import load_weights
    from .backbone import FeatureExtractor

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _builder(name)(num_classes=num_classes, in_chans=in_chans, global_pool=global_pool, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, output_stride=output_stride, multi_grid=multi_grid, **config)
    if dtype is not None:
        model.to(dtype=dtype)
    if weights is not None:
        load_weights(model, weights)
    return FeatureExtractor(model, out_indices) if features_only else model
