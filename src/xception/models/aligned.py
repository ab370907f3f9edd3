"""The DeepLab "aligned" Xception family (Chen et al. 2018): Xception-41/65/71 and the pre-activation 41p/65p.

They differ from the paper's network in four ways: a strided separable convolution replaces each max-pool;
BatchNorm follows every depthwise convolution too; every block has three separable convolutions and the
middle flow is deeper; the exit flow's last block has no shortcut. The pre-activation variants move BN +
ReLU in front of each convolution. Layouts and parameter counts are those of timm's ``xception_aligned``
(whose checkpoints load directly), with symmetric padding as there.

Each network is a list of :class:`~xception.backbone.BlockSpec`: the same compact configuration as the
paper's network.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

from torch import nn

from ..layers import MidOperation, NormLayer, SeparableConv2d
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
from .options import NetworkOptions, check_options, refuse_unknown

BN_MOMENTUM = 0.1  # timm's, which trained the ra3 weights


def aligned_specs(entry: list[tuple[int, int]], middle_repeats: int) -> list[BlockSpec]:
    """Entry flow ``(width, stride)`` blocks, ``middle_repeats`` 728-wide blocks, the exit flow."""
    return [
        *(BlockSpec((width,) * 3, stride=stride) for width, stride in entry),
        *(BlockSpec((728,) * 3) for _ in range(middle_repeats)),
        BlockSpec((728, 1024, 1024), stride=2),
        BlockSpec((1536, 1536, 2048), preact=False, skip=False),
    ]


ENTRY_41_65 = [(128, 2), (256, 2), (728, 2)]
ENTRY_71 = [(128, 2), (256, 1), (256, 2), (728, 1), (728, 2)]  # 71 splits each stride from its widening


def separable(plan: BlockPlan, i: int, in_channels: int, mid: MidOperation, norm_layer: NormLayer) -> SeparableConv2d:
    """The ``i``-th (from 1) separable conv of a block: the block's stride, if any, goes in the last."""
    stride = plan.stride if i == len(plan.spec.widths) else 1
    return SeparableConv2d(in_channels, plan.spec.widths[i - 1], 3, stride=stride, dilation=plan.dilations[i - 1],
                           mid_activation=mid, padding="symmetric", norm_layer=norm_layer)


def shortcut_needed(plan: BlockPlan) -> bool:
    # A nominal stride turned into dilation still gets its 1x1 conv: the weights have one.
    return plan.spec.skip and (plan.stride > 1 or plan.spec.stride > 1 or plan.in_channels != plan.spec.widths[-1])


def aligned_module(plan: BlockPlan, *, norm_layer: NormLayer) -> ResidualBlock:
    """Entry, middle and the exit flow's first module: ``(ReLU, SepConv[dw BN], BN) x 3`` and a 1x1 conv + BN
    shortcut where the shape changes."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = plan.in_channels
    for i, width in enumerate(plan.spec.widths, start=1):
        layers[f"sepconv{i}_act"] = nn.ReLU(inplace=i > 1)  # the first keeps the input for the shortcut
        layers[f"sepconv{i}"] = separable(plan, i, channels, "bn", norm_layer)
        layers[f"sepconv{i}_bn"] = norm_layer(width)
        channels = width
    shortcut = None
    if shortcut_needed(plan):
        shortcut = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(plan.in_channels, channels, 1, stride=plan.stride, bias=False),
            bn=norm_layer(channels)))
    return ResidualBlock(layers, channels, skip=plan.spec.skip, shortcut=shortcut, drop_path=plan.drop_path)


def aligned_last_module(plan: BlockPlan, *, norm_layer: NormLayer) -> ResidualBlock:
    """The exit flow's last module: ``(SepConv[dw BN ReLU], BN, ReLU) x 3``, no shortcut. It ends on a ReLU,
    so the features need no final activation."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = plan.in_channels
    for i, width in enumerate(plan.spec.widths, start=1):
        layers[f"sepconv{i}"] = separable(plan, i, channels, "bn_relu", norm_layer)
        layers[f"sepconv{i}_bn"] = norm_layer(width)
        layers[f"sepconv{i}_act"] = nn.ReLU(inplace=True)
        channels = width
    return ResidualBlock(layers, channels, skip=False)


