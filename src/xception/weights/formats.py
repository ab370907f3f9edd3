"""Reading weight files of every format into this library's state-dict names, without touching a model.

Formats are recognised by their first bytes, never by the file extension:

- Keras: the official ImageNet files (Keras 1), Keras 2/3 legacy HDF5, Keras 3 ``.weights.h5`` and ``.keras``
  archives (all read in :mod:`xception.keras_files`);
- PyTorch state dicts and checkpoints (.pth, .pth.tar): timm ``legacy_xception`` and ``xception_aligned`` (timm
  training checkpoints included), Cadene ``xception`` (both releases), or this library's own;
- safetensors written by :func:`xception.save_weights`.

Each reader returns ``(format description, {name: tensor})``; :func:`xception.weights.load_weights`
checks the result against the model before loading anything.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightFileError
from .keras_files import is_keras_archive, read_keras_file

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
PICKLE_PROTOCOL_2 = b"\x80\x02"
SAFETENSORS_FORMAT = "xception-safetensors"


def detect_format(path: Path) -> str:
    """One of "keras" (HDF5 or a .keras archive), "pytorch" or "safetensors", from the file's first bytes."""
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise WeightFileError(f"weight file {path} is empty")
    if head.startswith(HDF5_SIGNATURE) or (head.startswith(ZIP_SIGNATURE) and is_keras_archive(path)):
        return "keras"
    if head.startswith(ZIP_SIGNATURE) or head.startswith(PICKLE_PROTOCOL_2):
        return "pytorch"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    raise WeightFileError(f"{path} is not a weight file this library reads (Keras HDF5, PyTorch .pth or "
                          f"safetensors): it starts with the bytes {head[:8]!r}")


