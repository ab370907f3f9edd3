"""Building blocks: TensorFlow-exact 'same' padding, depthwise separable convolutions and the
Inception spectrum between a regular and a depthwise separable convolution.

The paper (Chollet 2017, section 2) describes one family of layers: a 1x1 convolution that mixes
channels and a kxk convolution that looks at space, the latter split into ``segments`` independent
channel groups. One segment is the Inception-style factorised convolution; one segment per channel is
the "extreme Inception" module, which is a depthwise separable convolution up to two details: the order
of the two operations and the non-linearity between them. :class:`SeparableConv2d` exposes all three
knobs; :class:`SpectrumConv2d` is the same layer with the paper's spectrum defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError

Order = Literal["depthwise_first", "pointwise_first"]
MidOperation = Literal[None, "relu", "elu", "bn", "bn_relu"]
Padding = Literal["same", "symmetric"]

MID_OPERATIONS = (None, "relu", "elu", "bn", "bn_relu")
ORDERS = ("depthwise_first", "pointwise_first")

# Builds the normalisation of a given number of channels, e.g. ``partial(nn.BatchNorm2d, eps=1e-5)``: one
# argument carries every BN setting of a network, however deep the layer that needs it.
NormLayer = Callable[[int], nn.Module]
# Keras's BatchNormalization defaults: eps 1e-3, momentum 0.99 (PyTorch counts momentum the other way).
keras_batch_norm: NormLayer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


def tf_same_padding(size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """Padding (before, after) that TensorFlow's ``padding='same'`` adds to one spatial dimension.

    TensorFlow makes the output ``ceil(size / stride)`` long and, when the total padding is odd, puts
    the extra element after the input. PyTorch's symmetric padding differs whenever that happens.
    """
    effective_kernel = (kernel_size - 1) * dilation + 1
    # ceil(size / stride) for size >= 1, written as a convolution's output size: with symbolic sizes (torch.export
    # with a dynamic height and width) it is then the very expression of a strided 1x1 shortcut's output.
    out = (size - 1) // stride + 1
    total = (out - 1) * stride + effective_kernel - size
    if effective_kernel < stride:  # only then can the total be negative; a static test, no branch on the size
        total = max(total, 0)
    return total // 2, total - total // 2


def fixed_same_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int | None:
    """TensorFlow's 'same' padding where it is the same on both sides at every input size (stride 1, odd
    effective kernel), else None."""
    effective_kernel = (kernel_size - 1) * dilation + 1
    return (effective_kernel - 1) // 2 if stride == 1 and effective_kernel % 2 == 1 else None


def same_conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                groups: int = 1, bias: bool = True) -> nn.Conv2d:
    """A convolution with TensorFlow's 'same' padding: a plain ``nn.Conv2d`` where that padding is fixed (every
    depthwise convolution of Xception), a :class:`Conv2dSame` only where it depends on the input size. Tools that
    recognise convolutions by their exact type, such as PyTorch's int8 quantizer, then see plain ones."""
    padding = fixed_same_padding(kernel_size, stride, dilation)
    if padding is None:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups,
                          bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's 'same' padding, asymmetric where TensorFlow pads asymmetrically.

    Where the padding is symmetric for every input size (stride 1), it is fixed at construction and costs
    nothing; otherwise it is computed from each input's size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, **factory) -> None:
        padding = fixed_same_padding(kernel_size, stride, dilation)
        self.static_padding = padding is not None
        padding = padding or 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static_padding:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.weight, self.bias)


