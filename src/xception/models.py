"""The Xception network (Chollet 2017, Figure 5), exact to the author's Keras code, and its registry.

The network reads top to bottom like the paper's figure, and every module carries the name of its
Keras layer: ``blocks.block5.sepconv2_bn`` is Keras's ``block5_sepconv2_bn``.

- block1 (stem): Conv 32 3x3/2 valid, BN, ReLU; Conv 64 3x3 valid, BN, ReLU.
- block2..block4 (entry flow): [ReLU] SepConv, BN, ReLU, SepConv, BN, MaxPool 3x3/2, with a 1x1 stride-2
  conv + BN on the shortcut. block2 has no leading ReLU: its input is already activated.
- block5..block12 (middle flow): 3 x (ReLU, SepConv 728, BN), identity shortcut.
- block13 (exit flow): ReLU, SepConv 728, BN, ReLU, SepConv 1024, BN, MaxPool 3x3/2, 1x1 conv shortcut.
- block14: SepConv 1536, BN, ReLU, SepConv 2048, BN, ReLU. Then global pooling and the classifier.

A :class:`XceptionConfig` holds every knob of the paper (widths, middle-flow repeats, residuals, the
operation between depthwise and pointwise, fully-connected layers, numerics); ``create_model`` takes
them as keyword arguments.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .layers import MID_OPERATIONS, ORDERS, MaxPool2dSame, MidOperation, Order, SeparableConv2d
from .weights import load_weights

Numerics = Literal["keras", "timm"]
GLOBAL_POOLS = ("avg", "max", "")

# BatchNorm and max-pool settings of the two references. PyTorch's BN momentum is 1 - Keras's.
NUMERICS: dict[str, dict[str, Any]] = {
    "keras": {"bn_eps": 1e-3, "bn_momentum": 0.01, "tf_same_pool": True},
    "timm": {"bn_eps": 1e-5, "bn_momentum": 0.1, "tf_same_pool": False},
}


@dataclass(frozen=True)
class BlockSpec:
    """One residual module of the entry, middle or exit flow."""

    widths: tuple[int, ...]  # output channels of each separable convolution
    downsample: bool  # ends with a 3x3/2 max-pool, and the shortcut becomes a 1x1 stride-2 conv
    preact: bool = True  # ReLU before the first separable conv (the first module's input is activated)


@dataclass(frozen=True)
class XceptionConfig:
    """Architecture knobs. The defaults are the paper's network."""

    stem_widths: tuple[int, int] = (32, 64)
    entry_widths: tuple[int, ...] = (128, 256, 728)  # the middle flow keeps the last of these
    middle_repeats: int = 8
    exit_widths: tuple[int, int] = (728, 1024)
    tail_widths: tuple[int, int] = (1536, 2048)
    residual: bool = True  # the paper's Figure 9 compares with and without
    mid_activation: MidOperation = None  # between depthwise and pointwise: the paper's Figure 10
    order: Order = "depthwise_first"  # or "pointwise_first", the extreme Inception module
    segments: int | None = None  # channel groups of each spatial conv; None = depthwise
    fc_layers: tuple[int, ...] = ()  # hidden fully-connected layers before the classifier, e.g. (4096, 4096)
    numerics: Numerics = "keras"  # "keras": BN eps 1e-3, TF-same pooling; "timm": eps 1e-5, symmetric pooling

    def __post_init__(self) -> None:
        for name in ("stem_widths", "entry_widths", "exit_widths", "tail_widths", "fc_layers"):
            value = tuple(getattr(self, name))
            if not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"{name} must be positive integers, got {value}")
            object.__setattr__(self, name, value)
        if len(self.stem_widths) != 2 or len(self.exit_widths) != 2 or len(self.tail_widths) != 2:
            raise ValueError("stem_widths, exit_widths and tail_widths each take two widths")
        if not self.entry_widths:
            raise ValueError("entry_widths needs at least one width")
        if self.middle_repeats < 0:
            raise ValueError(f"middle_repeats must be >= 0, got {self.middle_repeats}")
        if self.mid_activation not in MID_OPERATIONS:
            raise ValueError(f"mid_activation must be one of {MID_OPERATIONS}, got {self.mid_activation!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {tuple(NUMERICS)}, got {self.numerics!r}")

    def block_specs(self) -> list[BlockSpec]:
        """The residual modules, in order: entry flow, middle flow, exit flow."""
        entry = [BlockSpec((w, w), downsample=True, preact=i > 0) for i, w in enumerate(self.entry_widths)]
        middle_width = self.entry_widths[-1]
        middle = [BlockSpec((middle_width,) * 3, downsample=False) for _ in range(self.middle_repeats)]
        return entry + middle + [BlockSpec(self.exit_widths, downsample=True)]

    def min_input_size(self) -> int:
        """Smallest input side for which the final feature map is at least 3x3, Keras's limit (71)."""
        downsampling_blocks = sum(spec.downsample for spec in self.block_specs())
        size = 1
        while True:
            side = (size - 3) // 2 + 1 - 2  # the two valid 3x3 stem convs, the first with stride 2
            for _ in range(downsampling_blocks):
                side = -(-side // 2)
            if side >= 3:
                return size
            size += 1


def conv_bn(conv: nn.Module, channels: int, eps: float, momentum: float) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels, eps=eps, momentum=momentum)]


