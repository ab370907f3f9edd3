"""Loading and saving weights: a registered name or a file into a model, all or nothing, and the model's weights to
safetensors. A file is read and checked against the model in full before the model is touched, so a file that does
not fit leaves the model exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path
from .download import fetch, hub_repo_file, parse_hub_spec
from .formats import WeightFileError, read_weights
from .registered import Weights, get_weights

PRETRAINED_WEIGHTS = "model.safetensors"  # the weights file of a Hub repository or a save_pretrained folder


def load_weights(model: nn.Module, weights: str | Path, *, new_head: bool = False) -> str:
    """Load a registered name (or ``"default"``), a weight file or a Hub repository (``"hf-hub:org/name[@rev]"``,
    its ``model.safetensors``) into ``model``; returns the detected format.

    ``model.pretrained_weights`` becomes the registered :class:`Weights` (None for a file). ``new_head``: a file
    whose classifier does not fit the model (another class count) loads all but the classifier, which keeps its
    initialisation: fine-tuning on new classes.

    A registered name is fetched (cached, checksum-verified) in the variant that fits the model: for another
    class count that is the file without classifier, and the model's new head keeps its initialisation.
    Likewise its first convolution is adapted to the model's ``in_chans`` (summed over the RGB filters for one
    channel; repeated and rescaled for more). A path must fit exactly. Either way a file that does not fit raises
    :class:`~xception.convert.WeightFileError` naming the format and the first mismatching tensor, with the
    model unchanged.
    """
    registered = registered_weights(getattr(model, "model_name", "xception"), weights)
    classifier = classifier_prefix(model)
    may_lack: tuple[str, ...] = ()
    if registered is None:
        path = weights_path(weights)
    else:
        path = fetch(registered.file_for(model.num_classes))
        if model.num_classes != registered.num_classes:
            may_lack = (classifier,)
    file_format, state = read_weights(path, model)
    expected = model.state_dict()
    if new_head and any(name.startswith(classifier) and (name not in expected or tensor.shape != expected[name].shape)
                        for name, tensor in state.items()):
        may_lack = (classifier,)
    if may_lack:  # a file with the pretrained classifier (no no-top variant published): keep the model's new head
        state = {name: tensor for name, tensor in state.items() if not name.startswith(may_lack)}
    if registered is not None:
        adapt_input_conv(model, state)
    check_fits(model, state, path, file_format, may_lack=may_lack)
    # BatchNorm's step counter is not a weight; files from other frameworks do not have it.
    model.load_state_dict({name: state.get(name, expected[name]) for name in expected})
    # Remembered as timm keeps pretrained_cfg: the weights' transforms() are one attribute away.
    model.pretrained_weights = registered
    return file_format


def classifier_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the layers that depend on the class count: ``head.`` for the classifiers,
    ``classifier.`` (the final 1x1 convolution) for the DeepLab models."""
    return getattr(model, "classifier_prefix", "head.")


def adapt_input_conv(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make RGB first-convolution weights fit a model with another number of input channels, keeping the
    response to a grey image (the same value in every channel): exactly for one channel or a multiple of
    three, approximately otherwise."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    key, channels = f"{name}.weight", conv.in_channels
    weight = state.get(key)
    if weight is None or weight.shape[1] == channels:
        return
    if channels == 1:
        state[key] = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-channels // weight.shape[1])
        state[key] = weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def registered_weights(model_name: str, weights: str | Path) -> Weights | None:
    """The registered weights ``weights`` names for the model ``model_name``, or None when it is a path (an existing
    file or folder, or anything with a folder or a suffix in it) or a Hub repository (``hf-hub:org/name``). An
    unknown name is an error listing the registered ones."""
    path = Path(weights)
    if (isinstance(weights, Path) or parse_hub_spec(weights) is not None or path.exists() or path.suffix
            or path.parent != Path(".")):
        return None
    return get_weights(model_name, str(weights))


def weights_path(weights: str | Path) -> Path:
    """The local file of weights that are not a registered name: the path itself, or for ``hf-hub:org/name[@rev]``
    the repository's ``model.safetensors`` (what :func:`xception.save_pretrained` writes, and timm's repositories
    hold), fetched into the Hub's cache."""
    repo = parse_hub_spec(weights)
    if repo is None:
        return Path(weights)
    return hub_repo_file(repo, PRETRAINED_WEIGHTS)


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: Path, file_format: str,
               may_lack: tuple[str, ...] = ()) -> None:
    """Refuse ``state`` unless it has every tensor of ``model`` (except those starting with ``may_lack``) in the
    model's shapes, and nothing else. Mismatches are reported in the model's order, the first one named."""
    expected = model.state_dict()
    where = f"{path} ({file_format}) does not fit the model"
    for name, tensor in expected.items():
        found = state.get(name)
        if found is not None and found.shape != tensor.shape:
            raise WeightFileError(f"{where}: {name} expected {tuple(tensor.shape)}, found {tuple(found.shape)}"
                                  f"{classifier_hint(name, found)}")
    extra = [name for name in state if name not in expected]
    if extra:
        raise WeightFileError(f"{where}: it has {extra[0]} {tuple(state[extra[0]].shape)}, which the model lacks"
                              f"{classifier_hint(extra[0], state[extra[0]])}")
    missing = [name for name in expected if name not in state and not name.endswith("num_batches_tracked")
               and not name.startswith(may_lack)]
    if missing:
        hint = ""
        if missing[0].startswith("head.predictions"):
            hint = ": the file has no classifier; build the model with num_classes=0, or load the file with the top"
        raise WeightFileError(f"{where}: it lacks {missing[0]} {tuple(expected[missing[0]].shape)} and "
                              f"{len(missing) - 1} more{hint}")


def classifier_hint(name: str, tensor: torch.Tensor) -> str:
    if name.startswith("head.predictions"):
        return (f" (the file's classifier has {tensor.shape[0]} classes: build the model with "
                f"num_classes={tensor.shape[0]}, then reset_classifier() for another class count)")
    return ""


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s weights as safetensors, with the architecture in the metadata. The file is written
    to a temporary name and renamed, so an interrupted save never replaces a good file with a broken one."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": "xception", "model": getattr(model, "model_name", type(model).__name__)}
    if hasattr(model, "architecture"):
        metadata["architecture"] = json.dumps(model.architecture())
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return path