def pad_same(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int]) -> torch.Tensor:
    """``x`` padded with zeros as TensorFlow's 'same' convolution pads it."""
    top, bottom = tf_same_padding(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    left, right = tf_same_padding(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (left, right, top, bottom))


class MaxPool2dSame(nn.Module):
    """Max-pooling with TensorFlow's 'same' padding.

    TensorFlow pads with -inf, ``floor(total / 2)`` before and the rest after. Where that is symmetric
    (odd sizes, for a 3x3 window at stride 2) it is PyTorch's own padding. Where it is not, with a stride
    above 1 ``ceil_mode=True`` lets a last window run off the end, which is exactly one extra -inf element
    after: so padding ``before`` on both sides with ``ceil_mode`` reproduces TensorFlow without copying the
    input. At stride 1 ``ceil_mode`` adds no window, so an odd total padding is padded explicitly.

    ``explicit_padding = True`` avoids ``ceil_mode``, which Inductor's int8 lowering mishandles (the int8
    deploy path sets it): an odd window is pooled at stride 1 with symmetric padding and every ``stride``-th
    window kept, which are exactly TensorFlow's (a padded element is one a window at stride 1 also sees as
    padding); an even window is padded explicitly with -inf (a copy of the input, which int8 cannot hold).

    ``shape_agnostic = True`` makes one graph serve every input size (ONNX export with a dynamic height and width
    sets it): see :func:`_gather_windows`.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.explicit_padding = False
        self.shape_agnostic = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d_same(x, self.kernel_size, self.stride, self.explicit_padding, self.shape_agnostic)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=tf_same"


def max_pool2d_same(x: torch.Tensor, kernel_size: int, stride: int, explicit_padding: bool,
                    shape_agnostic: bool) -> torch.Tensor:
    """:class:`MaxPool2dSame`'s pooling (see it for the paths)."""
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride)
    if shape_agnostic and kernel_size >= stride:
        return _gather_windows(x, kernel_size, stride, top, left)
    if bottom == top and right == left:
        return F.max_pool2d(x, kernel_size, stride, padding=(top, left))
    if explicit_padding and kernel_size % 2 == 1:
        half = kernel_size // 2  # >= the padding on either side, for TensorFlow's 'same'
        height, width = -(-x.shape[-2] // stride), -(-x.shape[-1] // stride)
        pooled = F.max_pool2d(x, kernel_size, 1, padding=half)
        return pooled[..., half - top::stride, half - left::stride][..., :height, :width]
    if explicit_padding or stride == 1:
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, kernel_size, stride)
    return F.max_pool2d(x, kernel_size, stride, padding=(top, left), ceil_mode=True)


def _gather_windows(x: torch.Tensor, kernel_size: int, stride: int, top: int, left: int) -> torch.Tensor:
    """One graph for every input size, for an export with a dynamic height and width (``shape_agnostic``):
    which windows TensorFlow keeps depends on the parity of the size, which the paths above branch on and an
    exported graph would freeze. Here every window is pooled at stride 1 and TensorFlow's are gathered by
    index, computed from the size. Exact; slower than the paths above, so only exports set it."""
    half = kernel_size // 2
    height, width = (x.shape[-2] - 1) // stride + 1, (x.shape[-1] - 1) // stride + 1
    pooled = F.max_pool2d(x, kernel_size, 1, padding=half)
    rows = torch.arange(height, device=x.device) * stride + (half - top)
    cols = torch.arange(width, device=x.device) * stride + (half - left)
    return pooled.index_select(-2, rows).index_select(-1, cols)


# The 'same' padding is computed from the input's size, which torch.fx's symbolic tracing cannot branch on: traced,
# these are calls in the graph, run at each input's size (torchvision's create_feature_extractor, timm's FX features).
torch.fx.wrap("pad_same")
torch.fx.wrap("max_pool2d_same")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the samples and rescale
    the others by 1 / (1 - rate), so that the expected output is unchanged. The identity in evaluation."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise InvalidArgumentError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def make_mid_operations(mid: MidOperation, channels: int,
                        norm_layer: NormLayer = keras_batch_norm) -> tuple[nn.Module, nn.Module]:
    """The (normalisation, activation) pair between the two halves of a separable convolution."""
    if mid not in MID_OPERATIONS:
        raise InvalidArgumentError(f"mid_activation must be one of {MID_OPERATIONS}, got {mid!r}")
    norm: nn.Module = nn.Identity()
    if mid in ("bn", "bn_relu"):
        norm = norm_layer(channels)
    activation: nn.Module = nn.Identity()
    if mid in ("relu", "bn_relu"):
        activation = nn.ReLU(inplace=True)
    elif mid == "elu":
        activation = nn.ELU(inplace=True)
    return norm, activation


