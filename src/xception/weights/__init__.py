"""Pretrained weights: the registered sets, the formats they and users' files come in, and their download.

- :mod:`.registered`: the table of :class:`Weights` (files, checksums, metadata, transforms).
- :mod:`.loading`: loading a registered name or a file into a model, all or nothing; saving.
- :mod:`.formats`: reading any supported file into this library's state-dict names, without touching a model;
  :mod:`.keras_files` reads Keras's formats (the official 2016 files included).
- :mod:`.download`: pinned, cached, verified downloads: plain URLs into torch's cache, Hugging Face Hub files (and
  ``hf-hub:org/name[@revision]`` repositories) into the Hub's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Imported on first use: the table of registered weights (``xception models``) needs no torch.
_EXPORTS = {
    "HubFile": "download", "HubRepo": "download", "WeightFile": "download", "WeightsUnavailableError": "download",
    "fetch": "download", "hub_download": "download", "parse_hub_spec": "download",
    "WeightFileError": "formats", "read_safetensors_metadata": "formats", "read_weights": "formats",
    "load_weights": "loading", "save_weights": "loading", "DEFAULT_WEIGHTS": "registered", "WEIGHTS": "registered",
    "Weights": "registered", "get_weights": "registered", "imagenet_categories": "registered",
    "list_weights": "registered",
}
__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHTS",
    "HubFile",
    "HubRepo",
    "WeightFile",
    "WeightFileError",
    "Weights",
    "WeightsUnavailableError",
    "fetch",
    "get_weights",
    "hub_download",
    "imagenet_categories",
    "list_weights",
    "load_weights",
    "parse_hub_spec",
    "read_safetensors_metadata",
    "read_weights",
    "save_weights",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from .download import HubFile, HubRepo, WeightFile, WeightsUnavailableError, fetch, hub_download, parse_hub_spec
    from .formats import WeightFileError, read_safetensors_metadata, read_weights
    from .loading import load_weights, save_weights
    from .registered import (
        DEFAULT_WEIGHTS,
        WEIGHTS,
        Weights,
        get_weights,
        imagenet_categories,
        list_weights,
    )
