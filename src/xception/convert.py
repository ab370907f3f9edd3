"""Reading weight files of every format into this library's state-dict names, without touching a model.

Formats are recognised by their first bytes, never by the file extension:

- Keras legacy HDF5 (the official ImageNet files, Keras 1 era, and files written by Keras 2/3);
- PyTorch state dicts (.pth): timm ``legacy_xception``, Cadene ``xception``, or this library's own;
- safetensors written by :func:`xception.save_weights`.

Each reader returns ``(format description, {name: tensor})``; :func:`xception.weights.load_weights`
checks the result against the model before loading anything.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .layers import SeparableConv2d

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
PICKLE_PROTOCOL_2 = b"\x80\x02"
SAFETENSORS_FORMAT = "xception-safetensors"


class WeightFileError(ValueError):
    """A weight file that cannot be read, or that does not fit the model."""


def detect_format(path: Path) -> str:
    """One of "keras-h5", "pytorch" or "safetensors", from the file's first bytes."""
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise WeightFileError(f"weight file {path} is empty")
    if head.startswith(HDF5_SIGNATURE):
        return "keras-h5"
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
    if kind == "keras-h5":
        return read_keras_h5(path, model)
    if kind == "safetensors":
        return name_state_dict(read_safetensors(path), model, path, "safetensors")
    return name_state_dict(read_pytorch(path), model, path, ".pth")


# --- Keras HDF5 ------------------------------------------------------------------------------------

def keras_layer_name(module_path: str) -> str:
    """``blocks.block5.layers.sepconv2_bn`` -> ``block5_sepconv2_bn``; ``head.predictions`` -> ``predictions``."""
    match = re.fullmatch(r"blocks\.(block\d+)\.(?:layers\.)?(\w+)", module_path)
    if match:
        return f"{match.group(1)}_{match.group(2)}"
    return module_path.rsplit(".", 1)[-1]


# A Keras weight's role, from the end of its name, in every Keras version's spelling.
KERAS_WEIGHT_ROLES = {
    "kernel": "kernel", "W": "kernel", "bias": "bias", "b": "bias",
    "depthwise_kernel": "depthwise_kernel", "pointwise_kernel": "pointwise_kernel",
    "gamma": "weight", "beta": "bias",
    "moving_mean": "running_mean", "running_mean": "running_mean",
    # Keras 1 called the moving variance "running_std", but it always held the variance.
    "moving_variance": "running_var", "running_std": "running_var",
}


def keras_weight_role(layer: str, weight_name: str) -> str:
    leaf = weight_name.split("/")[-1].split(":")[0]
    if leaf.startswith(layer + "_"):
        leaf = leaf[len(layer) + 1:]
    if leaf not in KERAS_WEIGHT_ROLES:
        raise WeightFileError(f"unknown weight {weight_name!r} in Keras layer {layer!r}")
    return KERAS_WEIGHT_ROLES[leaf]


def keras_to_torch(role: str, value: torch.Tensor) -> torch.Tensor:
    """TensorFlow kernels are (kh, kw, in, out); PyTorch's (out, in, kh, kw). Both cross-correlate."""
    if role in ("kernel", "pointwise_kernel") and value.dim() == 4:
        return value.permute(3, 2, 0, 1)
    if role == "depthwise_kernel":  # (kh, kw, in, multiplier) -> (in * multiplier, 1, kh, kw)
        kh, kw, channels, multiplier = value.shape
        return value.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
    if role == "kernel" and value.dim() == 2:  # Dense: (in, out) -> (out, in)
        return value.t()
    return value


