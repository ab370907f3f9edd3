"""``xception convert``: any weight file this library reads -> its own safetensors, for any model of the family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .errors import InvalidArgumentError
from .models import create_model
from .weights import read_safetensors_metadata, read_weights, save_weights


def convert_weights(source: str | Path, destination: str | Path, model: str = "xception") -> tuple[str, nn.Module]:
    """Convert ``source`` into ``destination`` for ``model``, with the class count and input channels read from the
    file; returns the detected format and the model the file was loaded into."""
    source, destination = Path(source), Path(destination)
    if not destination.parent.is_dir():  # checked first: safetensors' own error would be a traceback
        raise InvalidArgumentError(f"cannot write {destination}: the folder {destination.parent} does not exist")
    probe = create_model(model)
    file_format, state = read_weights(source, probe)
    classifier = state.get("head.predictions.weight")
    options: dict[str, Any] = {"num_classes": 0 if classifier is None else classifier.shape[0]}
    first_conv = next(name for name, module in probe.named_modules() if isinstance(module, nn.Conv2d))
    if f"{first_conv}.weight" in state:
        options["in_chans"] = state[f"{first_conv}.weight"].shape[1]
    # Only the paper's network has a numerics option (the aligned models have timm's numerics built in). There,
    # weights trained by the PyTorch ports expect theirs: BN eps 1e-5, symmetric pooling.
    if "numerics" in probe.architecture():
        options["numerics"] = "timm" if file_format.startswith(("timm", "Cadene")) else "keras"
    if file_format == "xception safetensors":  # saved here: keep the architecture (and numerics) it was saved with
        options = json.loads(read_safetensors_metadata(source).get("architecture", "null")) or options
    loaded = create_model(model, weights=source, **options)
    save_weights(loaded, destination)
    return file_format, loaded
