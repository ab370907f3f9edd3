"""Grad-CAM (Selvaraju et al. 2017): where in an image the model found the evidence for a class.

Computed without hooks, from one forward pass: :class:`CamModel` returns a feature map chosen from
``model.feature_info`` together with the logits, both from ``forward_intermediates`` (the final features go through
``forward_head``), so the feature map is a tensor the logits were computed from and ``torch.autograd.grad`` of a
class logit with respect to it is the gradient Grad-CAM needs. Being a plain module, :class:`CamModel` also exports
(``torch.export``) and :func:`grad_cam` runs on the exported program's module as on the eager one.

The command line's ``explain`` calls :func:`explain_files` and only prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .data.datasets import resolve_class
from .data.transforms import ImageError
from .errors import InvalidArgumentError
from .files import atomic_path
from .inference import LoadedModel, class_entry, image_files, preprocess_file, unique_stem

OVERLAY_ALPHA = 0.5  # weight of the heatmap in the overlay; the image keeps the rest
COLORMAP = "jet"


class CamModel(nn.Module):
    """``model`` as ``x -> (feature map `stage`, logits)``, both from the same forward pass.

    ``stage`` indexes ``model.feature_info`` (negative from the end). Nothing is hooked or detached, so the module
    can be exported with ``torch.export`` and Grad-CAM computed through the exported program.
    """

    def __init__(self, model: nn.Module, stage: int = -1) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise InvalidArgumentError(f"{type(model).__name__} has no forward_intermediates: Grad-CAM needs a model "
                                       "of the Xception family (features_only models have no logits to explain)")
        if not getattr(model, "num_classes", 0):
            raise InvalidArgumentError("the model has no classifier (num_classes=0): there is no class to explain")
        self.model = model
        self.stage = resolve_stage(model, stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, (feature_map,) = self.model.forward_intermediates(x, [self.stage])
        return feature_map, self.model.forward_head(final)


def resolve_stage(model: nn.Module, stage: int) -> int:
    """``stage`` as a non-negative index into ``model.feature_info``; InvalidArgumentError naming the valid range."""
    count = len(model.feature_info)
    if isinstance(stage, bool) or not isinstance(stage, int) or not -count <= stage < count:
        strides = ", ".join(f"{i}: stride {info['reduction']}" for i, info in enumerate(model.feature_info))
        raise InvalidArgumentError(f"stage {stage!r} is out of range: this model has {count} feature maps "
                                   f"({strides}; negative counts from the end)")
    return stage % count


def target_indices(target: int | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """One class index per image: the predicted class, the same class for all, or one given per image."""
    count, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    indices = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if indices.numel() == 1:
        indices = indices.expand(count)
    if indices.numel() != count:
        raise InvalidArgumentError(f"target has {indices.numel()} classes for {count} images: give one, or one per "
                                   "image")
    if bool(((indices < 0) | (indices >= classes)).any()):
        raise InvalidArgumentError(f"target class {indices.tolist()} out of range: the model has {classes} classes "
                                   f"(0..{classes - 1})")
    return indices


def grad_cam(model: nn.Module | Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], images: torch.Tensor,
             target: int | torch.Tensor | None = None, stage: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM heatmaps of ``images`` (NCHW) for ``target`` and the logits of the same forward pass.

    ``model``: a model of the family (in eval mode for the call; its feature map ``stage`` is explained), or a
    callable returning ``(feature map, logits)`` such as a :class:`CamModel` or its exported module (``stage`` is then
    the one it was built with). ``target``: None explains each image's predicted class, an int one class for all, a
    tensor one class per image. Returns heatmaps N x H x W scaled to [0, 1] per image (all 0 where no location
    speaks for the class) and the logits N x classes.
    """
    cam_model = CamModel(model, stage) if hasattr(model, "forward_intermediates") else model
    network = cam_model.model if isinstance(cam_model, CamModel) else None
    training = network is not None and network.training
    if training:
        network.eval()  # train-mode BatchNorm would mix the images of the batch and update its running statistics
    try:
        with torch.enable_grad():
            # The input asks for a gradient so that the feature map is in the graph even with frozen weights.
            x = images.detach().requires_grad_(True)
            outputs = cam_model(x)
            if not (isinstance(outputs, tuple) and len(outputs) == 2):
                raise InvalidArgumentError(f"{type(model).__name__} returned {type(outputs).__name__}, not "
                                           "(feature map, logits): give a model of the family or a CamModel (or "
                                           "its export)")
            feature_map, logits = outputs
            classes = target_indices(target, logits)
            # The images of an eval-mode batch are independent: the sum's gradient is each image's own.
            score = logits.gather(1, classes[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, feature_map)
    finally:
        if training:
            network.train()
    feature_map, gradient = feature_map.detach().float(), gradient.float()
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # alpha_k: the pooled gradient of each channel
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    # Min-max per image, as Grad-CAM is usually shown: a floor the class gets everywhere says nothing about where.
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    span = high - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), 0.0), logits.detach()


