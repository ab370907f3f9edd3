"""An Inception-V3-style network scaled down for small images: the baseline of ``xception experiment inception``.

The paper's Table 1 compares Xception with Inception V3 at about the same parameter count (22.9 M and 23.6 M).
Asking the same question at the scale of the compact recipe (28 px images, about 0.23 M parameters) needs an
Inception network of that size, built from Inception V3's own kinds of modules:

- stem: three 3x3 convolutions (no stride for small images), a 3x3/2 max-pool, a 1x1 and a 3x3 convolution;
- Inception-A: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 (a 5x5 factorised into two 3x3) | avg-pool -> 1x1;
- reduction A: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | max-pool, concatenated (the grid halves);
- Inception-B: 1x1 | 1x1 -> 1xn -> nx1 | 1x1 -> nx1 -> 1xn -> nx1 -> 1xn | avg-pool -> 1x1 (nxn factorised);
- reduction B: 1x1 -> strided 3x3 | 1x1 -> 1xn -> nx1 -> strided 3x3 | max-pool;
- Inception-C: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | avg-pool -> 1x1 (the expanded filter bank);
- global pooling, dropout and a linear classifier (no auxiliary tower: the paper trained without one).

Every convolution is followed by BatchNorm and ReLU, as in Inception V3. Branch widths are Inception V3's
(Szegedy et al. 2016) times ``width`` (the stem's times ``stem_width``: the compact Xception keeps half of its
stem's width and a far smaller fraction of the later layers', and so does this network by default); ``blocks``
sets how many A, B and C modules there are (V3: 3, 4, 2; default 1, 2, 1, as the compact Xception also has far
fewer modules than the paper's).
Strided layers pad, so a 28 px input goes 28 -> 14 -> 7 -> 4 like the compact Xception's.

The classifier is ``head.predictions`` and :meth:`InceptionV3Compact.architecture` returns the arguments that
rebuild the network, so training, checkpoints and ``xception eval`` treat it like the Xception family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .backbone import ClassifierHead
from .options import NetworkOptions, allowed, check_fields, check_options, refuse_unknown

# Inception V3's widths (branches of its Mixed_5b..7c modules), scaled by ``width``.
STEM_WIDTHS = (32, 32, 64, 80, 192)
C7_WIDTHS = (128, 160, 160, 192)  # inner width of the four Inception-B modules


@dataclass(frozen=True)
class InceptionOptions:
    """The baseline's knobs (see the module docstring), each held to its type and range (:mod:`.options`)."""

    width: float = field(default=0.128, metadata=allowed(above=0))  # Inception V3's branch widths times this
    stem_width: float | None = field(default=0.5, metadata=allowed(above=0))  # the stem's; None: ``width``
    # Inception-A, -B and -C modules (V3: 3, 4, 2)
    blocks: tuple[int, int, int] = field(default=(1, 2, 1), metadata=allowed(minimum=1, unit="count"))
    factor_size: int = field(default=7, metadata=allowed(minimum=1))  # n of Inception-B's 1xn and nx1; odd
    stem_stride: Literal[1, 2] = 1
    bn_eps: float = field(default=1e-3, metadata=allowed(above=0))
    bn_momentum: float = field(default=0.1, metadata=allowed(above=0, maximum=1))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.factor_size % 2 == 0:  # the 'same' padding of ConvBN needs a centre
            raise InvalidArgumentError(f"factor_size must be an odd kernel size, got {self.factor_size}")


class ConvBN(nn.Sequential):
    """Convolution without bias, BatchNorm, ReLU; 'same' padding for odd kernels (``stride`` 2 halves, rounding
    up)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 *, eps: float, momentum: float) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(
            nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=False),
            nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum),
            nn.ReLU(inplace=True))
        self.out_channels = out_channels


class Branches(nn.Module):
    """Parallel branches on the same input, concatenated along the channels: the Inception module's shape."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class SplitPair(nn.Module):
    """``(1x3 | 3x1)`` applied to one input and concatenated: Inception-C's expanded filter bank."""

    def __init__(self, in_channels: int, out_channels: int, **bn: float) -> None:
        super().__init__()
        self.horizontal = ConvBN(in_channels, out_channels, (1, 3), **bn)
        self.vertical = ConvBN(in_channels, out_channels, (3, 1), **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.horizontal(x), self.vertical(x)], dim=1)


