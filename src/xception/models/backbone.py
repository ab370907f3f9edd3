"""What every network of the family shares: residual blocks, the classifier head, and the backbone API
(``forward_features`` / ``forward_head``, multi-scale features, output stride, gradient checkpointing).

A network is ``blocks`` (an ``nn.Sequential`` whose first entry is the stem) followed by ``final_act`` and
``head``. Its ``__init__`` lays the blocks out with :func:`plan_blocks`, builds them, and derives
:func:`feature_info` from them: the outputs of the last block at each stride (2, 4, 8, 16, 32).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError
from ..layers import DropPath

GLOBAL_POOLS = ("avg", "max", "")
OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class BlockSpec:
    """One block of a network, the unit of the compact configurations that drive the whole family."""

    widths: tuple[int, ...]  # output channels of each separable convolution
    stride: int = 1  # 2: the block halves the resolution (by max-pool or by a strided last conv)
    preact: bool = True  # ReLU before the first separable conv (False where the input is already activated)
    skip: bool = True  # residual connection


@dataclass(frozen=True)
class BlockPlan:
    """A block placed in a network once the output stride is fixed: later strides become dilation, as in
    DeepLab. Everything a block builder needs."""

    name: str  # its key in ``blocks``, hence in the state dict
    spec: BlockSpec
    in_channels: int
    stride: int  # the stride the block really applies (1 where it was turned into dilation)
    dilations: tuple[int, ...]  # of each separable convolution (output stride, times multi-grid in the last)
    drop_path: float  # stochastic depth rate of its residual branch
    reduction: int  # input pixels per output pixel after the block
    nominal_reduction: int  # the same at output stride 32


def plan_blocks(specs: list[BlockSpec], *, first_number: int, stem_channels: int, stem_reduction: int,
                output_stride: int, multi_grid: tuple[int, ...] | None, drop_path_rate: float) -> list[BlockPlan]:
    """Name the blocks after the stem ``block<first_number>``... and place them: input channels, strides and
    dilations for ``output_stride``, ``multi_grid`` rates in the last block, stochastic depth rates."""
    if output_stride not in OUTPUT_STRIDES:
        raise InvalidArgumentError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    last_rates = check_multi_grid(multi_grid, specs[-1])
    path_rates = drop_path_rates(drop_path_rate, specs)
    plans: list[BlockPlan] = []
    channels, reduction, nominal, dilation = stem_channels, stem_reduction, stem_reduction, 1
    for i, (spec, path_rate) in enumerate(zip(specs, path_rates, strict=True)):
        stride = spec.stride
        block_dilation = dilation
        nominal *= spec.stride
        if reduction * spec.stride > output_stride:
            dilation *= spec.stride  # the blocks after this one see the resolution it did not halve
            stride = 1
        reduction *= stride
        rates = last_rates if i == len(specs) - 1 else (1,) * len(spec.widths)
        plans.append(BlockPlan(f"block{first_number + i}", spec, channels, stride,
                               tuple(block_dilation * rate for rate in rates), path_rate, reduction, nominal))
        channels = spec.widths[-1]
    return plans


def named(build: Callable[[BlockPlan], nn.Module], plans: list[BlockPlan]) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` pairs, built in order, ready for ``nn.Sequential(OrderedDict([...]))``."""
    return [(plan.name, build(plan)) for plan in plans]


def check_multi_grid(multi_grid: tuple[int, ...] | None, last: BlockSpec) -> tuple[int, ...]:
    if multi_grid is None:
        return (1,) * len(last.widths)
    multi_grid = tuple(multi_grid)
    if len(multi_grid) != len(last.widths) or not all(isinstance(r, int) and r >= 1 for r in multi_grid):
        raise InvalidArgumentError(f"multi_grid needs {len(last.widths)} positive integer rates, one per separable "
                                   f"convolution of the last block, got {multi_grid}")
    return multi_grid