class XceptionBlock(nn.Module):
    """A residual module: ``[ReLU] SepConv BN (ReLU SepConv BN)* [MaxPool]`` plus a shortcut."""

    def __init__(self, name: str, in_channels: int, spec: BlockSpec, config: XceptionConfig) -> None:
        super().__init__()
        numerics = NUMERICS[config.numerics]
        eps, momentum = numerics["bn_eps"], numerics["bn_momentum"]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i, width in enumerate(spec.widths, start=1):
            if i > 1 or spec.preact:
                # The first ReLU must not work in place: the shortcut still needs the block's input.
                layers[f"sepconv{i}_act"] = nn.ReLU(inplace=i > 1)
            layers[f"sepconv{i}"] = SeparableConv2d(
                channels, width, 3, order=config.order, mid_activation=config.mid_activation,
                segments=config.segments, bn_eps=eps, bn_momentum=momentum)
            layers[f"sepconv{i}_bn"] = nn.BatchNorm2d(width, eps=eps, momentum=momentum)
            channels = width
        if spec.downsample:
            layers["pool"] = MaxPool2dSame(3, 2) if numerics["tf_same_pool"] else nn.MaxPool2d(3, 2, padding=1)
        self.layers = nn.Sequential(layers)
        self.name = name
        self.out_channels = channels
        self.residual = config.residual
        self.shortcut: nn.Module | None = None
        if config.residual and (spec.downsample or in_channels != channels):
            stride = 2 if spec.downsample else 1
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(channels, eps=eps, momentum=momentum)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        if not self.residual:
            return out
        if self.shortcut is not None:
            return out + self.shortcut(x)
        return out + x