def pool_branch(in_channels: int, out_channels: int, **bn: float) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                         ConvBN(in_channels, out_channels, 1, **bn))


def inception_a(c: int, w: Callable[[int], int], pool: int, **bn: float) -> tuple[Branches, int]:
    """Inception V3's 35x35 module: widths 64 | 48 -> 64 | 64 -> 96 -> 96 | pool -> ``pool``."""
    module = Branches(
        ConvBN(c, w(64), 1, **bn),
        nn.Sequential(ConvBN(c, w(48), 1, **bn), ConvBN(w(48), w(64), 3, **bn)),
        nn.Sequential(ConvBN(c, w(64), 1, **bn), ConvBN(w(64), w(96), 3, **bn), ConvBN(w(96), w(96), 3, **bn)),
        pool_branch(c, w(pool), **bn))
    return module, w(64) + w(64) + w(96) + w(pool)


def reduction_a(c: int, w: Callable[[int], int], **bn: float) -> tuple[Branches, int]:
    """Inception V3's 35 -> 17 grid reduction: 384/2 | 64 -> 96 -> 96/2 | max-pool."""
    module = Branches(
        ConvBN(c, w(384), 3, stride=2, **bn),
        nn.Sequential(ConvBN(c, w(64), 1, **bn), ConvBN(w(64), w(96), 3, **bn),
                      ConvBN(w(96), w(96), 3, stride=2, **bn)),
        nn.MaxPool2d(3, stride=2, padding=1))
    return module, w(384) + w(96) + c


def inception_b(c: int, w: Callable[[int], int], c7: int, n: int, **bn: float) -> tuple[Branches, int]:
    """Inception V3's 17x17 module, nxn convolutions factorised into 1xn and nx1: 192 | c7 -> c7 -> 192 |
    c7 -> c7 -> c7 -> c7 -> 192 | pool -> 192."""
    module = Branches(
        ConvBN(c, w(192), 1, **bn),
        nn.Sequential(ConvBN(c, w(c7), 1, **bn), ConvBN(w(c7), w(c7), (1, n), **bn),
                      ConvBN(w(c7), w(192), (n, 1), **bn)),
        nn.Sequential(ConvBN(c, w(c7), 1, **bn), ConvBN(w(c7), w(c7), (n, 1), **bn),
                      ConvBN(w(c7), w(c7), (1, n), **bn), ConvBN(w(c7), w(c7), (n, 1), **bn),
                      ConvBN(w(c7), w(192), (1, n), **bn)),
        pool_branch(c, w(192), **bn))
    return module, 4 * w(192)


def reduction_b(c: int, w: Callable[[int], int], n: int, **bn: float) -> tuple[Branches, int]:
    """Inception V3's 17 -> 8 grid reduction: 192 -> 320/2 | 192 -> 192 (1xn) -> 192 (nx1) -> 192/2 | max-pool."""
    module = Branches(
        nn.Sequential(ConvBN(c, w(192), 1, **bn), ConvBN(w(192), w(320), 3, stride=2, **bn)),
        nn.Sequential(ConvBN(c, w(192), 1, **bn), ConvBN(w(192), w(192), (1, n), **bn),
                      ConvBN(w(192), w(192), (n, 1), **bn), ConvBN(w(192), w(192), 3, stride=2, **bn)),
        nn.MaxPool2d(3, stride=2, padding=1))
    return module, w(320) + w(192) + c


def inception_c(c: int, w: Callable[[int], int], **bn: float) -> tuple[Branches, int]:
    """Inception V3's 8x8 module with the expanded filter bank: 320 | 384 -> (384, 384) | 448 -> 384 ->
    (384, 384) | pool -> 192."""
    module = Branches(
        ConvBN(c, w(320), 1, **bn),
        nn.Sequential(ConvBN(c, w(384), 1, **bn), SplitPair(w(384), w(384), **bn)),
        nn.Sequential(ConvBN(c, w(448), 1, **bn), ConvBN(w(448), w(384), 3, **bn), SplitPair(w(384), w(384), **bn)),
        pool_branch(c, w(192), **bn))
    return module, w(320) + 4 * w(384) + w(192)