def preact_module(plan: BlockPlan, *, norm_layer: NormLayer) -> ResidualBlock:
    """Every block of a pre-activation network, the last too (it only lacks the shortcut): BN + ReLU on the
    block input (which the shortcut takes too), then three plain separable convs with BN + ReLU between
    them; the shortcut is a bare 1x1 conv."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = plan.in_channels
    for i, width in enumerate(plan.spec.widths, start=1):
        if i > 1:
            layers[f"sepconv{i}_norm"] = norm_layer(channels)
            layers[f"sepconv{i}_norm_act"] = nn.ReLU(inplace=True)
        layers[f"sepconv{i}"] = separable(plan, i, channels, None, norm_layer)
        channels = width
    shortcut = None
    if shortcut_needed(plan):
        shortcut = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(plan.in_channels, channels, 1, stride=plan.stride, bias=False)))
    entry = nn.Sequential(OrderedDict(bn=norm_layer(plan.in_channels), act=nn.ReLU(inplace=True)))
    return ResidualBlock(layers, channels, skip=plan.spec.skip, shortcut=shortcut, entry=entry,
                         drop_path=plan.drop_path)


class AlignedStem(nn.Sequential):
    """Two 3x3 convolutions (the first with stride 2), padded symmetrically; in pre-activation networks the
    second has no BN or ReLU, since the first block starts with them."""

    def __init__(self, in_chans: int, norm_layer: NormLayer, preact: bool) -> None:
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(in_chans, 32, 3, stride=2, padding=1, bias=False),
            conv1_bn=norm_layer(32),
            conv1_act=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(32, 64, 3, padding=1, bias=False),
            conv2_bn=nn.Identity() if preact else norm_layer(64),
            conv2_act=nn.Identity() if preact else nn.ReLU(inplace=True),
        ))
        self.out_channels = 64


class XceptionAligned(XceptionBase):
    """An aligned Xception: stem, blocks from ``specs``, (pre-activation: a final ReLU), classifier head."""

    def __init__(self, specs: list[BlockSpec], *, preact: bool, bn_eps: float, model_name: str,
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, output_stride: int = 32,
                 multi_grid: tuple[int, ...] | None = None) -> None:
        check_options(NetworkOptions, {"num_classes": num_classes, "in_chans": in_chans, "global_pool": global_pool,
                                       "drop_rate": drop_rate, "drop_path_rate": drop_path_rate,
                                       "output_stride": output_stride, "multi_grid": multi_grid}, owner=model_name)
        super().__init__(model_name=model_name, num_classes=num_classes, in_chans=in_chans,
                         output_stride=output_stride, multi_grid=multi_grid, drop_path_rate=drop_path_rate)
        self.preact = preact
        self.min_input_size = 32  # final feature map at least 1x1
        norm_layer = partial(nn.BatchNorm2d, eps=bn_eps, momentum=BN_MOMENTUM)
        plans = plan_blocks(specs, first_number=1, stem_channels=64, stem_reduction=2, output_stride=output_stride,
                            multi_grid=multi_grid, drop_path_rate=drop_path_rate)
        *modules, last = plans
        module = partial(preact_module if preact else aligned_module, norm_layer=norm_layer)
        last_module = partial(preact_module if preact else aligned_last_module, norm_layer=norm_layer)
        self.blocks = nn.Sequential(OrderedDict([
            ("stem", AlignedStem(in_chans, norm_layer, preact)),
            *named(module, modules),  # entry flow, middle flow, the exit flow's first module
            (last.name, last_module(last)),  # no shortcut
        ]))
        # Pre-activation blocks end on a sum: the network's output still needs its ReLU.
        self.final_act = nn.ReLU() if preact else nn.Identity()
        self.num_features = last.spec.widths[-1]
        self.feature_info = feature_info(self.blocks, plans, stem_reduction=2)
        self.tap_blocks = tap_indices(self.blocks, self.feature_info)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate=drop_rate)
        self.head_hidden_size = self.head.hidden_size
        self.reset_parameters()


def build(name: str, specs: list[BlockSpec], preact: bool, bn_eps: float, options: dict[str, Any]) -> XceptionAligned:
    refuse_unknown(NetworkOptions, options, owner=name)  # the aligned networks have no knobs of their own
    return XceptionAligned(specs, preact=preact, bn_eps=bn_eps, model_name=name, **options)


def xception41(**options: Any) -> XceptionAligned:
    """Aligned Xception-41 (26,969,560 parameters)."""
    return build("xception41", aligned_specs(ENTRY_41_65, 8), preact=False, bn_eps=1e-3, options=options)


def xception65(**options: Any) -> XceptionAligned:
    """Aligned Xception-65 (39,916,312 parameters)."""
    return build("xception65", aligned_specs(ENTRY_41_65, 16), preact=False, bn_eps=1e-3, options=options)


def xception71(**options: Any) -> XceptionAligned:
    """Aligned Xception-71 (42,338,736 parameters)."""
    return build("xception71", aligned_specs(ENTRY_71, 16), preact=False, bn_eps=1e-3, options=options)


def xception41p(**options: Any) -> XceptionAligned:
    """Pre-activation aligned Xception-41 (26,907,752 parameters; BN eps 1e-5, as trained)."""
    return build("xception41p", aligned_specs(ENTRY_41_65, 8), preact=True, bn_eps=1e-5, options=options)


def xception65p(**options: Any) -> XceptionAligned:
    """Pre-activation aligned Xception-65 (39,819,560 parameters)."""
    return build("xception65p", aligned_specs(ENTRY_41_65, 16), preact=True, bn_eps=1e-3, options=options)
