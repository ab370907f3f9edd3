"""From an image to a model input: the one image decoder, and the evaluation preprocessing of registered weights.

Every entry point (``Weights.transforms()``, ``xception predict`` and ``eval``, int8 calibration, the training data)
decodes through :func:`decode_image`, so a file gives the same pixels whichever way it comes in.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.v2 import functional as TF

from ..errors import InvalidArgumentError, XceptionError

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION = 0x0112  # the EXIF tag


class ImageError(XceptionError, ValueError):
    """A file that cannot be used as an image: not an image, corrupt, truncated, or too large to decode safely."""


def decode_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Any PIL image as an upright ``mode`` ("RGB" or "L") image, the way a viewer would show it.

    Rotated as its EXIF orientation says (idempotent: the tag is dropped once applied, so an image that went through
    here once comes back unchanged). Transparent pixels are composited on white (not Pillow's black), and 16-bit data
    is scaled to 8 bits (Pillow's own convert clips it, which turns most 16-bit photographs white). CMYK, palette and
    grayscale images become ``mode`` through Pillow's conversions.
    """
    if mode not in ("RGB", "L"):
        raise InvalidArgumentError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if image.getexif().get(_ORIENTATION, 1) != 1:  # checked first: exif_transpose copies even upright images
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8))
    has_alpha = image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == mode else image.convert(mode)