class ResidualBlock(nn.Module):
    """``layers(entry(x))`` plus, with ``skip``, a shortcut of ``entry(x)`` (identity or 1x1 conv + BN).

    ``entry`` is the identity except in pre-activation networks, whose blocks start with BN + ReLU.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int, *, skip: bool,
                 shortcut: nn.Module | None = None, entry: nn.Module | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.entry = entry if entry is not None else nn.Identity()
        self.layers = nn.Sequential(layers)
        self.skip = skip
        self.shortcut = shortcut
        self.drop_path = DropPath(drop_path) if drop_path > 0 and skip else nn.Identity()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        out = self.layers(x)
        if not self.skip:
            return out
        out = self.drop_path(out)
        if self.shortcut is not None:
            return out + self.shortcut(x)
        return out + x


def drop_path_rates(rate: float, blocks: list[BlockSpec]) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first residual block to ``rate`` at the last; blocks
    without a residual connection get none (dropping them would drop the whole signal)."""
    if not 0.0 <= rate < 1.0:
        raise InvalidArgumentError(f"drop_path_rate must be in [0, 1), got {rate}")
    residual = [i for i, spec in enumerate(blocks) if spec.skip]
    rates = [0.0] * len(blocks)
    for position, index in enumerate(residual):
        rates[index] = rate * position / max(len(residual) - 1, 1)
    return rates


class ClassifierHead(nn.Module):
    """Global pooling, optional hidden fully-connected layers, dropout, and the linear classifier."""

    def __init__(self, in_features: int, num_classes: int, global_pool: str, fc_layers: tuple[int, ...] = (),
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        check_head_arguments(num_classes, global_pool, drop_rate, bool(fc_layers))
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
        check_head_arguments(num_classes, pool, self.dropout.p, len(self.fc_layers) > 0)
        self.global_pool = pool
        reference = next(self.parameters(), None)
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        self.predictions = nn.Linear(self.hidden_size, num_classes, **factory) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        elif self.global_pool == "max":
            x = x.amax((2, 3))
        x = self.dropout(self.fc_layers(x))
        return x if pre_logits else self.predictions(x)


def check_head_arguments(num_classes: int, global_pool: str, drop_rate: float, has_fc_layers: bool) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise InvalidArgumentError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if num_classes < 0:
        raise InvalidArgumentError(f"num_classes must be >= 0 (0 drops the classifier), got {num_classes}")
    if num_classes and not global_pool:
        raise InvalidArgumentError("global_pool='' returns the final feature map and needs num_classes=0")
    if has_fc_layers and not global_pool:
        raise InvalidArgumentError("fc_layers need a global_pool ('avg' or 'max')")
    if not 0.0 <= drop_rate < 1.0:
        raise InvalidArgumentError(f"drop_rate must be in [0, 1), got {drop_rate}")


def feature_info(blocks: nn.Sequential, plans: list[BlockPlan], stem_reduction: int) -> list[dict[str, Any]]:
    """The feature maps in timm's format: the output of the last block at each nominal stride, the stem's
    first. ``blocks`` is the stem followed by the blocks of ``plans``."""
    names = [name for name, _ in blocks.named_children()]
    nominal = [stem_reduction] + [plan.nominal_reduction for plan in plans]
    reduction = [stem_reduction] + [plan.reduction for plan in plans]
    return [{"num_chs": blocks[i].out_channels, "reduction": reduction[i], "module": f"blocks.{names[i]}"}
            for i in range(len(names)) if i + 1 == len(names) or nominal[i + 1] != nominal[i]]


def tap_indices(blocks: nn.Sequential, info: list[dict[str, Any]]) -> list[int]:
    """Indices into ``blocks`` of the feature maps ``info``: the forward passes tap them by position."""
    names = [f"blocks.{name}" for name, _ in blocks.named_children()]
    return [names.index(entry["module"]) for entry in info]


class XceptionBase(nn.Module):
    """The backbone API shared by every network of the family.

    A subclass's ``__init__`` sets ``min_input_size`` and builds, in this order (parameters are created, hence
    seeded, in it): ``blocks`` (stem first), ``final_act``, ``num_features``, ``feature_info`` and
    ``tap_blocks``, ``head`` and ``head_hidden_size``; then calls :meth:`reset_parameters`.
    """

    def __init__(self, *, model_name: str, num_classes: int, in_chans: int, output_stride: int,
                 multi_grid: tuple[int, ...] | None, drop_path_rate: float) -> None:
        super().__init__()
        if in_chans < 1:
            raise InvalidArgumentError(f"in_chans must be >= 1, got {in_chans}")
        self.model_name = model_name  # the registry name, saved with the weights
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_stride = output_stride
        self.multi_grid = multi_grid
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False
        self.pretrained_weights = None  # the registered Weights once loaded (their transforms(), metadata)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the network cannot take, naming what was expected."""
        check_images(x, self.in_chans, self.min_input_size)

    @torch.jit.unused
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them: less memory, the
        same outputs and gradients, about one more forward pass of time. BatchNorm running statistics are
        updated again during the recomputation."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.final_act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, *,
                              stop_early: bool = False, intermediates_only: bool = False):
        """The final features and the feature maps ``indices`` (into :attr:`feature_info`; an int n means the
        last n; None all). Returns ``(final, [maps])``, or only the maps with ``intermediates_only``; with
        ``stop_early`` the blocks after the last requested map are skipped (implies ``intermediates_only``)."""
        wanted = resolve_indices(indices, len(self.tap_blocks))
        taps = {self.tap_blocks[i]: i for i in wanted}
        self.check_input(x)
        maps: dict[int, torch.Tensor] = {}
        last_needed = max(taps)
        for index, block in enumerate(self.blocks):
            if stop_early and index > last_needed:
                break
            x = block(x)
            if index in taps:
                maps[taps[index]] = x
        intermediates = [maps[i] for i in wanted]
        if intermediates_only or stop_early:
            return intermediates
        return self.final_act(x), intermediates

    def get_classifier(self) -> nn.Module:
        return self.head.predictions

    def reset_parameters(self) -> None:
        """He-normal convolutions, unit BN scale and zero shift, PyTorch's default for linear layers."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.Linear):
                module.reset_parameters()

    def architecture(self) -> dict:
        """The arguments that rebuild this architecture with ``create_model``, saved with its weights."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, "global_pool": self.head.global_pool,
                "drop_rate": self.head.dropout.p, "drop_path_rate": self.drop_path_rate,
                "output_stride": self.output_stride, "multi_grid": self.multi_grid}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (freshly initialised) for ``num_classes`` classes; 0 removes it."""
        self.head.reset(num_classes, global_pool)
        self.num_classes = num_classes


def check_images(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Refuse an input that is not an NCHW batch of ``in_chans`` channels at least ``min_size`` pixels a side."""
    if x.dim() != 4:
        raise InvalidArgumentError("expected an NCHW batch with 4 dimensions, got shape " + str(list(x.shape)))
    if x.shape[1] != in_chans:
        raise InvalidArgumentError("expected " + str(in_chans) + " input channels, got " + str(x.shape[1])
                                   + " (shape " + str(list(x.shape)) + "); build the model with in_chans="
                                   + str(x.shape[1]) + " or convert the images")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise InvalidArgumentError("input " + str(x.shape[2]) + "x" + str(x.shape[3]) + " is too small: this "
                                   + "model needs at least " + str(min_size) + "x"
                                   + str(min_size) + " pixels")


