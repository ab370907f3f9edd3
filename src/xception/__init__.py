"""xception: the Xception network and the depthwise separable convolutions around it, exact to the paper."""

from .aligned import XceptionAligned
from .backbone import BlockSpec, FeatureExtractor, XceptionBase
from .deploy import export_onnx, fold_batchnorm, optimize_for_inference
from .errors import WeightFileError, XceptionError
from .layers import Conv2dSame, MaxPool2dSame, SeparableConv2d, SpectrumConv2d, tf_same_padding
from .models import Xception, XceptionConfig
from .registry import create_model, list_models
from .weights import Weights, get_weights, list_weights, load_weights, save_weights

__version__ = "0.1.0"

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
    "create_model",
    "export_onnx",
    "fold_batchnorm",
    "get_weights",
    "list_models",
    "list_weights",
    "load_weights",
    "optimize_for_inference",
    "save_weights",
    "tf_same_padding",
]