def open_image(path: str | os.PathLike[str], mode: str = "RGB") -> Image.Image:
    """Decode an image file with :func:`decode_image` into a loaded ``mode`` ("RGB" or "L") image.

    Anything wrong with the file's content raises ImageError naming the file; images larger than
    ``Image.MAX_IMAGE_PIXELS`` are refused (Pillow only warns below twice that limit) since a hostile or mistaken file
    could exhaust memory. A missing or unreadable path raises the usual OSError.
    """
    if mode not in ("RGB", "L"):
        raise InvalidArgumentError(f"mode must be 'RGB' or 'L', got {mode!r}")
    path = Path(path)
    with open(path, "rb") as file, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(file) as image:
                image.load()
                return decode_image(image, mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError(f"{path}: refusing to decode a possible decompression bomb ({err})") from err
        except UnidentifiedImageError as err:
            raise ImageError(f"{path}: not an image file (no image format recognises it)") from err
        except Exception as err:  # decoders raise many types for damaged files; all mean "unusable file"
            raise ImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


@dataclass(frozen=True)
class ClassificationTransform:
    """Image file, PIL image or uint8/float CHW tensor -> normalised float CHW tensor, for evaluation.

    Resize the shorter side to ``resize_size``, centre-crop ``crop_size``, scale to 0..1, normalise. With
    mean = std = 0.5 this is Keras's 'tf' preprocessing, ``x / 127.5 - 1`` on 0..255 RGB.

    Built on torchvision's ``ImageClassification`` preset (what torchvision's own weights return from
    ``transforms()``) rather than written out here: given a PIL image it resizes with PIL, which is what timm's
    evaluation transform does, and so reproduces timm's preprocessing bit for bit (tested), the preprocessing the
    published accuracies of these weights were measured with. A resize of the tensor instead differs from PIL's by up
    to 2/255 in about half the pixels. Files and PIL images are decoded by :func:`decode_image` first (EXIF rotation,
    alpha on white, 16-bit to 8-bit, any mode to RGB), as ``xception predict`` and ``eval`` decode them.
    """

    resize_size: int = 333
    crop_size: int = 299
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    _preset: ImageClassification = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise InvalidArgumentError(f"mean and std need 1 or 3 values each, got {self.mean} and {self.std}")
        preset = ImageClassification(crop_size=self.crop_size, resize_size=self.resize_size, mean=self.mean,
                                     std=self.std, interpolation=InterpolationMode(self.interpolation), antialias=True)
        object.__setattr__(self, "_preset", preset)  # frozen: set once here

    @property
    def mode(self) -> str:
        """The PIL mode images are decoded to: "RGB", or "L" for one-channel weights."""
        return "RGB" if len(self.mean) == 3 else "L"

    def __call__(self, image: str | os.PathLike[str] | Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, str | os.PathLike):
            image = open_image(image, self.mode)
        elif isinstance(image, Image.Image):
            image = decode_image(image, self.mode)
        return self._preset(image)


_TRAIN_STYLES = ("inception", "compact", "none", "basic", "randaugment", "trivialaugment")

ImageInput = Image.Image | torch.Tensor
Transform = Callable[[ImageInput], torch.Tensor]


# --------------------------------------------------------------------------------------------------- transforms
# The steps below that run on every sample of small data are plain functional calls on uint8 tensors: a 28x28 image
# costs a few microseconds per step that way, against tens for the generic v2 transform classes.

@dataclass(frozen=True)
class _ToImageTensor:
    """PIL image or uint8 (H, W) / (C, H, W) tensor -> uint8 (in_chans, H, W) tensor; tensors skip PIL entirely."""

    in_chans: int

    def __call__(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return TF.pil_to_tensor(decode_image(image, "L" if self.in_chans == 1 else "RGB"))
        if image.dtype != torch.uint8 or image.ndim not in (2, 3):
            raise InvalidArgumentError(f"expected a uint8 tensor (H, W) or (C, H, W), got {image.dtype} "
                                       f"{tuple(image.shape)}")
        if image.ndim == 2:
            image = image.unsqueeze(0)
        channels = image.shape[0]
        if channels == self.in_chans:
            return image
        if channels == 1 and self.in_chans == 3:
            return image.expand(3, -1, -1)
        if channels == 3 and self.in_chans == 1:
            return TF.rgb_to_grayscale(image)
        raise InvalidArgumentError(f"cannot turn a {channels}-channel image into {self.in_chans} channels")


@dataclass(frozen=True)
class _ResizeCrop:
    """Resize (an int: the shorter side; a pair: exact height and width), then centre-crop to ``crop`` if given.

    Both steps return their input untouched when it already has the size asked for.
    """

    resize: int | tuple[int, int]
    crop: int | None = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if isinstance(self.resize, int):
            resized = min(height, width) == self.resize
            size = [self.resize]
        else:
            resized = (height, width) == tuple(self.resize)
            size = list(self.resize)
        if not resized:  # already the size asked for: the common case of small images, kept cheap
            image = TF.resize(image, size, antialias=True)
        if self.crop is None or image.shape[-2:] == (self.crop, self.crop):
            return image
        return TF.center_crop(image, [self.crop])


@dataclass(frozen=True)
class _PadCropFlip:
    """Zero-pad by ``padding``, crop back to the original size at a random offset, flip left-right half the time."""

    padding: int = 4

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = torch.nn.functional.pad(image, [self.padding] * 4)[..., top: top + height, left: left + width]
        return image.flip(-1) if torch.rand(()) < 0.5 else image


@dataclass(frozen=True)
class _Normalize:
    """uint8 0..255 -> float32 -1..1, exactly (mean = std = 0.5 after scaling to 0..1)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).div_(127.5).sub_(1.0)


def _check_channels(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise InvalidArgumentError(f"in_chans must be 1 or 3, got {in_chans}")


def train_transform(img_size: int, in_chans: int, style: str, *, erasing: float = 0.0) -> Transform:
    """Training augmentation: PIL image or uint8 tensor -> float (in_chans, img_size, img_size) in [-1, 1].

    "none": resize only. "basic": random resized crop (scale 0.35-1) and flip; "randaugment" and "trivialaugment"
    add torchvision's policies (Cubuk et al. 2020; Müller and Hutter 2021) after them.

    "inception": RandomResizedCrop (scale 0.08-1), horizontal flip and, for RGB, mild colour jitter; the recipe
    for photographs at ImageNet scale. "compact": for small images such as Fashion-MNIST or CIFAR, where a random
    resized crop destroys too much: resize to img_size if needed, pad by 4 and crop back at random, flip.
    ``erasing`` is the probability of random erasing (after normalisation, erased to 0); off by default.
    """
    _check_channels(in_chans)
    if style == "inception":
        steps: list[Callable] = [_ToImageTensor(in_chans),
                                 v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), antialias=True),
                                 v2.RandomHorizontalFlip()]
        if in_chans == 3:
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    elif style == "compact":
        steps = [_ToImageTensor(in_chans), _ResizeCrop(img_size, img_size), _PadCropFlip(padding=4)]
    elif style == "none":
        steps = [_ToImageTensor(in_chans), _ResizeCrop((img_size, img_size))]
    elif style in ("basic", "randaugment", "trivialaugment"):
        # Fine-tuning on few images: a milder crop than Inception's (a third of the image at least) and a flip;
        # then torchvision's automatic augmentation policies, which work on uint8 images of 1 or 3 channels.
        steps = [_ToImageTensor(in_chans), v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), antialias=True),
                 v2.RandomHorizontalFlip()]
        if style == "randaugment":
            steps.append(v2.RandAugment())
        elif style == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
    else:
        raise InvalidArgumentError(f"style must be one of {', '.join(_TRAIN_STYLES)}, got {style!r}")
    steps.append(_Normalize())
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, value=0))
    return v2.Compose(steps)


def eval_transform(img_size: int, in_chans: int, resize_ratio: float = 1.0) -> Transform:
    """Deterministic evaluation preprocessing: PIL image or uint8 tensor -> float (in_chans, img_size, img_size).

    The evaluation transform of models trained here, from their recipe; registered pretrained weights have their own,
    ``Weights.transforms()``. PIL images go through the same decoder (:func:`~xception.transforms.decode_image`).

    Resizes the shorter side to round(img_size * resize_ratio) and centre-crops img_size. The default ratio 1.0 is a
    plain resize to img_size x img_size (a non-square image is squeezed, not cropped; a 28x28 image at img_size 28 is
    left untouched). Output in [-1, 1].
    """
    _check_channels(in_chans)
    if resize_ratio < 1.0:
        raise InvalidArgumentError(f"resize_ratio must be >= 1.0 (the crop has to fit), got {resize_ratio}")
    if resize_ratio == 1.0:
        resize = _ResizeCrop((img_size, img_size))
    else:
        resize = _ResizeCrop(round(img_size * resize_ratio), img_size)
    return v2.Compose([_ToImageTensor(in_chans), resize, _Normalize()])


def eval_transform_description(img_size: int, in_chans: int, resize_ratio: float = 1.0) -> dict[str, Any]:
    """:func:`eval_transform`'s settings as a preprocessing record (what a run's model card, ONNX metadata and
    deploy.json record); :func:`transform_from_preprocessing` turns it back into the same transform."""
    resize: int | list[int] = [img_size, img_size] if resize_ratio == 1.0 else round(img_size * resize_ratio)
    return {"resize_size": resize, "crop_size": img_size, "interpolation": "bilinear", "mean": [0.5] * in_chans,
            "std": [0.5] * in_chans, "eval_resize_ratio": resize_ratio}


def transform_from_preprocessing(settings: dict[str, Any]) -> Transform:
    """The evaluation transform a preprocessing record describes (a save_pretrained config's, a deploy.json's).

    Registered weights' preprocessing (resize the shorter side, centre-crop, normalise) is a
    :class:`ClassificationTransform`; a training run's is its recipe's :func:`eval_transform`, marked by
    ``eval_resize_ratio``."""
    if "eval_resize_ratio" in settings:
        return eval_transform(settings["crop_size"], len(settings["mean"]), settings["eval_resize_ratio"])
    keys = ("resize_size", "crop_size", "interpolation", "mean", "std")
    return ClassificationTransform(**{key: tuple(settings[key]) if isinstance(settings[key], list)
                                      else settings[key] for key in keys if key in settings})
