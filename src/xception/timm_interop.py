"""timm and segmentation_models.pytorch interop: the paper's network in timm's registry, and folders timm loads.

- ``import xception.timm_interop`` registers ``xception_keras`` with timm, as importing one of timm's own model
  modules registers its models: the paper's network with Keras numerics and the official Keras weights, under a
  name of its own (timm's ``legacy_xception`` is the Cadene port, with other numerics). :func:`register` does the
  same, idempotently, for code that prefers an explicit call. ``import xception`` alone registers nothing.
- Then ``timm.create_model("xception_keras", pretrained=True, num_classes=..., in_chans=..., features_only=True,
  out_indices=..., output_stride=...)`` works as for timm's own models, and so does smp's
  ``encoder_name="tu-xception_keras"``. ``pretrained=True`` loads the official Keras files through this library's
  loader (downloaded once, pinned by checksum, the file without classifier for another class count or a feature
  model, the first convolution adapted to ``in_chans``): timm's loader cannot read Keras HDF5.
- :func:`save_timm_folder` writes ``config.json`` and ``model.safetensors`` in timm's names, which
  ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads with the same outputs: for the aligned models
  (timm's ``xception41``... ``xception65p``) and ``xception`` with ``numerics="timm"`` (timm's
  ``legacy_xception``); with ``architecture="xception_keras"`` also for the paper's network with Keras numerics,
  loadable where this module is imported.

Needs timm (``pip install timm``); segmentation_models.pytorch only to use the ``tu-`` encoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import timm
    from timm.models import build_model_with_cfg, generate_default_cfgs, resolve_pretrained_cfg
except ImportError as error:  # an optional dependency: say which package to install
    raise ImportError(f"xception.timm_interop needs timm: pip install timm ({error})") from error

from .errors import InvalidArgumentError, UnknownOptionError
from .files import atomic_path, write_text_atomic
from .models.backbone import FeatureExtractor, XceptionBase, resolve_indices
from .models.xception import Xception, XceptionConfig
from .weights import get_weights, load_weights
from .weights.formats import name_state_dict

__all__ = ["TIMM_ARCHITECTURES", "TimmXception", "default_cfgs", "register", "save_timm_folder", "xception_keras"]

NAME = "xception_keras"
# Our models that timm has under the same name (the aligned family), and the paper's network with timm's numerics.
TIMM_ARCHITECTURES = {"xception41": "xception41", "xception65": "xception65", "xception71": "xception71",
                      "xception41p": "xception41p", "xception65p": "xception65p", "xception": "legacy_xception"}
# The keyword arguments of Xception's constructor; every other keyword is an XceptionConfig knob.
ARCHITECTURE_ARGS = ("num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate", "output_stride",
                     "multi_grid")


def _pretrained_cfgs() -> dict[str, Any]:
    """timm's description of the official weights, read from their registered :class:`~xception.weights.Weights`.

    ``url`` makes timm list the weights (``timm.list_models(pretrained=True)``, smp's preprocessing lookup), but
    timm never fetches it: :func:`xception_keras` loads them with this library's loader. ``custom_load`` says the
    file is not a PyTorch state dict; timm resets it for a file given in ``pretrained_cfg_overlay`` unless told
    again, so ``pretrained_cfg_overlay=dict(file=..., custom_load=True)`` sends any file this library reads (the
    Keras files included) to :meth:`TimmXception.load_pretrained`.
    """
    weights = get_weights("xception", "imagenet")
    transform = weights.transform_config
    crop, resize = transform["crop_size"], transform["resize_size"]
    return generate_default_cfgs({f"{NAME}.tf_in1k": {
        "url": weights.file.urls[0],
        "custom_load": True,
        "num_classes": weights.num_classes,
        "input_size": (3, crop, crop),
        "min_input_size": (3, 71, 71),
        "pool_size": (10, 10),
        # timm resizes to floor(crop / crop_pct): half a pixel over the resize size lands exactly on it.
        "crop_pct": crop / (resize + 0.5),
        "interpolation": transform["interpolation"],
        "mean": tuple(transform["mean"]),
        "std": tuple(transform["std"]),
        "first_conv": "blocks.block1.conv1",
        "classifier": "head.predictions",
        "license": weights.meta.get("license", "").lower() or None,
        "paper_ids": "arXiv:1610.02357",
        "origin_url": "https://keras.io/api/applications/xception/",
        "description": weights.meta.get("source"),
    }})


# Read by timm's register_model from this module, as from timm's own model modules.
default_cfgs = _pretrained_cfgs()


class TimmXception(Xception):
    """The paper's network with the methods timm's feature wrapper (``FeatureGetterNet``) calls: the same modules
    and state dict as :class:`~xception.models.xception.Xception`, so weights move between the two unchanged."""

    @torch.jit.unused
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's signature of :meth:`XceptionBase.forward_intermediates`. ``norm`` changes nothing: the network
        ends on its own ReLU, with no final norm layer."""
        if output_fmt != "NCHW":
            raise InvalidArgumentError(f"xception gives NCHW feature maps, not {output_fmt}")
        return super().forward_intermediates(x, indices, stop_early=stop_early, intermediates_only=intermediates_only)

    def prune_intermediate_layers(self, indices: int | list[int] | None = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last feature map ``indices`` asks for, and the classifier; returns the
        indices resolved (timm's feature wrapper calls this before it uses them)."""
        wanted = resolve_indices(indices, len(self.tap_blocks))
        self.blocks = self.blocks[: self.tap_blocks[max(wanted)] + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return wanted

    def load_pretrained(self, path: str | Path) -> None:
        """timm's hook for weight files that are not PyTorch state dicts: any file :func:`load_weights` reads."""
        load_weights(self, path)


def _build(*, keras_weights: bool, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           **options: Any) -> TimmXception:
    """A :class:`TimmXception` from ``create_model``-style options, with the official weights if asked."""
    numerics = options.pop("numerics", "keras")
    if numerics != "keras":
        raise InvalidArgumentError(f"{NAME} has Keras numerics (got numerics={numerics!r}); timm's legacy_xception "
                                   "is the network with timm's")
    knobs = {name: value for name, value in options.items() if name not in ARCHITECTURE_ARGS}
    valid = {field.name for field in dataclasses.fields(XceptionConfig)}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise UnknownOptionError(f"unknown {NAME} option(s) {unknown}; valid options are "
                                 f"{sorted(valid | set(ARCHITECTURE_ARGS))}")
    arguments = {name: value for name, value in options.items() if name in ARCHITECTURE_ARGS}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = TimmXception(XceptionConfig(**knobs), model_name="xception", **arguments)
    if dtype is not None:
        model.to(dtype=dtype)
    if keras_weights:
        load_weights(model, "imagenet")  # the no-top file for another class count, in_chans adapted
    return model


def _timm_loads(kwargs: dict[str, Any]) -> bool:
    """Whether timm's loader should load the weights: a folder or Hub repository in timm's format (``local-dir:``,
    ``hf-hub:``), or a file or state dict given in ``pretrained_cfg``. Otherwise the weights are the registered
    official ones, which this library's loader fetches and reads."""
    cfg = resolve_pretrained_cfg(NAME, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    return cfg.source in ("local-dir", "hf-hub") or bool(cfg.file) or cfg.state_dict is not None


def xception_keras(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entry point: the paper's Xception with Keras numerics (22,855,952 parameters), the official Keras weights
    with ``pretrained=True``. Takes timm's and :func:`xception.create_model`'s options (``num_classes``,
    ``in_chans``, ``global_pool``, ``output_stride``, ``features_only``, ``out_indices``, the
    :class:`~xception.XceptionConfig` knobs). A feature model pads its stem 'same' unless ``stem_padding="valid"``
    is given: Keras's exact graph gives maps a few pixels off H / stride, which segmentation decoders cannot
    combine; the weights are the same."""
    if kwargs.get("features_only"):
        kwargs.update(num_classes=0, global_pool="")  # a feature model needs no classifier: the no-top file
        # Keras's valid stem makes maps of (H - 3) / 4 and so on, which decoders cannot add to maps upsampled from
        # the next stride; padded 'same' (as smp's own Xception encoder pads it), each map is ceil(H / stride).
        kwargs.setdefault("stem_padding", "same")
    ours = pretrained and not _timm_loads(kwargs)
    return build_model_with_cfg(partial(_build, keras_weights=ours), NAME, pretrained and not ours,
                                feature_cfg={"feature_cls": "getter"}, **kwargs)


def register() -> None:
    """Register ``xception_keras`` with timm's model registry; a no-op when it already is (importing this module
    does it)."""
    if timm.is_model(NAME) and timm.models.model_entrypoint(NAME) is xception_keras:
        return
    timm.models.register_model(xception_keras)


register()


# --- timm folders -------------------------------------------------------------------------------------------

def save_timm_folder(model: nn.Module, directory: str | Path, *, architecture: str | None = None) -> Path:
    """Write ``model`` as a folder that ``timm.create_model("local-dir:<directory>", pretrained=True)`` loads with
    the same outputs: ``model.safetensors`` in timm's names and ``config.json`` (architecture, classes, the options
    that change the outputs, preprocessing). Each file is written atomically; returns ``directory``.

    ``architecture`` is timm's name, by default the one timm has for the model: ``xception41``... ``xception65p``
    for the aligned models and ``legacy_xception`` for ``xception`` with ``numerics="timm"``. The paper's network with
    Keras numerics has none in timm; ``architecture="xception_keras"`` writes it (any configuration) for processes
    that import :mod:`xception.timm_interop`. Training-only settings (dropout, stochastic depth) are not recorded.
    """
    architecture, model_args = _timm_arguments(model, architecture)
    with torch.device("meta"):  # timm's model checks every name and shape without allocating anything
        reference = timm.create_model(architecture, **model_args)
    state = _to_timm_names(model, reference, Path(directory))
    try:
        reference.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        details = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise InvalidArgumentError(f"the model does not fit timm's {architecture}: {details}") from error
    directory = Path(directory)
    from safetensors.torch import save_file

    with atomic_path(directory / "model.safetensors") as temporary:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}, str(temporary))
    config = _folder_config(model, reference, architecture, model_args)
    # Written last: a folder with a config.json has its weights complete.
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2) + "\n")
    return directory


def _timm_arguments(model: nn.Module, architecture: str | None) -> tuple[str, dict[str, Any]]:
    """timm's architecture for ``model`` and the ``create_model`` arguments that rebuild it with the same outputs,
    or a clear refusal."""
    if isinstance(model, FeatureExtractor):
        raise InvalidArgumentError("save_timm_folder takes a whole model, not a features_only one: save the model it "
                                   "came from (timm.create_model(..., features_only=True) then makes the features)")
    name = getattr(model, "model_name", None)
    if not isinstance(model, XceptionBase) or name not in TIMM_ARCHITECTURES:
        raise InvalidArgumentError(f"timm has no architecture for {name or type(model).__name__}; save_timm_folder "
                                   f"writes {', '.join(TIMM_ARCHITECTURES)}")
    if model.multi_grid is not None:
        raise InvalidArgumentError("timm's models have no multi_grid: build the model without it")
    args: dict[str, Any] = {"num_classes": model.num_classes, "in_chans": model.in_chans,
                            "global_pool": model.head.global_pool}
    if name != "xception":
        if architecture not in (None, name):
            raise InvalidArgumentError(f"{name} is timm's {name}, not {architecture}")
        return name, {**args, **({"output_stride": model.output_stride} if model.output_stride != 32 else {})}
    config: XceptionConfig = model.config
    if architecture == NAME:
        knobs = {key: value for key, value in dataclasses.asdict(config).items()
                 if value != getattr(XceptionConfig(), key) and key != "bn_momentum"}
        if model.output_stride != 32:
            args["output_stride"] = model.output_stride
        return NAME, {**args, **knobs}
    if architecture not in (None, "legacy_xception"):
        raise InvalidArgumentError(f"xception is timm's legacy_xception (numerics='timm') or xception_keras, not "
                                   f"{architecture}")
    if config.numerics != "timm":
        raise InvalidArgumentError(
            "xception with Keras numerics has no architecture in timm (timm's legacy_xception has BatchNorm eps 1e-5 "
            "and symmetric max-pool padding): build it with numerics='timm' to write a legacy_xception folder, or "
            "pass architecture='xception_keras' for a folder that timm loads in processes that import "
            "xception.timm_interop")
    if dataclasses.replace(config, bn_momentum=None) != XceptionConfig(numerics="timm"):
        raise InvalidArgumentError("timm's legacy_xception is the paper's network only; this one has other knobs "
                                   "(pass architecture='xception_keras' with numerics='keras' for any configuration)")
    if model.output_stride != 32:
        raise InvalidArgumentError("timm's legacy_xception has no output_stride: build the model with output_stride=32")
    return "legacy_xception", args


def _to_timm_names(model: nn.Module, reference: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """``model``'s state dict under ``reference``'s names. The renaming is the one table that reads timm's files
    (:func:`xception.weights.formats.name_state_dict`), run on timm's names and inverted; xception_keras uses ours."""
    ours = model.state_dict()
    if isinstance(reference, TimmXception):
        return dict(ours)
    theirs = reference.state_dict()
    _, renamed = name_state_dict(theirs, model, path, "timm")
    # The renaming keeps each tensor object: its identity leads back to timm's name.
    timm_name = {id(tensor): name for name, tensor in theirs.items()}
    names = {ours_name: timm_name[id(tensor)] for ours_name, tensor in renamed.items()}
    missing = [name for name in ours if name not in names]
    if missing or len(names) != len(ours):
        extra = [name for name in names if name not in ours]
        raise InvalidArgumentError(f"the model does not fit timm's {reference.pretrained_cfg['architecture']}: "
                                   f"{'it has ' + missing[0] if missing else 'it lacks ' + extra[0]}")
    return {names[name]: tensor for name, tensor in ours.items()}


def _folder_config(model: nn.Module, reference: nn.Module, architecture: str, model_args: dict[str, Any]
                   ) -> dict[str, Any]:
    """config.json as timm's ``local-dir:`` and ``hf-hub:`` loaders read it: the architecture, the arguments that
    rebuild it, and the pretrained config (timm's for the architecture, with this model's classes, input channels
    and, when it carries registered weights, their preprocessing)."""
    cfg = reference.pretrained_cfg
    pretrained_cfg = {key: value for key, value in cfg.items() if value is not None and key not in
                      ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag")}
    pretrained_cfg.update(num_classes=model.num_classes, custom_load=False,
                          input_size=(model.in_chans, *cfg["input_size"][1:]))
    weights = getattr(model, "pretrained_weights", None)
    if weights is not None:
        transform = weights.transform_config
        pretrained_cfg.update(input_size=(model.in_chans, transform["crop_size"], transform["crop_size"]),
                              crop_pct=transform["crop_size"] / (transform["resize_size"] + 0.5),
                              interpolation=transform["interpolation"], mean=tuple(transform["mean"]),
                              std=tuple(transform["std"]))
    if model.num_classes != cfg.get("num_classes"):
        for key in ("label_names", "label_descriptions", "label_offset"):
            pretrained_cfg.pop(key, None)
    config = {"architecture": architecture, "num_classes": model.num_classes, "num_features": model.num_features}
    if model.head.global_pool:
        config["global_pool"] = model.head.global_pool
    return {**config, "model_args": model_args, "pretrained_cfg": pretrained_cfg}
