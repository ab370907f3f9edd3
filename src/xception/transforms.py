"""From an image to a model input: the one image decoder, and the evaluation preprocessing of registered weights.

Every entry point (``Weights.transforms()``, ``xception predict`` and ``eval``, int8 calibration, the training data)
decodes through :func:`decode_image`, so a file gives the same pixels whichever way it comes in.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION = 0x0112  # the EXIF tag


class ImageError(ValueError):
    """A file that cannot be used as an image: not an image, corrupt, truncated, or too large to decode safely."""


def decode_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Any PIL image as an upright ``mode`` ("RGB" or "L") image, the way a viewer would show it.

    Rotated as its EXIF orientation says (idempotent: the tag is dropped once applied, so an image that went through
    here once comes back unchanged). Transparent pixels are composited on white (not Pillow's black), and 16-bit data
    is scaled to 8 bits (Pillow's own convert clips it, which turns most 16-bit photographs white). CMYK, palette and
    grayscale images become ``mode`` through Pillow's conversions.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
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
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
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
            raise ValueError(f"mean and std need 1 or 3 values each, got {self.mean} and {self.std}")
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
