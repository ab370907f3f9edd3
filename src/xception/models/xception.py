"""The Xception network (Chollet 2017, Figure 5), exact to the author's Keras code.

The network reads top to bottom like the paper's figure, and every module carries the name of its
Keras layer: ``blocks.block5.layers.sepconv2_bn`` is Keras's ``block5_sepconv2_bn``.

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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from torch import nn

from ..layers import MaxPool2dSame, MidOperation, NormLayer, Order, SeparableConv2d, same_conv2d
from .backbone import (
    BlockPlan,
    BlockSpec,
    ClassifierHead,
    ResidualBlock,
    XceptionBase,
    feature_info,
    named,
    plan_blocks,
    tap_indices,
)
from .options import NetworkOptions, allowed, check_fields, check_options, refuse_unknown

Numerics = Literal["keras", "timm"]

# BatchNorm and max-pool settings of the two references. PyTorch's BN momentum is 1 - Keras's.
NUMERICS: dict[str, dict[str, Any]] = {
    "keras": {"bn_eps": 1e-3, "bn_momentum": 0.01, "tf_same_pool": True},
    "timm": {"bn_eps": 1e-5, "bn_momentum": 0.1, "tf_same_pool": False},
}


@dataclass(frozen=True)
class XceptionConfig:
    """Architecture knobs. The defaults are the paper's network. Each value is held to its field's type and, in the
    metadata, its range (:mod:`.options`), so that a wrong one, from Python or ``--set``, is refused in one line."""

    stem_widths: tuple[int, int] = field(default=(32, 64), metadata=allowed(minimum=1, unit="width"))
    stem_stride: Literal[1, 2] = 2  # 1 keeps small images (28x28, 32x32) at full resolution through the stem
    stem_padding: Literal["valid", "same"] = "valid"  # Keras's stem is valid: 299 -> 149 -> 147
    # the middle flow keeps the last of these
    entry_widths: tuple[int, ...] = field(default=(128, 256, 728),
                                          metadata=allowed(minimum=1, unit="width", nonempty=True))
    middle_repeats: int = field(default=8, metadata=allowed(minimum=0))
    exit_widths: tuple[int, int] = field(default=(728, 1024), metadata=allowed(minimum=1, unit="width"))
    tail_widths: tuple[int, int] = field(default=(1536, 2048), metadata=allowed(minimum=1, unit="width"))
    residual: bool = True  # the paper's Figure 9 compares with and without
    mid_activation: MidOperation = None  # between depthwise and pointwise: the paper's Figure 10
    order: Order = "depthwise_first"  # or "pointwise_first", the extreme Inception module
    # channel groups of each spatial conv; None = depthwise (SeparableConv2d checks that they divide the widths)
    segments: int | None = field(default=None, metadata=allowed(minimum=1))
    # hidden fully-connected layers before the classifier, e.g. (4096, 4096)
    fc_layers: tuple[int, ...] = field(default=(), metadata=allowed(minimum=1, unit="width"))
    numerics: Numerics = "keras"  # "keras": BN eps 1e-3, TF-same pooling; "timm": eps 1e-5, symmetric pooling
    # BN running-statistics momentum (PyTorch's convention); None: the numerics' (Keras 0.01, timm 0.1). Short
    # runs need a faster one: at 0.01 the statistics take a few hundred steps to settle.
    bn_momentum: float | None = field(default=None, metadata=allowed(above=0, maximum=1))

    def __post_init__(self) -> None:
        check_fields(self)  # lists become tuples, as the network and its saved architecture expect

    def norm_layer(self) -> NormLayer:
        """Builds every BatchNorm of the network: the numerics' eps, and their momentum unless overridden."""
        numerics = NUMERICS[self.numerics]
        momentum = numerics["bn_momentum"] if self.bn_momentum is None else self.bn_momentum
        return partial(nn.BatchNorm2d, eps=numerics["bn_eps"], momentum=momentum)

    def max_pool(self, stride: int) -> nn.Module:
        """The 3x3 max-pool of a module that halves the resolution (``stride`` 1 where that became dilation)."""
        if NUMERICS[self.numerics]["tf_same_pool"]:
            return MaxPool2dSame(3, stride)
        return nn.MaxPool2d(3, stride, padding=1)

    def block_specs(self) -> list[BlockSpec]:
        """Every block after the stem, in order: entry flow, middle flow, exit flow, and the last module
        (block14: two separable convolutions followed by ReLU, no residual)."""
        entry = [BlockSpec((w, w), stride=2, preact=i > 0, skip=self.residual)
                 for i, w in enumerate(self.entry_widths)]
        middle_width = self.entry_widths[-1]
        middle = [BlockSpec((middle_width,) * 3, skip=self.residual) for _ in range(self.middle_repeats)]
        exit_flow = BlockSpec(self.exit_widths, stride=2, skip=self.residual)
        tail = BlockSpec(self.tail_widths, preact=False, skip=False)
        return [*entry, *middle, exit_flow, tail]

    def min_input_size(self) -> int:
        """Smallest input side for which the final feature map is at least 3x3, Keras's limit (71)."""
        downsampling_blocks = sum(spec.stride == 2 for spec in self.block_specs())
        size = 1
        while True:
            if self.stem_padding == "valid":  # two valid 3x3 convs, the first strided
                side = (size - 3) // self.stem_stride + 1 - 2
            else:
                side = -(-size // self.stem_stride)
            for _ in range(downsampling_blocks):
                side = -(-side // 2)
            if side >= 3:
                return size
            size += 1


class Stem(nn.Sequential):
    """block1: two 3x3 convolutions, the first with stride 2 (valid padding in the paper's network), each
    followed by BN and ReLU. A Sequential, so that every conv -> BN pair is visible to BN folding."""

    def __init__(self, in_chans: int, widths: tuple[int, int], norm_layer: NormLayer, stride: int = 2,
                 padding: str = "valid") -> None:
        conv1 = same_conv2d(in_chans, widths[0], 3, stride=stride, bias=False) if padding == "same" else \
            nn.Conv2d(in_chans, widths[0], 3, stride=stride, bias=False)
        super().__init__(OrderedDict(
            conv1=conv1,
            conv1_bn=norm_layer(widths[0]),
            conv1_act=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(widths[0], widths[1], 3, padding=1 if padding == "same" else 0, bias=False),
            conv2_bn=norm_layer(widths[1]),
            conv2_act=nn.ReLU(inplace=True),
        ))
        self.out_channels = widths[1]


def separable(in_channels: int, out_channels: int, dilation: int, config: XceptionConfig,
              norm_layer: NormLayer) -> SeparableConv2d:
    return SeparableConv2d(in_channels, out_channels, 3, dilation=dilation, order=config.order,
                           mid_activation=config.mid_activation, segments=config.segments, norm_layer=norm_layer)


def xception_module(plan: BlockPlan, *, config: XceptionConfig, norm_layer: NormLayer) -> ResidualBlock:
    """block2..block13: ``[ReLU] SepConv BN (ReLU SepConv BN)* [MaxPool]`` plus a shortcut, a 1x1 conv + BN
    where the shape changes. Names are the Keras layer names within the block."""
    spec = plan.spec
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = plan.in_channels
    for i, width in enumerate(spec.widths, start=1):
        if i > 1 or spec.preact:  # block2's input is the stem's, already activated
            # The first ReLU must not work in place: the shortcut still needs the block's input.
            layers[f"sepconv{i}_act"] = nn.ReLU(inplace=i > 1)
        layers[f"sepconv{i}"] = separable(channels, width, plan.dilations[i - 1], config, norm_layer)
        layers[f"sepconv{i}_bn"] = norm_layer(width)
        channels = width
    if spec.stride == 2:
        # At an output stride below 32 the pool keeps the resolution (stride 1) and later blocks dilate.
        layers["pool"] = config.max_pool(plan.stride)
    shortcut = None
    if spec.skip and (spec.stride > 1 or plan.in_channels != channels):
        shortcut = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(plan.in_channels, channels, 1, stride=plan.stride, bias=False),
            bn=norm_layer(channels)))
    return ResidualBlock(layers, channels, skip=spec.skip, shortcut=shortcut, drop_path=plan.drop_path)


