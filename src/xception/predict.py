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
from .data import IMAGE_EXTENSIONS, ImageError, eval_transform, open_image
from .registry import create_model
from .weights import get_weights, imagenet_categories

log = logging.getLogger("xception.predict")


@dataclass
class LoadedModel:
    """A model ready for inference with what it needs to read images and name its outputs."""

    model: nn.Module
    classes: list[str]
    in_chans: int
    img_size: int
    resize_ratio: float = 1.0

    def transform(self) -> Any:
        return eval_transform(self.img_size, self.in_chans, self.resize_ratio)


def load_trained(checkpoint: str | Path) -> LoadedModel:
    """A run folder (its ``best`` weights, else ``last``, with the classes and image size of its config) or a
    weights file saved by this library."""
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
    return LoadedModel(model, classes, model.in_chans, img_size, recipe.get("eval_resize_ratio", 1.0))


def load_registered(model_name: str, weights_name: str) -> LoadedModel:
    """Registered pretrained weights (e.g. ``xception``, ``imagenet``) with their own preprocessing."""
    registered = get_weights(model_name, weights_name)
    model = create_model(model_name, weights=weights_name).eval().to(memory_format=torch.channels_last)
    config = registered.transform_config
    classes = list(imagenet_categories()) if registered.categories else [str(i) for i in range(model.num_classes)]
    return LoadedModel(model, classes, 3, config["crop_size"], config["resize_size"] / config["crop_size"])


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
    from .data import ImageDataset, SampleKey, load_fashion_mnist

    transform = loaded.transform()
    if data == "fashion-mnist":
        images, _ = load_fashion_mnist("train")
        return torch.stack([transform(image[None]) for image in images[:count]])
    train_set = ImageDataset.from_folder(Path(data), "train", transform, classes=loaded.classes)
    samples = (train_set[SampleKey(0, i)] for i in range(min(len(train_set), 2 * count)))
    return torch.stack([sample[0] for sample in samples if sample is not None][:count])


def load_images(loaded: LoadedModel, files: Iterable[str | Path], limit: int) -> torch.Tensor:
    """Up to ``limit`` readable images among ``files``, preprocessed for ``loaded`` (unreadable ones skipped)."""
    transform = loaded.transform()
    mode = "L" if loaded.in_chans == 1 else "RGB"
    tensors = []
    for path in image_files(files):
        try:
            tensors.append(transform(open_image(path, mode)))
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
    transform = loaded.transform()
    mode = "L" if loaded.in_chans == 1 else "RGB"
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
            tensor = transform(open_image(path, mode))
        except (ImageError, OSError) as error:
            results.append({"file": str(path), "error": str(error)})
            continue
        results.append({"file": str(path)})
        pending.append((len(results) - 1, tensor))
        if len(pending) == batch_size:
            flush()
    flush()
    return results
