"""Reading Keras weight files of the paper's Xception into this library's state-dict names.

Three layouts are read, each recognised from the file's content:

- **The official 2016 files** (``xception_weights_tf_dim_ordering_tf_kernels[_notop].h5``). Keras 1 wrote them
  from a model whose layers had no names, so every weighted layer carries Keras 1's automatic name, by class and
  creation rank: ``convolution2d_1..6``, ``separableconvolution2d_1..34``, ``batchnormalization_1..40`` and
  ``dense_2`` (top file only). The datasets lie flat in each group (``convolution2d_1_W:0``,
  ``batchnormalization_3_running_std:0``, which holds the variance), and the root has no ``keras_version``.
  Evidence: public code that reads the real files with a strict ``load_state_dict``
  (kazuto1011/pytorch-ported-models ``load_keras_xceptionv1``, same MD5; balancap/SSD-Tensorflow) and
  keras-team/keras issues #9683 and #7006. The creation order is the Keras code's: a block's shortcut
  convolution and its BatchNorm are created *before* the block's separable convolutions, so the ranks are
  matched against our layers in that order. ``layer_names`` lists the layers in the model's order, which is not
  the numbering order, so it is not relied on; neither are the absolute numbers (the Dense is ``dense_2``).
- **Keras 2/3 legacy HDF5** (``save_weights("x.h5")``): layers named as in ``keras.applications.Xception``
  (``block1_conv1``...), the four shortcut pairs unnamed (``conv2d_1``... by Keras version).
- **Keras 3's own format** (``save_weights("x.weights.h5")``, and the ``model.weights.h5`` inside a ``.keras``
  archive): ``layers/<class>[_<rank>]/vars/<index>``, ranked by class in the model's layer order, the variables
  unnamed and in the layer's own order. A fine-tuned model that wraps the Xception base (``Sequential([base,
  Dense(n)])``) nests the base's layers one level down; its Dense is the classifier.

Matching is by class and rank with every count checked (and every shape, by the caller), so a file that is not
this network is refused naming the first layer that does not fit.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightFileError
from ..layers import SeparableConv2d

KERAS_FORMATS_READ = ("the official Keras 1 files, Keras 2/3 legacy HDF5 (save_weights('x.h5')), Keras 3 "
                      "weights (save_weights('x.weights.h5')) and .keras archives")

# One Keras layer as read from a file: (name, class, {role: tensor}), the class one of ours below.
KerasLayer = tuple[str, str, dict[str, torch.Tensor]]
CLASSES = ("conv", "separable", "bn", "dense")
CLASS_NAMES = {"conv": "convolution", "separable": "separable convolution", "bn": "BatchNorm", "dense": "Dense"}

KERAS1_CLASSES = {"convolution2d": "conv", "separableconvolution2d": "separable", "batchnormalization": "bn",
                  "dense": "dense"}
KERAS1_NAME = re.compile(r"(convolution2d|separableconvolution2d|batchnormalization|dense)_(\d+)")
KERAS3_CLASSES = {"conv2d": "conv", "separable_conv2d": "separable", "batch_normalization": "bn", "dense": "dense"}
KERAS3_NAME = re.compile(r"(conv2d|separable_conv2d|batch_normalization|dense)(?:_(\d+))?")
# Keras 3 stores a layer's variables unnamed, in the order the layer creates them.
KERAS3_ROLES = {"conv": ("kernel", "bias"), "separable": ("depthwise_kernel", "pointwise_kernel", "bias"),
                "bn": ("weight", "bias", "running_mean", "running_var"), "dense": ("kernel", "bias")}

# A Keras weight's role, from the end of its name, in every Keras version's spelling.
KERAS_WEIGHT_ROLES = {
    "kernel": "kernel", "W": "kernel", "bias": "bias", "b": "bias",
    "depthwise_kernel": "depthwise_kernel", "pointwise_kernel": "pointwise_kernel",
    "gamma": "weight", "beta": "bias",
    "moving_mean": "running_mean", "running_mean": "running_mean",
    # Keras 1 called the moving variance "running_std", but it always held the variance.
    "moving_variance": "running_var", "running_std": "running_var",
}


def is_keras_archive(path: Path) -> bool:
    """A ``.keras`` archive: a zip with the weights in ``model.weights.h5`` (a PyTorch zip has ``data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "model.weights.h5" in archive.namelist()
    except zipfile.BadZipFile:
        return False


def read_keras_file(path: Path, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """An HDF5 file or a ``.keras`` archive -> (format description, state dict in ``model``'s names)."""
    import h5py

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                source = io.BytesIO(archive.read("model.weights.h5"))
            container = "Keras 3 .keras archive"
        else:
            source, container = path, None
        with h5py.File(source, "r") as f:
            if container is not None or ("layers" in f and "layer_names" not in f.attrs):
                return (container or "Keras 3 weights (.weights.h5)"), match_by_rank(
                    read_keras3_layers(f), model, shortcut_first=False, source=path)
            group = f.get("model_weights", f)
            if "layer_names" not in group.attrs:
                raise WeightFileError(f"{path} is an HDF5 file but not a Keras weight file this library reads (no "
                                      f"layer_names, no layers group); it reads {KERAS_FORMATS_READ}")
            layers = read_legacy_layers(group)
            version = group.attrs.get("keras_version")
    except WeightFileError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        what = "a .keras archive" if zipfile.is_zipfile(path) else "a Keras HDF5 weight file"
        raise WeightFileError(f"could not read {path} as {what} ({error}); the file may be truncated or corrupt: "
                              "fetch it again") from error
    if layers and all(KERAS1_NAME.fullmatch(name) for name, _, _ in layers):
        # The official files: unnamed layers, ranked in the order the Keras code creates them.
        return "Keras 1 HDF5 (the official layout)", match_by_rank(layers, model, shortcut_first=True, source=path)
    version = version.decode() if isinstance(version, bytes) else str(version or "unknown")
    return f"Keras HDF5 (keras {version})", match_by_name(layers, model)


def read_legacy_layers(group) -> list[KerasLayer]:
    """Every weighted layer of a legacy HDF5 file, in ``layer_names`` order, its weights by role."""
    layers: list[KerasLayer] = []
    for raw in group.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        weight_names = [n.decode() if isinstance(n, bytes) else str(n) for n in group[name].attrs["weight_names"]]
        if not weight_names:
            continue
        weights = {weight_role(name, n): torch.from_numpy(group[name][n][()]) for n in weight_names}
        match = KERAS1_NAME.fullmatch(name)
        layers.append((name, KERAS1_CLASSES[match.group(1)] if match else layer_class(weights), weights))
    return layers


def read_keras3_layers(f) -> list[KerasLayer]:
    """Every weighted layer of a Keras 3 ``.weights.h5``, under ``layers/`` at any depth (a wrapped base model)."""
    layers: list[KerasLayer] = []

    def visit(group, prefix: str) -> None:
        for key in group:
            child = group[key]
            if "vars" in child and len(child["vars"]):
                match = KERAS3_NAME.fullmatch(key)
                if match is None:
                    raise WeightFileError(f"the Keras layer {prefix}{key} is not one of the layers of Xception "
                                          f"({', '.join(KERAS3_CLASSES)})")
                kind = KERAS3_CLASSES[match.group(1)]
                values = [torch.from_numpy(child["vars"][str(i)][()]) for i in range(len(child["vars"]))]
                layers.append((f"{prefix}{key}", kind, dict(zip(KERAS3_ROLES[kind], values, strict=False))))
            if "layers" in child:
                visit(child["layers"], f"{prefix}{key}/")

    if "layers" not in f:
        raise WeightFileError(f"no 'layers' group: not a Keras 3 weight file; this library reads {KERAS_FORMATS_READ}")
    visit(f["layers"], "")
    return layers


def weight_role(layer: str, weight_name: str) -> str:
    leaf = weight_name.split("/")[-1].split(":")[0]
    if leaf.startswith(layer + "_"):
        leaf = leaf[len(layer) + 1:]
    if leaf not in KERAS_WEIGHT_ROLES:
        raise WeightFileError(f"unknown weight {weight_name!r} in Keras layer {layer!r}")
    return KERAS_WEIGHT_ROLES[leaf]


def layer_class(weights: dict[str, torch.Tensor]) -> str:
    if "depthwise_kernel" in weights:
        return "separable"
    if "running_var" in weights:
        return "bn"
    return "dense" if weights.get("kernel", torch.empty(0, 0)).dim() == 2 else "conv"


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


def torch_name(path: str, module: nn.Module, role: str) -> str:
    if isinstance(module, SeparableConv2d):
        part = {"depthwise_kernel": "depthwise.weight", "pointwise_kernel": "pointwise.weight",
                "bias": "pointwise.bias"}.get(role)
        if part is None:
            raise WeightFileError(f"unexpected weight {role!r} for separable convolution {path}")
        return f"{path}.{part}"
    return f"{path}.{'weight' if role == 'kernel' else role}"


# --- matching by class and rank (the official files, Keras 3's format) ---------------------------------------

def model_layers(model: nn.Module, shortcut_first: bool) -> dict[str, list[tuple[str, nn.Module]]]:
    """Our counterparts of Keras's weighted layers by class, in the order Keras ranks them: the model's order,
    or with each block's shortcut moved before the block's other layers (the Keras code's creation order)."""
    separable = tuple(path + "." for path, module in model.named_modules() if isinstance(module, SeparableConv2d))
    entries: list[tuple[str, str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, SeparableConv2d):
            entries.append(("separable", path, module))
        elif path.startswith(separable):
            continue
        elif isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            # isinstance, not the exact type: a 'same'-padded stem (stem_padding="same") has a Conv2dSame
            kind = "conv" if isinstance(module, nn.Conv2d) else "bn" if isinstance(module, nn.BatchNorm2d) else "dense"
            entries.append((kind, path, module))
    if shortcut_first:
        blocks: dict[str, int] = {}
        for _, path, _ in entries:
            blocks.setdefault(path.split(".")[1] if path.startswith("blocks.") else path, len(blocks))
        entries.sort(key=lambda e: (blocks[e[1].split(".")[1] if e[1].startswith("blocks.") else e[1]],
                                    ".shortcut." not in e[1]))  # a stable sort keeps the rest in order
    by_class: dict[str, list[tuple[str, nn.Module]]] = {kind: [] for kind in CLASSES}
    for kind, path, module in entries:
        by_class[kind].append((path, module))
    return by_class


def rank(name: str) -> tuple[str, int]:
    """Sort key: the layer's path, then its numeric suffix as a number (``_10`` after ``_2``; none is 0)."""
    head, _, number = name.rpartition("_")
    return (head, int(number)) if number.isdigit() else (name, 0)


def match_by_rank(layers: list[KerasLayer], model: nn.Module, shortcut_first: bool,
                  source: Path) -> dict[str, torch.Tensor]:
    ours = model_layers(model, shortcut_first)
    theirs: dict[str, list[KerasLayer]] = defaultdict(list)
    for layer in sorted(layers, key=lambda layer: rank(layer[0])):
        theirs[layer[1]].append(layer)
    if theirs["dense"] and not ours["dense"]:
        raise WeightFileError(classifier_message(theirs["dense"][-1]))
    state: dict[str, torch.Tensor] = {}
    for kind in CLASSES:
        if kind == "dense" and not theirs[kind]:
            continue  # a file without the classifier: check_fits says what to do
        if len(theirs[kind]) != len(ours[kind]):
            first = theirs[kind][len(ours[kind])][0] if len(theirs[kind]) > len(ours[kind]) else None
            raise WeightFileError(
                f"{source} has {len(theirs[kind])} {CLASS_NAMES[kind]} layers where the model has "
                f"{len(ours[kind])}" + (f"; the first without a counterpart is {first!r}" if first else "")
                + ": it is not a weight file of this architecture")
        for (_, _, weights), (path, module) in zip(theirs[kind], ours[kind], strict=True):
            # Shapes are checked by the caller, after registered weights adapt their first convolution.
            for role, value in weights.items():
                state[torch_name(path, module, role)] = keras_to_torch(role, value)
    return state


# --- matching by name (Keras 2/3 legacy HDF5) ------------------------------------------------------------------

def keras_layer_name(module_path: str) -> str:
    """``blocks.block5.layers.sepconv2_bn`` -> ``block5_sepconv2_bn``; ``head.predictions`` -> ``predictions``."""
    match = re.fullmatch(r"blocks\.(block\d+)\.(?:layers\.)?(\w+)", module_path)
    if match:
        return f"{match.group(1)}_{match.group(2)}"
    return module_path.rsplit(".", 1)[-1]


def match_by_name(layers: list[KerasLayer], model: nn.Module) -> dict[str, torch.Tensor]:
    """Match named Keras layers by name, and the unnamed shortcut conv/BN pairs by shape in order."""
    separable = tuple(path + "." for path, module in model.named_modules() if isinstance(module, SeparableConv2d))
    ours = {keras_layer_name(path): (path, module) for path, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, SeparableConv2d))
            and ".shortcut." not in path and not path.startswith(separable)}
    # Shortcut convs and BNs have no name in Keras: queue ours by shape, to be taken in order.
    shortcut_queues: dict[tuple[int | str, ...], list[str]] = defaultdict(list)
    for path, module in model.named_modules():
        if path.endswith(".shortcut.conv"):
            shortcut_queues[("conv", *module.weight.shape)].append(path)
        elif path.endswith(".shortcut.bn"):
            shortcut_queues[("bn", module.num_features)].append(path)

    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        name, _, weights = layer
        if name in ours:
            path, module = ours[name]
        else:
            key = shortcut_key(weights)
            if not shortcut_queues.get(key):
                raise WeightFileError(classifier_message(layer) if name == "predictions" else
                                      f"the file's layer {name!r} {shapes(weights)} has no counterpart in the model")
            path = shortcut_queues[key].pop(0)
            module = model.get_submodule(path)
        for role, value in weights.items():
            state[torch_name(path, module, role)] = keras_to_torch(role, value)
    return state


def shortcut_key(weights: dict[str, torch.Tensor]) -> tuple[int | str, ...]:
    if "kernel" in weights and weights["kernel"].dim() == 4:
        kh, kw, cin, cout = weights["kernel"].shape
        return ("conv", cout, cin, kh, kw)
    if "running_var" in weights:
        return ("bn", weights["running_var"].shape[0])
    return ("unknown",)


def shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {role: tuple(value.shape) for role, value in weights.items()}


def classifier_message(layer: KerasLayer) -> str:
    name, _, weights = layer
    classes = weights["bias"].shape[0] if "bias" in weights else "?"
    return (f"the file has a classifier ({name!r}, {classes} classes) but the model has none: build it with "
            f"num_classes={classes}, or load the no-top weight file")
