"""DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
ECCV 2018) and DeepLabV3 (the same without its decoder, for the ablation) on any backbone of the family.

The model reads like the paper's Figure 2, one submodule per box:

- ``backbone``: the classification network built with ``num_classes=0, global_pool=""`` at the model's output
  stride (its later strides become dilation). Its feature maps come from ``forward_intermediates``, without hooks.
- ``aspp``: atrous spatial pyramid pooling on the last feature map: a 1x1 branch, three atrous 3x3 branches
  and image-level pooling, each ``aspp_channels`` (256) wide, concatenated and projected back to 256 by a 1x1
  convolution, then dropout (0.1: the paper's code, tensorflow/models research/deeplab/model.py, keeps 0.9).
- ``decoder`` (DeepLabV3+ only): the stride-4 feature map projected to 48 channels (1x1 conv, BN, ReLU),
  concatenated with the ASPP output upsampled to stride 4, refined by two 3x3 convolutions of 256.
- ``classifier``: a 1x1 convolution to ``num_classes``; its logits are upsampled bilinearly to the input size.

In the paper's "Xception setting" every 3x3 convolution of ASPP and the decoder is depthwise separable, with
BatchNorm and ReLU after each half (``separable=True``, the default; False makes them regular convolutions).
The head's BatchNorm uses PyTorch's defaults (eps 1e-5, momentum 0.1): the paper's code uses decay 0.9997, which
takes thousands of steps for the running statistics to settle.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..layers import SeparableConv2d
from .options import allowed, check_options

# The backbones DeepLab is built on: the registry offers deeplabv3plus_<name> and deeplabv3_<name> for each.
BACKBONES = ("xception", "xception41", "xception65", "xception71", "xception41p", "xception65p")
HEADS = ("deeplabv3plus", "deeplabv3")
PAPER_RATES = (6, 12, 18)  # the paper's atrous rates at output stride 16
LOW_LEVEL_REDUCTION = 4  # the decoder's skip connection: the paper's stride-4 features


@dataclass(frozen=True)
class HeadOptions:
    """The head's options, which :func:`build` takes beside the backbone's, each held to its type and range
    (:mod:`.options`). The defaults are the paper's."""

    aspp_channels: int = field(default=256, metadata=allowed(minimum=1))
    # one per atrous branch, e.g. (6, 12, 18); None: atrous_rates_for the backbone's output stride
    atrous_rates: tuple[int, ...] | None = field(default=None, metadata=allowed(minimum=1, unit="rate", nonempty=True))
    decoder_channels: int | None = field(default=None, metadata=allowed(minimum=1))  # None: 256 (DeepLabV3+)
    low_level_channels: int | None = field(default=None, metadata=allowed(minimum=1))  # None: 48 (DeepLabV3+)
    separable: bool = True
    drop_rate: float = field(default=0.1, metadata=allowed(minimum=0, below=1))  # after the ASPP projection
    input_scale: float = field(default=1.0, metadata=allowed(above=0, maximum=1))  # see DeepLab
    backbone_weights: str | Path | None = None