class InceptionV3Compact(nn.Module):
    """Inception V3's module types at a width multiplier, for small images; see the module docstring."""

    def __init__(self, *, num_classes: int = 10, in_chans: int = 1, global_pool: str = "avg", drop_rate: float = 0.0,
                 width: float = 0.128, stem_width: float | None = 0.5, blocks: tuple[int, int, int] = (1, 2, 1),
                 factor_size: int = 7, stem_stride: int = 1, bn_eps: float = 1e-3, bn_momentum: float = 0.1) -> None:
        super().__init__()
        check_options(NetworkOptions, {"num_classes": num_classes, "in_chans": in_chans, "global_pool": global_pool,
                                       "drop_rate": drop_rate}, owner="inception_v3_compact")
        knobs = InceptionOptions(width=width, stem_width=stem_width, blocks=blocks, factor_size=factor_size,
                                 stem_stride=stem_stride, bn_eps=bn_eps, bn_momentum=bn_momentum)
        width, stem_width, blocks = knobs.width, knobs.stem_width, knobs.blocks
        self.model_name = "inception_v3_compact"
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.options = dataclasses.asdict(knobs)
        bn = {"eps": knobs.bn_eps, "momentum": knobs.bn_momentum}

        def w(channels: int) -> int:
            return max(1, round(channels * width))

        stem_scale = width if stem_width is None else stem_width
        s1, s2, s3, s4, s5 = (max(1, round(c * stem_scale)) for c in STEM_WIDTHS)
        layers: list[nn.Module] = [
            ConvBN(in_chans, s1, 3, stride=stem_stride, **bn), ConvBN(s1, s2, 3, **bn), ConvBN(s2, s3, 3, **bn),
            nn.MaxPool2d(3, stride=2, padding=1), ConvBN(s3, s4, 1, **bn), ConvBN(s4, s5, 3, **bn)]
        channels = s5
        for i in range(blocks[0]):
            module, channels = inception_a(channels, w, 32 if i == 0 else 64, **bn)
            layers.append(module)
        module, channels = reduction_a(channels, w, **bn)
        layers.append(module)
        for i in range(blocks[1]):
            module, channels = inception_b(channels, w, C7_WIDTHS[min(i, len(C7_WIDTHS) - 1)], factor_size, **bn)
            layers.append(module)
        module, channels = reduction_b(channels, w, factor_size, **bn)
        layers.append(module)
        for _ in range(blocks[2]):
            module, channels = inception_c(channels, w, **bn)
            layers.append(module)
        self.blocks = nn.Sequential(*layers)  # named as in the family, whose weight files start with "blocks."
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes, global_pool, drop_rate=drop_rate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The same initialisation as the Xception family, so that the comparison is about the architecture."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.Linear):
                module.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def architecture(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture with ``create_model``, saved with its weights."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, "global_pool": self.head.global_pool,
                "drop_rate": self.head.dropout.p, **self.options, "blocks": list(self.options["blocks"])}


def inception_v3_compact(*, num_classes: int = 10, in_chans: int = 1, global_pool: str = "avg",
                         drop_rate: float = 0.0, drop_path_rate: float = 0.0, output_stride: int = 32,
                         multi_grid: tuple[int, ...] | None = None, **options: Any) -> InceptionV3Compact:
    """The Inception-V3-style baseline for small images (``create_model("inception_v3_compact", ...)``).

    The backbone options that :func:`xception.create_model` passes to every builder have no meaning here and
    are refused unless left at their defaults. ``options``: ``width``, ``stem_width``, ``blocks``, ``factor_size``,
    ``stem_stride``, ``bn_eps``, ``bn_momentum``.
    """
    if drop_path_rate or output_stride != 32 or multi_grid is not None:
        raise InvalidArgumentError("inception_v3_compact has no stochastic depth, output stride or multi-grid: leave "
                                   "drop_path_rate, output_stride and multi_grid at their defaults")
    refuse_unknown(InceptionOptions, options, owner="inception_v3_compact")
    return InceptionV3Compact(num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
                              drop_rate=drop_rate, **options)