def read_weights(path: str | Path, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """Read ``path`` into tensors named as in ``model.state_dict()``; ``model`` only supplies the names."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "keras":
        return read_keras_file(path, model)
    if kind == "safetensors":
        return name_state_dict(read_safetensors(path), model, path, "safetensors")
    return name_state_dict(read_pytorch(path), model, path, ".pth")


# --- PyTorch state dicts ------------------------------------------------------------------------

def read_pytorch(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint is data; never run pickled code from it. timm's training checkpoints
        # (model_best.pth.tar, checkpoint-N.pth.tar, written by timm.utils.CheckpointSaver) also hold the run's
        # arguments as an argparse.Namespace, a plain attribute bag: that one type is allowed, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or hostile files
        raise WeightFileError(f"could not read {path} as a PyTorch checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); the file may be truncated, "
                              "corrupt, or contain code rather than tensors") from error
    return unwrap_state_dict(checkpoint, path)


def name_state_dict(state: dict[str, torch.Tensor], model: nn.Module, path: Path,
                    container: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Recognise whose names a state dict uses (this library's, timm's or Cadene's) and rename to ours."""
    keys = list(state)
    if "stem.0.conv.weight" in state:
        return f"timm xception_aligned ({container})", timm_aligned_to_state_dict(state)
    if "conv1.weight" in state and any(re.match(r"block\d+\.rep\.", k) for k in keys):
        return f"{pytorch_port_source(state)} ({container})", timm_to_state_dict(state, model)
    # This library's own names: a classification network's (blocks.) or a segmentation model's (backbone.blocks.).
    if any(k.startswith(("blocks.", "backbone.blocks.")) for k in keys):
        return ("xception safetensors" if container == "safetensors" else "xception state dict (.pth)"), state
    raise WeightFileError(f"{path} is a {container} state dict but not an Xception one (timm legacy_xception or "
                          f"xception_aligned, Cadene xception, or this library's): its keys start {keys[:3]}")


def pytorch_port_source(state: dict[str, torch.Tensor]) -> str:
    """Which file of the PyTorch ports a timm/Cadene-named state dict is. Cadene's first release
    (xception-b5690688.pth) stored the 1x1 pointwise kernels as matrices (its users unsqueeze them, e.g.
    FaceForensics++); the second (xception-43020ad28.pth, which timm's legacy_xception loads) as 4-D kernels.
    Both name the classifier fc; Cadene's model renames it last_linear once loaded, so a state dict saved
    from that model has last_linear."""
    if any(k.endswith("pointwise.weight") and v.dim() == 2 for k, v in state.items()):
        return "Cadene xception-b5690688 (first release, 2-D pointwise kernels)"
    if "last_linear.weight" in state:
        return "Cadene pretrainedmodels xception (last_linear)"
    return "timm legacy_xception / Cadene xception-43020ad28"


def unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightFileError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def timm_to_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm legacy_xception / Cadene names -> ours.

    timm numbers its residual modules block1..block12 (ours block2..block13), lists each module's layers
    as ``rep.<index>`` (separable convs and BNs interleaved with ReLUs and the pool), and calls the last
    module's layers conv3/bn3/conv4/bn4.
    """
    tail = [name for name, _ in model.blocks.named_children()][-1]
    fixed = {"conv1": "blocks.block1.conv1", "bn1": "blocks.block1.conv1_bn", "conv2": "blocks.block1.conv2",
             "bn2": "blocks.block1.conv2_bn", "conv3": f"blocks.{tail}.layers.sepconv1",
             "bn3": f"blocks.{tail}.layers.sepconv1_bn", "conv4": f"blocks.{tail}.layers.sepconv2",
             "bn4": f"blocks.{tail}.layers.sepconv2_bn", "fc": "head.predictions",
             "last_linear": "head.predictions"}
    # rep indices per block, in order, split into separable convs and BNs
    reps: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"sep": [], "bn": []})
    for key in state:
        match = re.match(r"(block\d+)\.rep\.(\d+)\.(.+)", key)
        if match:
            block, index, rest = match.group(1), int(match.group(2)), match.group(3)
            kind = "sep" if rest.startswith(("conv1.", "pointwise.")) else "bn"
            if index not in reps[block][kind]:
                reps[block][kind].append(index)
    names: dict[str, str] = {}
    for block, kinds in reps.items():
        ours = f"blocks.block{int(block[5:]) + 1}"
        for number, index in enumerate(sorted(kinds["sep"]), start=1):
            names[f"{block}.rep.{index}."] = f"{ours}.layers.sepconv{number}."
        for number, index in enumerate(sorted(kinds["bn"]), start=1):
            names[f"{block}.rep.{index}."] = f"{ours}.layers.sepconv{number}_bn."
        names[f"{block}.skip."] = f"{ours}.shortcut.conv."
        names[f"{block}.skipbn."] = f"{ours}.shortcut.bn."
    for theirs, ours in fixed.items():
        names[f"{theirs}."] = f"{ours}."

    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            raise WeightFileError(f"unexpected tensor {key!r} in a timm/Cadene Xception state dict")
        rest = key[len(prefix):].replace("conv1.weight", "depthwise.weight")
        if rest == "pointwise.weight" and value.dim() == 2:  # some early ports stored 1x1 kernels as matrices
            value = value[:, :, None, None]
        converted[names[prefix] + rest] = value
    return converted


# timm xception_aligned names -> ours, as (pattern, replacement) applied in order to each key.
TIMM_ALIGNED_RENAMES = [
    (r"^stem\.0\.conv\.", "blocks.stem.conv1."),
    (r"^stem\.0\.bn\.", "blocks.stem.conv1_bn."),
    (r"^stem\.1\.conv\.", "blocks.stem.conv2."),
    (r"^stem\.1\.bn\.", "blocks.stem.conv2_bn."),
    (r"^stem\.1\.weight$", "blocks.stem.conv2.weight"),  # pre-activation: a bare conv
    (r"^blocks\.(\d+)\.", lambda m: f"blocks.block{int(m.group(1)) + 1}."),
    (r"\.shortcut\.weight$", ".shortcut.conv.weight"),  # pre-activation: a bare conv
    (r"\.stack\.conv(\d)\.conv_dw\.", r".layers.sepconv\1.depthwise."),
    (r"\.stack\.conv(\d)\.bn_dw\.", r".layers.sepconv\1.mid_norm."),
    (r"\.stack\.conv(\d)\.conv_pw\.", r".layers.sepconv\1.pointwise."),
    (r"\.stack\.conv(\d)\.bn_pw\.", r".layers.sepconv\1_bn."),
    (r"\.stack\.conv(\d)\.norm\.", r".layers.sepconv\1_norm."),
    (r"^(blocks\.block\d+)\.norm\.", r"\1.entry.bn."),
    (r"^head\.fc\.", "head.predictions."),
]


def timm_aligned_to_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm aligned names (``blocks.3.stack.conv2.bn_dw``) -> ours (``blocks.block4.layers.sepconv2.mid``)."""
    converted = {}
    for key, value in state.items():
        name = key
        for pattern, replacement in TIMM_ALIGNED_RENAMES:
            name = re.sub(pattern, replacement, name)
        converted[name] = value
    return converted


# --- safetensors -----------------------------------------------------------------------------------

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightFileError(f"could not read {path} as safetensors ({error}); the file may be truncated or "
                              "corrupt") from error


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata block of a safetensors file: for files saved here, the model name and architecture."""
    path = Path(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError as error:
            raise WeightFileError(f"{path} has no readable safetensors header") from error
    return header.get("__metadata__", {})
