"""Using a trained model: load it from a run folder or a weight file, evaluate it on a data set, predict images."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import read_architecture
from .data import (
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    ImageDataset,
    SampleKey,
    Transform,
    eval_transform,
    load_fashion_mnist,
)
from .registry import create_model
from .transforms import ImageError, open_image
from .weights import get_weights, imagenet_categories

log = logging.getLogger("xception.predict")


@dataclass
class LoadedModel:
    """A model ready for inference with what it needs to read images and name its outputs.

    ``preprocess`` is the one evaluation transform of this model, used by every entry point (``predict``, ``eval``,
    int8 calibration, ``export``'s metadata): registered weights bring their own (``Weights.transforms()``), a
    training run its recipe's (:func:`~xception.data.eval_transform`). ``preprocessing`` describes it in plain values.
    """

    model: nn.Module
    classes: list[str]
    in_chans: int
    img_size: int
    preprocess: Transform
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)
    registered: bool = False  # registered weights: class names are theirs, not a data folder's

    def transform(self) -> Transform:
        """The evaluation transform (kept as a method: older callers built it here)."""
        return self.preprocess

    @property
    def mode(self) -> str:
        """The PIL mode files are decoded to."""
        return "L" if self.in_chans == 1 else "RGB"


def preprocess_file(loaded: LoadedModel, path: str | Path) -> torch.Tensor:
    """One image file as ``loaded``'s input: the decoder every entry point shares, then the model's transform.

    Raises ImageError or OSError for a file that cannot be read."""
    return loaded.preprocess(open_image(path, loaded.mode))


def load_trained(checkpoint: str | Path) -> LoadedModel:
    """A run folder (its ``best`` weights, else ``last``, with the classes and image size of its config) or a
    weights file saved by this library. Its preprocessing is its recipe's evaluation transform."""
    path = Path(checkpoint)
    if path.is_dir():
        weights = next((path / f"{n}.safetensors" for n in ("best", "last") if (path / f"{n}.safetensors").exists()),
                       None)
        if weights is None:
            raise FileNotFoundError(f"{path} holds no best.safetensors or last.safetensors: is it a training run?")
        config_path = path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    elif path.is_file():
        weights, config = path, {}
    else:
        raise FileNotFoundError(f"no run folder or weight file at {path}")
    model_name, architecture = read_architecture(weights)
    model = create_model(model_name, weights=weights, **architecture).eval().to(memory_format=torch.channels_last)
    recipe = config.get("recipe", {})
    classes = config.get("classes") or [str(i) for i in range(model.num_classes)]
    img_size = recipe.get("img_size") or 299
    ratio = recipe.get("eval_resize_ratio", 1.0)
    resize: int | list[int] = [img_size, img_size] if ratio == 1.0 else round(img_size * ratio)
    description = {"resize_size": resize, "crop_size": img_size, "interpolation": "bilinear",
                   "mean": [0.5] * model.in_chans, "std": [0.5] * model.in_chans}
    return LoadedModel(model, classes, model.in_chans, img_size, eval_transform(img_size, model.in_chans, ratio),
                       description)


def load_registered(model_name: str, weights_name: str) -> LoadedModel:
    """Registered pretrained weights (e.g. ``xception``, ``imagenet``) with their own preprocessing,
    ``Weights.transforms()``: the same tensors as the Python API gives."""
    registered = get_weights(model_name, weights_name)
    transform = registered.transforms()
    model = create_model(model_name, weights=weights_name).eval().to(memory_format=torch.channels_last)
    classes = list(imagenet_categories()) if registered.categories else [str(i) for i in range(model.num_classes)]
    description = {key: list(value) if isinstance(value, tuple) else value
                   for key, value in registered.transform_config.items()}
    return LoadedModel(model, classes, len(transform.mean), transform.crop_size, transform, description,
                       registered=True)


def dataset_for(loaded: LoadedModel, data: str, split: str) -> ImageDataset:
    """``split`` of ``data`` (``fashion-mnist``, or an ImageNet-layout folder, classes in sorted folder order)
    preprocessed with ``loaded``'s transform: what ``xception eval`` evaluates and int8 calibrates on."""
    if data == "fashion-mnist":
        images, labels = load_fashion_mnist("test" if split in ("val", "test") else "train")
        return ImageDataset.in_memory(images, labels, loaded.preprocess, list(FASHION_MNIST_CLASSES))
    return ImageDataset.from_folder(Path(data), split, loaded.preprocess)


def deploy_loaded(loaded: LoadedModel, precision: str, calibration: torch.Tensor | None = None,
                  batch_size: int = 1) -> LoadedModel:
    """The same model made fast by :func:`xception.optimize_for_inference`: BatchNorm folded, memory layout timed
    at ``batch_size``, bf16 or int8. int8 needs ``calibration`` (preprocessed images, NCHW) and compiles for
    ``batch_size``; fp32 and bf16 are not compiled, which would not pay off for a few batches."""
    from .deploy import optimize_for_inference

    example = torch.zeros(batch_size, loaded.in_chans, loaded.img_size, loaded.img_size)
    if calibration is not None:
        example = calibration[:batch_size]
    model = optimize_for_inference(loaded.model, precision, calibration, example_input=example)
    return dataclasses.replace(loaded, model=model)


def calibration_images(loaded: LoadedModel, data: str, count: int = 512) -> torch.Tensor:
    """The first ``count`` readable *training* images of ``data`` (``fashion-mnist`` or an ImageNet-layout folder),
    preprocessed as for evaluation: int8 calibration never sees the images it is evaluated on."""
    train_set = dataset_for(loaded, data, "train")
    samples = (train_set[SampleKey(0, i)] for i in range(min(len(train_set), 2 * count)))
    return torch.stack([sample[0] for sample in samples if sample is not None][:count])


def load_images(loaded: LoadedModel, files: Iterable[str | Path], limit: int) -> torch.Tensor:
    """Up to ``limit`` readable images among ``files``, preprocessed for ``loaded`` (unreadable ones skipped)."""
    tensors = []
    for path in image_files(files):
        try:
            tensors.append(preprocess_file(loaded, path))
        except (ImageError, OSError):
            continue
        if len(tensors) == limit:
            break
    if not tensors:
        raise ValueError("no readable images to calibrate int8 with")
    return torch.stack(tensors)


def image_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and the images inside folders (recursively, sorted)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield path


@torch.no_grad()
def predict(loaded: LoadedModel, inputs: Iterable[str | Path], top_k: int = 5,
            batch_size: int = 16) -> list[dict[str, Any]]:
    """One result per file: ``{"file", "predictions": [{"class", "index", "probability"}...]}`` or
    ``{"file", "error"}`` for a file that cannot be read; the others are still predicted."""
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, torch.Tensor]] = []
    k = min(top_k, len(loaded.classes))

    def flush() -> None:
        if not pending:
            return
        # channels_last: the layout the model was converted to (depthwise convolutions are faster in it).
        batch = torch.stack([tensor for _, tensor in pending]).contiguous(memory_format=torch.channels_last)
        probabilities = loaded.model(batch).float().softmax(dim=1)
        values, indices = probabilities.topk(k, dim=1)
        for (slot, _), row_values, row_indices in zip(pending, values, indices, strict=True):
            results[slot]["predictions"] = [
                {"class": loaded.classes[i], "index": int(i), "probability": float(v)}
                for v, i in zip(row_values.tolist(), row_indices.tolist(), strict=True)]
        pending.clear()

    for path in image_files(inputs):
        try:
            tensor = preprocess_file(loaded, path)
        except (ImageError, OSError) as error:
            results.append({"file": str(path), "error": str(error)})
            continue
        results.append({"file": str(path)})
        pending.append((len(results) - 1, tensor))
        if len(pending) == batch_size:
            flush()
    flush()
    return results
