"""Evaluation preprocessing: resize, centre crop, scale to the range the weights were trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class ClassificationTransform:
    """PIL image or uint8/float CHW tensor -> normalised float CHW tensor.

    With mean = std = 0.5 this is Keras's 'tf' preprocessing, ``x / 127.5 - 1`` on 0..255 RGB.
    """

    resize_size: int = 333
    crop_size: int = 299
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB") if len(self.mean) == 3 else image.convert("L"))
        image = TF.resize(image, [self.resize_size], interpolation=InterpolationMode(self.interpolation),
                          antialias=True)
        image = TF.center_crop(image, [self.crop_size])
        image = TF.to_dtype(image, torch.float32, scale=True)
        return TF.normalize(image, list(self.mean), list(self.std))