class Stem(nn.Module):
    """block1: two valid 3x3 convolutions, the first with stride 2."""

    def __init__(self, in_chans: int, widths: tuple[int, int], eps: float, momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=2, bias=False)
        self.conv1_bn = nn.BatchNorm2d(widths[0], eps=eps, momentum=momentum)
        self.conv1_act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, bias=False)
        self.conv2_bn = nn.BatchNorm2d(widths[1], eps=eps, momentum=momentum)
        self.conv2_act = nn.ReLU(inplace=True)
        self.out_channels = widths[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1_act(self.conv1_bn(self.conv1(x)))
        return self.conv2_act(self.conv2_bn(self.conv2(x)))


class Tail(nn.Module):
    """The last module of the exit flow: two separable convolutions, each followed by BN and ReLU."""

    def __init__(self, in_channels: int, widths: tuple[int, int], config: XceptionConfig) -> None:
        super().__init__()
        numerics = NUMERICS[config.numerics]
        eps, momentum = numerics["bn_eps"], numerics["bn_momentum"]
        sep = dict(order=config.order, mid_activation=config.mid_activation, segments=config.segments,
                   bn_eps=eps, bn_momentum=momentum)
        self.sepconv1 = SeparableConv2d(in_channels, widths[0], 3, **sep)
        self.sepconv1_bn = nn.BatchNorm2d(widths[0], eps=eps, momentum=momentum)
        self.sepconv1_act = nn.ReLU(inplace=True)
        self.sepconv2 = SeparableConv2d(widths[0], widths[1], 3, **sep)
        self.sepconv2_bn = nn.BatchNorm2d(widths[1], eps=eps, momentum=momentum)
        self.sepconv2_act = nn.ReLU(inplace=True)
        self.out_channels = widths[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sepconv1_act(self.sepconv1_bn(self.sepconv1(x)))
        return self.sepconv2_act(self.sepconv2_bn(self.sepconv2(x)))


class ClassifierHead(nn.Module):
    """Global pooling, optional hidden fully-connected layers, dropout, and the linear classifier."""

    def __init__(self, in_features: int, num_classes: int, global_pool: str, fc_layers: tuple[int, ...],
                 drop_rate: float) -> None:
        super().__init__()
        check_head_arguments(num_classes, global_pool, drop_rate)
        if fc_layers and not global_pool:
            raise ValueError("fc_layers need a global_pool ('avg' or 'max')")
        self.global_pool = global_pool
        hidden: OrderedDict[str, nn.Module] = OrderedDict()
        features = in_features
        for i, width in enumerate(fc_layers, start=1):
            hidden[f"fc{i}"] = nn.Linear(features, width)
            hidden[f"fc{i}_act"] = nn.ReLU(inplace=True)
            features = width
        self.fc_layers = nn.Sequential(hidden)
        self.hidden_size = features
        self.dropout = nn.Dropout(drop_rate)
        self.predictions: nn.Module = nn.Linear(features, num_classes) if num_classes else nn.Identity()

    def reset(self, num_classes: int, global_pool: str | None = None) -> None:
        pool = self.global_pool if global_pool is None else global_pool
        check_head_arguments(num_classes, pool, self.dropout.p)
        if len(self.fc_layers) and not pool:
            raise ValueError("fc_layers need a global_pool ('avg' or 'max')")
        self.global_pool = pool
        self.predictions = nn.Linear(self.hidden_size, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        elif self.global_pool == "max":
            x = x.amax((2, 3))
        x = self.dropout(self.fc_layers(x))
        return x if pre_logits else self.predictions(x)


def check_head_arguments(num_classes: int, global_pool: str, drop_rate: float) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 drops the classifier), got {num_classes}")
    if num_classes and not global_pool:
        raise ValueError("global_pool='' returns the final feature map and needs num_classes=0")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


class Xception(nn.Module):
    """Xception: a linear stack of depthwise separable convolution modules with residual connections.

    ``forward`` = ``forward_head(forward_features(x))``. ``num_classes=0`` makes the output the pooled
    features (``num_features`` wide, or the last of ``fc_layers``); ``global_pool=""`` with
    ``num_classes=0`` returns the final feature map.
    """

    def __init__(self, config: XceptionConfig | None = None, *, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, model_name: str = "xception") -> None:
        super().__init__()
        config = config or XceptionConfig()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.model_name = model_name  # the registry name, saved with the weights
        self.config = config
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.min_input_size = config.min_input_size()
        numerics = NUMERICS[config.numerics]

        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        stem = Stem(in_chans, config.stem_widths, numerics["bn_eps"], numerics["bn_momentum"])
        blocks["block1"] = stem
        channels = stem.out_channels
        for index, spec in enumerate(config.block_specs(), start=2):
            block = XceptionBlock(f"block{index}", channels, spec, config)
            blocks[block.name] = block
            channels = block.out_channels
        tail = Tail(channels, config.tail_widths, config)
        blocks[f"block{len(blocks) + 1}"] = tail
        self.blocks = nn.Sequential(blocks)
        self.num_features = tail.out_channels
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, config.fc_layers, drop_rate)
        self.head_hidden_size = self.head.hidden_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions, unit BN scale and zero shift, PyTorch's default for linear layers."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.Linear)):
                module.reset_parameters()

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the network cannot take, naming what was expected."""
        if x.dim() != 4:
            raise ValueError("expected an NCHW batch with 4 dimensions, got shape " + str(list(x.shape)))
        if x.shape[1] != self.in_chans:
            raise ValueError("expected " + str(self.in_chans) + " input channels, got " + str(x.shape[1])
                             + " (shape " + str(list(x.shape)) + "); build the model with in_chans="
                             + str(x.shape[1]) + " or convert the images")
        if x.shape[2] < self.min_input_size or x.shape[3] < self.min_input_size:
            raise ValueError("input " + str(x.shape[2]) + "x" + str(x.shape[3]) + " is too small: this model needs"
                             + " at least " + str(self.min_input_size) + "x" + str(self.min_input_size) + " pixels")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.predictions

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (freshly initialised) for ``num_classes`` classes; 0 removes it."""
        self.head.reset(num_classes, global_pool)
        self.num_classes = num_classes

    def architecture(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture with ``create_model``, saved with its weights."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, "global_pool": self.head.global_pool,
                "drop_rate": self.head.dropout.p, **dataclasses.asdict(self.config)}


# --- registry ---------------------------------------------------------------------------------------

_MODEL_BUILDERS: dict[str, Callable[..., Xception]] = {}


def register_model(builder: Callable[..., Xception]) -> Callable[..., Xception]:
    _MODEL_BUILDERS[builder.__name__] = builder
    return builder


@register_model
def xception(*, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
             **config: Any) -> Xception:
    """The paper's Xception (22,855,952 parameters with 1000 classes); knobs as in :class:`XceptionConfig`."""
    valid = {field.name for field in dataclasses.fields(XceptionConfig)}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise TypeError(f"unknown Xception option(s) {unknown}; valid options are {sorted(valid)}")
    return Xception(XceptionConfig(**config), num_classes=num_classes, in_chans=in_chans,
                    global_pool=global_pool, drop_rate=drop_rate, model_name="xception")


def list_models() -> list[str]:
    """Names that :func:`create_model` accepts."""
    return sorted(_MODEL_BUILDERS)


def create_model(name: str, *, weights: str | Path | None = None, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, **config: Any) -> Xception:
    """Build a registered model, optionally with weights.

    Args:
        name: one of :func:`list_models`.
        weights: a registered weights name (see :func:`xception.list_weights`, e.g. ``"imagenet"``), or the
            path of a weight file: Keras HDF5, timm/Cadene state dict (.pth) or this project's safetensors.
        num_classes: classifier outputs; 0 returns pooled features.
        in_chans: input channels.
        global_pool: ``"avg"``, ``"max"`` or ``""`` (no pooling: the final feature map; needs num_classes=0).
        drop_rate: dropout before the classifier, active in training mode (the paper used 0.5 on ImageNet).
        **config: architecture knobs, see :class:`XceptionConfig`.
    """
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    model = _MODEL_BUILDERS[name](num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
                                  drop_rate=drop_rate, **config)
    if weights is not None:
        load_weights(model, weights)
    return model
