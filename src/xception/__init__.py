"""xception: the Xception network and the depthwise separable convolutions around it, exact to the paper.

The public names below are imported on first use (PEP 562), so that ``import xception`` and the command line's
``--help`` start without loading torch; ``xception.create_model`` and the rest behave as plain attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports
from .version import __version__ as __version__  # re-exported: xception.__version__

# Each public name and the module that defines it.
_EXPORTS = {
    "BlockSpec": "models.backbone",
    "FeatureExtractor": "models.backbone",
    "XceptionBase": "models.backbone",
    "Xception": "models.xception",
    "XceptionConfig": "models.xception",
    "XceptionAligned": "models.aligned",
    "create_model": "models.registry",
    "list_models": "models.registry",
    "Conv2dSame": "layers",
    "MaxPool2dSame": "layers",
    "SeparableConv2d": "layers",
    "SpectrumConv2d": "layers",
    "tf_same_padding": "layers",
    "WeightFileError": "errors",
    "XceptionError": "errors",
    "Weights": "weights",
    "get_weights": "weights",
    "list_weights": "weights",
    "load_weights": "weights",
    "save_weights": "weights",
    "save_pretrained": "hub",
    "from_pretrained": "hub",
    "push_to_hub": "hub",
    "export_onnx": "deploy",
    "fold_batchnorm": "deploy",
    "optimize_for_inference": "deploy",
    "load_deployed": "deploy",
    "choose_deployment": "benchmark.selection",
}

__all__ = [
    "BlockSpec",
    "Conv2dSame",
    "FeatureExtractor",
    "MaxPool2dSame",
    "SeparableConv2d",
    "SpectrumConv2d",
    "WeightFileError",
    "Weights",
    "Xception",
    "XceptionAligned",
    "XceptionBase",
    "XceptionConfig",
    "XceptionError",
    "choose_deployment",
    "create_model",
    "export_onnx",
    "fold_batchnorm",
    "from_pretrained",
    "get_weights",
    "list_models",
    "list_weights",
    "load_deployed",
    "load_weights",
    "optimize_for_inference",
    "push_to_hub",
    "save_pretrained",
    "save_weights",
    "tf_same_padding",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .benchmark.selection import choose_deployment
    from .deploy import export_onnx, fold_batchnorm, load_deployed, optimize_for_inference
    from .errors import WeightFileError, XceptionError
    from .hub import from_pretrained, push_to_hub, save_pretrained
    from .layers import Conv2dSame, MaxPool2dSame, SeparableConv2d, SpectrumConv2d, tf_same_padding
    from .models.aligned import XceptionAligned
    from .models.backbone import BlockSpec, FeatureExtractor, XceptionBase
    from .models.registry import create_model, list_models
    from .models.xception import Xception, XceptionConfig
    from .weights import Weights, get_weights, list_weights, load_weights, save_weights