# The checks read the input's shape, which torch.fx's symbolic tracing cannot branch on: traced, they are a call in
# the graph, run on each input (torchvision's create_feature_extractor, timm's FX feature extraction).
torch.fx.wrap("check_images")


def resolve_indices(indices: int | list[int] | tuple[int, ...] | None, count: int) -> list[int]:
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise InvalidArgumentError(f"asked for the last {indices} feature maps, but there are {count}")
        return list(range(count - indices, count))
    resolved = [i + count if i < 0 else i for i in indices]
    bad = [i for i, r in zip(indices, resolved, strict=True) if not 0 <= r < count]
    if bad or not resolved:
        raise InvalidArgumentError(f"out_indices {tuple(indices)} out of range: this model has {count} feature maps "
                                   f"(indices 0..{count - 1}, or negative from the end)")
    return resolved


class FeatureExtractor(nn.Module):
    """A backbone that returns feature maps instead of logits, for segmentation and detection.

    Built without forward hooks (the blocks after the last requested map are dropped, the head too), so it
    works with ``torch.jit.script``, ``torch.export.export`` and ``torch.compile``.
    """

    def __init__(self, model: XceptionBase, out_indices: tuple[int, ...] | list[int] | None = None) -> None:
        super().__init__()
        wanted = sorted(set(resolve_indices(out_indices, len(model.tap_blocks))))
        self.taps = [model.tap_blocks[i] for i in wanted]
        self.blocks = model.blocks[: max(self.taps) + 1]
        self.feature_info = [model.feature_info[i] for i in wanted]
        self.in_chans = model.in_chans
        self.model_name = model.model_name

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InvalidArgumentError("expected an NCHW batch with " + str(self.in_chans) + " channels, got shape "
                                       + str(list(x.shape)))
        features: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
        return features