def read_keras_h5(path: Path, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            if "layer_names" not in group.attrs:
                raise WeightFileError(f"{path} is an HDF5 file but not a Keras weight file (no layer_names)")
            layers: list[tuple[str, dict[str, torch.Tensor]]] = []
            for raw in group.attrs["layer_names"]:
                layer = raw.decode() if isinstance(raw, bytes) else str(raw)
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in group[layer].attrs["weight_names"]]
                if names:
                    weights = {keras_weight_role(layer, n): torch.from_numpy(group[layer][n][()]) for n in names}
                    layers.append((layer, weights))
            version = group.attrs.get("keras_version", b"unknown")
    except WeightFileError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise WeightFileError(f"could not read {path} as a Keras HDF5 weight file ({error}); the file may be "
                              "truncated or corrupt: fetch it again") from error
    version = version.decode() if isinstance(version, bytes) else str(version)
    return f"Keras HDF5 (keras {version})", keras_layers_to_state_dict(layers, model)


def keras_layers_to_state_dict(layers: list[tuple[str, dict[str, torch.Tensor]]],
                               model: nn.Module) -> dict[str, torch.Tensor]:
    """Match named Keras layers by name, and the unnamed shortcut conv/BN pairs by shape in order."""
    separable = tuple(path + "." for path, module in model.named_modules() if isinstance(module, SeparableConv2d))
    ours = {keras_layer_name(path): (path, module) for path, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, SeparableConv2d))
            and ".shortcut." not in path and not path.startswith(separable)}
    # Shortcut convs and BNs have no name in Keras: queue ours by shape, to be taken in order.
    shortcut_queues: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for path, module in model.named_modules():
        if path.endswith(".shortcut.conv"):
            shortcut_queues[("conv", *module.weight.shape)].append(path)
        elif path.endswith(".shortcut.bn"):
            shortcut_queues[("bn", module.num_features)].append(path)

    state: dict[str, torch.Tensor] = {}
    for layer, weights in layers:
        if layer in ours:
            path, module = ours[layer]
        else:
            key = shortcut_key(weights)
            if not shortcut_queues.get(key):
                raise WeightFileError(unmatched_layer_message(layer, weights, model))
            path = shortcut_queues[key].pop(0)
            module = model.get_submodule(path)
        for role, value in weights.items():
            state[torch_name(path, module, role)] = keras_to_torch(role, value)
    return state


def shortcut_key(weights: dict[str, torch.Tensor]) -> tuple:
    if "kernel" in weights and weights["kernel"].dim() == 4:
        kh, kw, cin, cout = weights["kernel"].shape
        return ("conv", cout, cin, kh, kw)
    if "running_var" in weights:
        return ("bn", weights["running_var"].shape[0])
    return ("unknown",)


def unmatched_layer_message(layer: str, weights: dict[str, torch.Tensor], model: nn.Module) -> str:
    shapes = {role: tuple(value.shape) for role, value in weights.items()}
    if layer == "predictions":
        classes = shapes.get("bias", ("?",))[0]
        return (f"the file has a classifier ('predictions', {classes} classes) but the model has none: build it "
                f"with num_classes={classes}, or load the no-top weight file")
    return f"the file's layer {layer!r} {shapes} has no counterpart in the model"


def torch_name(path: str, module: nn.Module, role: str) -> str:
    if isinstance(module, SeparableConv2d):
        part = {"depthwise_kernel": "depthwise.weight", "pointwise_kernel": "pointwise.weight",
                "bias": "pointwise.bias"}.get(role)
        if part is None:
            raise WeightFileError(f"unexpected weight {role!r} for separable convolution {path}")
        return f"{path}.{part}"
    return f"{path}.{'weight' if role == 'kernel' else role}"


# --- PyTorch state dicts ------------------------------------------------------------------------

def read_pytorch(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint is data; never run pickled code from it.
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
        source = "Cadene xception" if "last_linear.weight" in state else "timm legacy_xception"
        return f"{source} ({container})", timm_to_state_dict(state, model)
    if any(k.startswith("blocks.") for k in keys):
        return ("xception safetensors" if container == "safetensors" else "xception state dict (.pth)"), state
    raise WeightFileError(f"{path} is a {container} state dict but not an Xception one (timm legacy_xception or "
                          f"xception_aligned, Cadene xception, or this library's): its keys start {keys[:3]}")


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