def overlay(pixels: torch.Tensor, heatmap: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image (C x H x W in [0, 1], one or three channels) blended with ``heatmap`` (H x W in [0, 1]) in jet."""
    from matplotlib import colormaps

    image = pixels.detach().float().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
    colors = colormaps[COLORMAP](heatmap.detach().cpu().numpy())[..., :3]
    blended = (1 - alpha) * image + alpha * colors
    return Image.fromarray(np.rint(blended * 255).astype(np.uint8), mode="RGB")


def model_pixels(loaded: LoadedModel, tensor: torch.Tensor) -> torch.Tensor:
    """A preprocessed input back in [0, 1]: the image as the model saw it, resized and cropped."""
    mean = torch.tensor(loaded.preprocessing.get("mean", [0.5] * loaded.in_chans))[:, None, None]
    std = torch.tensor(loaded.preprocessing.get("std", [0.5] * loaded.in_chans))[:, None, None]
    return (tensor.float() * std + mean).clamp(0, 1)


def explain_files(loaded: LoadedModel, files: Iterable[str | Path], output_dir: str | Path,
                  target: int | str | None = None, stage: int = -1) -> list[dict[str, Any]]:
    """Grad-CAM overlays of image files (folders: the images inside) written to ``output_dir`` as PNG.

    ``target``: a class name or index of ``loaded`` for every image, or None for each image's predicted class.
    One result per file: ``{"file", "predicted", "explained", "output"}`` (each class as ``{"class", "index",
    "probability"}``), or ``{"file", "error"}`` for a file that cannot be read; the others are still explained.
    An unknown class or a stage out of range raises InvalidArgumentError before any image is read.
    """
    stage = resolve_stage(loaded.model, stage)
    target_index = None if target is None else resolve_class(target, loaded.classes)
    cam_model = CamModel(loaded.model, stage)
    output_dir = Path(output_dir)
    taken: set[str] = set()
    results: list[dict[str, Any]] = []
    for path in image_files(files):
        try:
            tensor = preprocess_file(loaded, path)
        except (ImageError, OSError) as error:
            problem = InvalidArgumentError(f"{path}: cannot read this image ({error})")
            results.append({"file": str(path), "error": str(problem)})
            continue
        heatmaps, logits = grad_cam(cam_model, tensor.unsqueeze(0), target_index)
        probabilities = logits[0].float().softmax(dim=0)
        explained = int(probabilities.argmax()) if target_index is None else target_index
        destination = output_dir / f"{unique_stem(path, taken)}.gradcam.png"
        with atomic_path(destination, suffix=".png") as temporary:
            overlay(model_pixels(loaded, tensor), heatmaps[0]).save(temporary, format="PNG")
        results.append({"file": str(path), "predicted": class_entry(loaded, probabilities, int(probabilities.argmax())),
                        "explained": class_entry(loaded, probabilities, explained), "output": str(destination)})
    return results
