"""Pretrained weights: the registered sets, the formats they and users' files come in, and their download.

- :mod:`.registered`: :class:`Weights` entries (files, checksums, metadata, transforms), loading and saving.
- :mod:`.formats`: reading any supported file into this library's state-dict names, without touching a model;
  :mod:`.keras_files` reads Keras's formats (the official 2016 files included).
- :mod:`.download`: pinned, cached, verified downloads.
"""

from .download import HubFile, WeightFile, WeightsUnavailableError, fetch
from .formats import WeightFileError, read_safetensors_metadata, read_weights
from .registered import (
    DEFAULT_WEIGHTS,
    WEIGHTS,
    Weights,
    get_weights,
    imagenet_categories,
    list_weights,
    load_weights,
    save_weights,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHTS",
    "HubFile",
    "WeightFile",
    "WeightFileError",
    "Weights",
    "WeightsUnavailableError",
    "fetch",
    "get_weights",
    "imagenet_categories",
    "list_weights",
    "load_weights",
    "read_safetensors_metadata",
    "read_weights",
    "save_weights",
]