def block14(plan: BlockPlan, *, config: XceptionConfig, norm_layer: NormLayer) -> ResidualBlock:
    """The exit flow's last module (block14 at 8 middle-flow repeats): ``SepConv BN ReLU`` per width, no
    shortcut. It ends the network on a ReLU, so the features need no final activation."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = plan.in_channels
    for i, width in enumerate(plan.spec.widths, start=1):
        layers[f"sepconv{i}"] = separable(channels, width, plan.dilations[i - 1], config, norm_layer)
        layers[f"sepconv{i}_bn"] = norm_layer(width)
        layers[f"sepconv{i}_act"] = nn.ReLU(inplace=True)
        channels = width
    return ResidualBlock(layers, channels, skip=False)


class Xception(XceptionBase):
    """Xception: a linear stack of depthwise separable convolution modules with residual connections.

    ``forward`` = ``forward_head(forward_features(x))``. ``num_classes=0`` makes the output the pooled
    features (``num_features`` wide, or the last of ``fc_layers``); ``global_pool=""`` with
    ``num_classes=0`` returns the final feature map.

    ``output_stride`` 16 or 8 turns the last max-pools into stride-1 pools and dilates the blocks after
    them, as DeepLab does; ``multi_grid`` multiplies the dilation of the last module's two convolutions.
    The weights are the same at every output stride.
    """

    def __init__(self, config: XceptionConfig | None = None, *, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 output_stride: int = 32, multi_grid: tuple[int, ...] | None = None,
                 model_name: str = "xception") -> None:
        check_options(NetworkOptions, {"num_classes": num_classes, "in_chans": in_chans, "global_pool": global_pool,
                                       "drop_rate": drop_rate, "drop_path_rate": drop_path_rate,
                                       "output_stride": output_stride, "multi_grid": multi_grid}, owner=model_name)
        super().__init__(model_name=model_name, num_classes=num_classes, in_chans=in_chans,
                         output_stride=output_stride, multi_grid=multi_grid, drop_path_rate=drop_path_rate)
        config = config or XceptionConfig()
        self.config = config
        self.min_input_size = config.min_input_size()
        norm_layer = config.norm_layer()
        plans = plan_blocks(config.block_specs(), first_number=2, stem_channels=config.stem_widths[1],
                            stem_reduction=config.stem_stride, output_stride=output_stride, multi_grid=multi_grid,
                            drop_path_rate=drop_path_rate)
        entries = len(config.entry_widths)
        entry, middle, (exit_module, last) = plans[:entries], plans[entries:-2], plans[-2:]
        module = partial(xception_module, config=config, norm_layer=norm_layer)
        # Figure 5 top to bottom, under Keras's block names.
        self.blocks = nn.Sequential(OrderedDict([
            # entry flow
            ("block1", Stem(in_chans, config.stem_widths, norm_layer, config.stem_stride, config.stem_padding)),
            *named(module, entry),
            # middle flow
            *named(module, middle),
            # exit flow
            *named(module, [exit_module]),
            (last.name, block14(last, config=config, norm_layer=norm_layer)),
        ]))
        self.final_act = nn.Identity()  # block14 ends with its own ReLU
        self.num_features = config.tail_widths[-1]
        self.feature_info = feature_info(self.blocks, plans, stem_reduction=config.stem_stride)
        self.tap_blocks = tap_indices(self.blocks, self.feature_info)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, config.fc_layers, drop_rate)
        self.head_hidden_size = self.head.hidden_size
        self.reset_parameters()

    def architecture(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture with ``create_model``, saved with its weights."""
        return {**super().architecture(), **dataclasses.asdict(self.config)}


def xception(*, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
             drop_path_rate: float = 0.0, output_stride: int = 32, multi_grid: tuple[int, ...] | None = None,
             **config: Any) -> Xception:
    """The paper's Xception (22,855,952 parameters with 1000 classes); knobs as in :class:`XceptionConfig`."""
    refuse_unknown(XceptionConfig, config, owner="Xception")
    return Xception(XceptionConfig(**config), num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
                    drop_rate=drop_rate, drop_path_rate=drop_path_rate, output_stride=output_stride,
                    multi_grid=multi_grid, model_name="xception")