def atrous_rates_for(reduction: int) -> tuple[int, ...]:
    """The ASPP rates for a last feature map at ``reduction``: the paper's 6/12/18 at 16, doubled at 8 (as the
    paper does), halved at 32. The paper gives no rates for 32; halving keeps each branch's field of view the same
    in input pixels (6 x 16 = 3 x 32 = 96), which is what the doubling at 8 does too."""
    return tuple(max(1, round(rate * 16 / reduction)) for rate in PAPER_RATES)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, *, dilation: int = 1,
                 separable: bool = False) -> nn.Sequential:
    """Convolution, BatchNorm, ReLU: a Sequential, so that deployment folds the BatchNorm into the convolution.

    ``separable``: the paper's depthwise separable form, depthwise (dilated) + BN + ReLU + pointwise + BN + ReLU.
    """
    if separable:
        conv: nn.Module = SeparableConv2d(in_channels, out_channels, kernel_size, dilation=dilation,
                                          mid_activation="bn_relu", norm_layer=nn.BatchNorm2d)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                         dilation=dilation, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels), act=nn.ReLU(inplace=True)))


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pooling, 1x1 conv + BN + ReLU, broadcast back to the map's size.

    Its BatchNorm sees one value per channel and image, so training needs batches of two or more images."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            check_batch_of_several(x)
        pooled = self.conv(x.mean((2, 3), keepdim=True))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])  # bilinear upsampling of a 1x1 map is a broadcast


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, atrous 3x3 at each of ``rates``, image pooling; concatenated,
    projected by a 1x1 conv + BN + ReLU, dropout."""

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = PAPER_RATES, *,
                 separable: bool = True, drop_rate: float = 0.1) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branch1x1 = conv_bn_relu(in_channels, channels, 1)
        self.atrous = nn.ModuleList(conv_bn_relu(in_channels, channels, 3, dilation=rate, separable=separable)
                                    for rate in self.rates)
        self.image_pool = ImagePooling(in_channels, channels)
        self.project = conv_bn_relu(channels * (len(self.rates) + 2), channels, 1)
        self.dropout = nn.Dropout(drop_rate)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1x1(x)]
        for branch in self.atrous:
            branches.append(branch(x))
        branches.append(self.image_pool(x))
        return self.dropout(self.project(torch.cat(branches, dim=1)))


class Decoder(nn.Module):
    """DeepLabV3+'s decoder: low-level features projected to ``low_level_channels``, concatenated with the
    encoder output upsampled to their size, refined by two 3x3 convolutions."""

    def __init__(self, in_channels: int, low_level_in: int, *, low_level_channels: int = 48, channels: int = 256,
                 separable: bool = True) -> None:
        super().__init__()
        self.low_level = conv_bn_relu(low_level_in, low_level_channels, 1)
        self.refine = nn.Sequential(OrderedDict(
            conv1=conv_bn_relu(in_channels + low_level_channels, channels, 3, separable=separable),
            conv2=conv_bn_relu(channels, channels, 3, separable=separable),
        ))
        self.out_channels = channels

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low_level = self.low_level(low_level)
        x = F.interpolate(x, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(torch.cat([x, low_level], dim=1))


class DeepLab(nn.Module):
    """DeepLabV3+ (``decoder=True``) or DeepLabV3 on a backbone of the family; logits at the input's size.

    ``forward(x)`` takes an NCHW batch of any size from :attr:`min_input_size` up and returns
    ``(N, num_classes, H, W)`` logits for the same ``H, W`` (or for ``forward(x, output_size=(h, w))``'s).

    ``input_scale`` below 1 runs the whole network on the image resized by that factor (bilinear: at 0.5 the mean
    of each 2x2 block) and resizes its logits back, so the loss, the metrics and the masks stay at full
    resolution while the network costs about ``input_scale ** 2`` as much. Thin objects lose detail first.
    """

    task = "segmentation"
    classifier_prefix = "classifier."  # what a new class count replaces (see xception.weights.load_weights)

    def __init__(self, backbone: nn.Module, *, model_name: str, num_classes: int, decoder: bool = True,
                 aspp_channels: int = 256, atrous_rates: tuple[int, ...] | None = None, decoder_channels: int = 256,
                 low_level_channels: int = 48, separable: bool = True, drop_rate: float = 0.1,
                 input_scale: float = 1.0) -> None:
        super().__init__()
        check_head_options(model_name, num_classes, aspp_channels=aspp_channels, atrous_rates=atrous_rates,
                           decoder_channels=decoder_channels, low_level_channels=low_level_channels,
                           separable=separable, drop_rate=drop_rate, input_scale=input_scale)
        self.model_name = model_name
        self.num_classes = num_classes
        self.in_chans = backbone.in_chans
        self.output_stride = backbone.output_stride
        self.input_scale = float(input_scale)
        self.min_input_size = math.ceil(backbone.min_input_size / self.input_scale)
        self.pretrained_weights = None  # no registered segmentation weights; the backbone's are on the backbone
        if atrous_rates is not None:
            atrous_rates = tuple(atrous_rates)
        self.head_options = {"aspp_channels": aspp_channels, "atrous_rates": atrous_rates,
                             "decoder_channels": decoder_channels, "low_level_channels": low_level_channels,
                             "separable": separable, "drop_rate": drop_rate, "input_scale": self.input_scale}
        if not decoder:
            del self.head_options["decoder_channels"], self.head_options["low_level_channels"]

        self.backbone = backbone
        final = backbone.feature_info[-1]
        self.low_level_index = low_level_index(backbone, model_name) if decoder else -1
        rates = atrous_rates if atrous_rates is not None else atrous_rates_for(final["reduction"])
        self.aspp = ASPP(backbone.num_features, aspp_channels, rates, separable=separable, drop_rate=drop_rate)
        self.decoder: Decoder | None = None
        head_channels = aspp_channels
        if decoder:
            low_level = backbone.feature_info[self.low_level_index]
            self.decoder = Decoder(aspp_channels, low_level["num_chs"], low_level_channels=low_level_channels,
                                   channels=decoder_channels, separable=separable)
            head_channels = decoder_channels
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self._init_head()

    def _init_head(self) -> None:
        """He-normal convolutions as in the backbone, unit BN scale, PyTorch's default for the classifier."""
        for module in [self.aspp, *([self.decoder] if self.decoder is not None else [])]:
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(layer, nn.BatchNorm2d):
                    layer.reset_parameters()

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the network cannot take (wrong channel count, too small), naming what was expected."""
        self.backbone.check_input(x)
        check_scaled_size(x, self.min_input_size, self.input_scale)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class scores (B, num_classes, H, W) at the input's size, or at ``output_size`` (a training loss on
        labels sampled at a stride: resizing the logits straight to that grid costs less than to the input's)."""
        size = logits_size(x, output_size)
        if self.input_scale != 1.0:
            self.check_input(x)  # at the size given: the backbone checks the resized one
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        if self.decoder is None:
            features = self.aspp(self.backbone.forward_features(x))
        else:
            final, (low_level,) = self.backbone.forward_intermediates(x, [self.low_level_index])
            features = self.decoder(self.aspp(final), low_level)
        logits = self.classifier(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def architecture(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture with ``create_model(model.model_name, ...)``, saved with its
        weights: the head's options and the backbone's (its output stride, multi-grid, stochastic depth and knobs)."""
        backbone = {key: value for key, value in self.backbone.architecture().items()
                    if key not in ("num_classes", "global_pool", "drop_rate")}
        return {"num_classes": self.num_classes, **backbone, **self.head_options}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the 1x1 classifier (freshly initialised) for ``num_classes`` classes."""
        check_head_options(self.model_name, num_classes)
        reference = self.classifier.weight
        self.classifier = nn.Conv2d(self.classifier.in_channels, num_classes, 1, device=reference.device,
                                    dtype=reference.dtype)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        return self.classifier


def low_level_index(backbone: nn.Module, model_name: str) -> int:
    """The index into ``backbone.feature_info`` of the stride-4 map the decoder takes (before the last map).

    The paper's code taps DeepLab's Xception-65 inside its second entry block, before the strided convolution
    (256 channels at stride 4); the family's feature maps are block outputs, so the stride-4 map here is the
    output of the last block at stride 4 (128 channels in the paper's layout). The decoder projects either to 48.
    """
    strides = [info["reduction"] for info in backbone.feature_info]
    candidates = [i for i, stride in enumerate(strides[:-1]) if stride == LOW_LEVEL_REDUCTION]
    if not candidates:
        raise InvalidArgumentError(f"{model_name} needs a stride-4 feature map before the last one for its decoder, "
                                   f"but this backbone configuration has feature maps at strides {strides}; change "
                                   "the backbone options (e.g. stem_stride, entry_widths) or use the deeplabv3_ "
                                   "model, which has no decoder")
    return candidates[-1]


def check_head_options(model_name: str, num_classes: int, **options: Any) -> None:
    """Refuse a class count below 1 (a classification network's 0, pooled features, means nothing here) and head
    options (:class:`HeadOptions`) of another type or out of range."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgumentError(f"num_classes must be an integer >= 1 for a segmentation model, got {num_classes!r}")
    check_options(HeadOptions, options, owner=model_name)


def build(head: str, backbone_name: str, *, num_classes: int = 21, in_chans: int = 3, output_stride: int = 16,
          multi_grid: tuple[int, ...] | None = None, drop_path_rate: float = 0.0, drop_rate: float = 0.1,
          aspp_channels: int = 256, atrous_rates: tuple[int, ...] | None = None, decoder_channels: int | None = None,
          low_level_channels: int | None = None, separable: bool = True, input_scale: float = 1.0,
          backbone_weights: str | Path | None = None, **backbone_options: Any) -> DeepLab:
    """``deeplabv3plus_<backbone>`` or ``deeplabv3_<backbone>``: the backbone built by the registry with its own
    options, then the head. ``backbone_weights``: the backbone's registered weights (or ``"default"``) or a weight
    file of the classification model, loaded without its classifier."""
    from .registry import create_model

    if head not in HEADS:
        raise InvalidArgumentError(f"unknown segmentation head {head!r}; available: {', '.join(HEADS)}")
    name = f"{head}_{backbone_name}"
    # before the backbone is built: a wrong head option costs no time
    check_head_options(name, num_classes, aspp_channels=aspp_channels, atrous_rates=atrous_rates,
                       decoder_channels=decoder_channels, low_level_channels=low_level_channels, separable=separable,
                       drop_rate=drop_rate, input_scale=input_scale, backbone_weights=backbone_weights)
    if head == "deeplabv3" and (decoder_channels is not None or low_level_channels is not None):
        raise InvalidArgumentError(f"{name} has no decoder: decoder_channels and low_level_channels do not apply "
                                   f"(deeplabv3plus_{backbone_name} has one)")
    backbone = create_model(backbone_name, num_classes=0, global_pool="", in_chans=in_chans,
                            output_stride=output_stride, multi_grid=multi_grid, drop_path_rate=drop_path_rate,
                            **backbone_options)
    if backbone_weights is not None:
        from ..weights import load_weights

        load_weights(backbone, backbone_weights, new_head=True)
    decoder = {"decoder_channels": 256 if decoder_channels is None else decoder_channels,
               "low_level_channels": 48 if low_level_channels is None else low_level_channels}
    return DeepLab(backbone, model_name=name, num_classes=num_classes, decoder=head == "deeplabv3plus",
                   aspp_channels=aspp_channels, atrous_rates=atrous_rates, separable=separable, drop_rate=drop_rate,
                   input_scale=input_scale, **decoder)


def deeplabv3plus(*, backbone: str, **options: Any) -> DeepLab:
    """DeepLabV3+ on ``backbone`` (one of :data:`BACKBONES`); options as :func:`build`."""
    return build("deeplabv3plus", backbone, **options)


def deeplabv3(*, backbone: str, **options: Any) -> DeepLab:
    """DeepLabV3 (ASPP, no decoder) on ``backbone``; options as :func:`build`."""
    return build("deeplabv3", backbone, **options)


def check_scaled_size(x: torch.Tensor, min_size: int, input_scale: float) -> None:
    """Refuse an input smaller than ``min_size``, the least the backbone takes once scaled by ``input_scale``."""
    if min(x.shape[-2:]) < min_size:
        raise InvalidArgumentError(f"input {x.shape[2]}x{x.shape[3]} is too small: this model needs at least "
                                   f"{min_size}x{min_size} pixels (the network runs at {input_scale:g} of the "
                                   "input's size)")


def check_batch_of_several(x: torch.Tensor) -> None:
    """Refuse a training batch of one, which the image-pooling branch's BatchNorm cannot normalise."""
    if x.shape[0] == 1:
        raise InvalidArgumentError("training a DeepLab model needs batches of two or more images: the BatchNorm "
                                   "of its image-pooling branch sees a single value per channel in a batch of one")


def logits_size(x: torch.Tensor, output_size: tuple[int, int] | None) -> tuple[int, int]:
    """The size the logits are resized to: ``output_size``, else the input's."""
    return (x.shape[-2], x.shape[-1]) if output_size is None else output_size


# As backbone.check_images: calls in a torch.fx graph, run on each input (a traced forward's ``output_size`` is an
# input of the graph, so whether it is None is known only then).
torch.fx.wrap("logits_size")
torch.fx.wrap("check_scaled_size")
torch.fx.wrap("check_batch_of_several")