class SeparableConv2d(nn.Module):
    """A spatial kxk convolution over independent channel groups and a 1x1 convolution across channels.

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size, stride, dilation: of the spatial convolution. Padding is 'same' (TensorFlow-exact).
        depth_multiplier: spatial filters per input channel (depthwise-first order only).
        order: ``"depthwise_first"`` (Xception, TensorFlow's SeparableConv2D) or ``"pointwise_first"``
            (the "extreme Inception" module: 1x1 first, then one spatial filter per channel).
        mid_activation: what runs between the two convolutions: ``None`` (Xception), ``"relu"``,
            ``"elu"`` (the paper's Figure 10), ``"bn"`` or ``"bn_relu"`` (the DeepLab "aligned" variants).
        segments: independent channel groups of the spatial convolution; ``None`` means one per channel
            (a depthwise convolution). 1 makes the spatial convolution a regular one.
        bias: add a bias to whichever convolution comes last.
        padding: ``"same"`` (TensorFlow-exact, asymmetric where TensorFlow is) or ``"symmetric"``
            (PyTorch's ``(stride - 1 + dilation * (k - 1)) // 2`` on both sides, as timm's models use).
        norm_layer: builds the BatchNorm of ``mid_activation="bn"`` or ``"bn_relu"`` from its channels
            (default: Keras's settings, eps 1e-3 and momentum 0.01).

    :meth:`count_parameters` gives the parameter count in closed form.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 dilation: int = 1, depth_multiplier: int = 1, order: Order = "depthwise_first",
                 mid_activation: MidOperation = None, segments: int | None = None, bias: bool = False,
                 padding: Padding = "same", norm_layer: NormLayer = keras_batch_norm) -> None:
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise InvalidArgumentError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        if order not in ORDERS:
            raise InvalidArgumentError(f"order must be one of {ORDERS}, got {order!r}")
        if order == "pointwise_first" and depth_multiplier != 1:
            raise InvalidArgumentError("depth_multiplier must be 1 when order='pointwise_first': the extreme Inception "
                                       "module has one spatial filter per channel")
        spatial_in = in_channels if order == "depthwise_first" else out_channels
        spatial_out = spatial_in * depth_multiplier
        segments = spatial_in if segments is None else segments
        if segments < 1 or spatial_in % segments:
            raise InvalidArgumentError(f"segments must divide the {spatial_in} channels of the spatial convolution, "
                                       f"got {segments}")
        self.order = order
        self.segments = segments
        self.depth_multiplier = depth_multiplier
        self.in_channels = in_channels
        self.out_channels = out_channels

        spatial_bias = bias and order == "pointwise_first"
        if padding == "same":
            spatial = same_conv2d(spatial_in, spatial_out, kernel_size, stride=stride, dilation=dilation,
                                  groups=segments, bias=spatial_bias)
        else:
            spatial = nn.Conv2d(spatial_in, spatial_out, kernel_size, stride=stride, dilation=dilation,
                                padding=(stride - 1 + dilation * (kernel_size - 1)) // 2, groups=segments,
                                bias=spatial_bias)
        if order == "depthwise_first":
            self.depthwise = spatial
            self.mid_norm, self.mid = make_mid_operations(mid_activation, spatial_out, norm_layer)
            self.pointwise = nn.Conv2d(spatial_out, out_channels, 1, bias=bias)
        else:
            self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.mid_norm, self.mid = make_mid_operations(mid_activation, out_channels, norm_layer)
            self.depthwise = spatial

    @staticmethod
    def count_parameters(in_channels: int, out_channels: int, kernel_size: int = 3, *,
                         depth_multiplier: int = 1, order: Order = "depthwise_first",
                         segments: int | None = None) -> int:
        """Weights of the layer without bias or mid BatchNorm.

        depthwise-first, C_in channels split into s segments:  k^2 * C_in * m * C_in / s + C_in * m * C_out
        pointwise-first, C_out channels split into s segments: C_in * C_out + k^2 * C_out * C_out / s
        s = 1 is a regular spatial convolution; s = channels a depthwise one.
        """
        k2 = kernel_size * kernel_size
        if order == "depthwise_first":
            s = in_channels if segments is None else segments
            spatial_out = in_channels * depth_multiplier
            return k2 * spatial_out * (in_channels // s) + spatial_out * out_channels
        s = out_channels if segments is None else segments
        return in_channels * out_channels + k2 * out_channels * (out_channels // s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "depthwise_first":
            return self.pointwise(self.mid(self.mid_norm(self.depthwise(x))))
        return self.depthwise(self.mid(self.mid_norm(self.pointwise(x))))


class SpectrumConv2d(SeparableConv2d):
    """A point on the paper's Inception spectrum: a 1x1 projection, then a kxk convolution over
    ``segments`` independent channel groups.

    ``segments=1`` is the regular (Inception-style factorised) form; ``segments=out_channels`` is the
    extreme Inception module. Parameters without bias: ``in * out + k^2 * out^2 / segments``.
    The paper's Inception modules put a ReLU after the projection; pass ``mid_activation="relu"`` for it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, segments: int,
                 stride: int = 1, dilation: int = 1, mid_activation: MidOperation = None, bias: bool = False,
                 norm_layer: NormLayer = keras_batch_norm) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                         order="pointwise_first", mid_activation=mid_activation, segments=segments, bias=bias,
                         norm_layer=norm_layer)
