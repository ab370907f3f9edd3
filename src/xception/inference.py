"""Using a trained model: load it from a run folder, a weight file or registered weights, evaluate it on a data set
(metrics and a confusion matrix), predict images. The command line's ``eval``, ``predict`` and ``export`` call these
and only print."""

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

from .data import (
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    ImageDataset,
    Transform,
    load_fashion_mnist,
    readable_samples,
)
from .data.transforms import ImageError, eval_transform_description, open_image, transform_from_preprocessing
from .deploy import Deployment
from .errors import InvalidArgumentError
from .files import atomic_path, save_figure
from .models import create_model
from .precision import AUTO, DEPLOY_PRECISIONS, choose_precision
from .training.checkpoint import read_architecture
from .training.finetune import run_weights
from .training.metrics import evaluate
from .weights import get_weights, imagenet_categories, parse_hub_spec
from .weights.pretrained import is_pretrained_folder, pretrained_folder, read_pretrained

CALIBRATION_IMAGES = 512  # int8 calibration: enough to settle the activation ranges

log = logging.getLogger("xception.inference")


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


def run_files(path: Path) -> tuple[Path, dict[str, Any]]:
    """The weights a checkpoint stands for and its run's config.json: a run folder's best weights (else its last)
    and config ({} where it has none), or a weight file with no config."""
    if path.is_dir():
        config_path = path / "config.json"
        return run_weights(path), json.loads(config_path.read_text()) if config_path.is_file() else {}
    if path.is_file():
        return path, {}
    raise FileNotFoundError(f"no run folder or weight file at {path}")


def load_trained(checkpoint: str | Path) -> LoadedModel:
    """A run folder (its ``best`` weights, else ``last``, with the classes and image size of its config) or a
    weights file saved by this library. Its preprocessing is its recipe's evaluation transform."""
    path = Path(checkpoint)
    if is_pretrained_folder(path):
        return load_pretrained(path)
    weights, config = run_files(path)
    model_name, architecture = read_architecture(weights)
    model = create_model(model_name, weights=weights, **architecture).eval().to(memory_format=torch.channels_last)
    recipe = config.get("recipe", {})
    classes = config.get("classes") or [str(i) for i in range(model.num_classes)]
    img_size = recipe.get("img_size") or 299
    description = eval_transform_description(img_size, model.in_chans, recipe.get("eval_resize_ratio", 1.0))
    return LoadedModel(model, classes, model.in_chans, img_size, transform_from_preprocessing(description),
                       description)


def load_pretrained(source: str | Path) -> LoadedModel:
    """A folder written by :func:`xception.save_pretrained` or a Hub repository (``hf-hub:org/name[@revision]``),
    with the classes and the preprocessing it records."""
    config, weights = read_pretrained(pretrained_folder(source))
    model = create_model(config.model, weights=weights, **config.architecture).eval().to(
        memory_format=torch.channels_last)
    model.pretrained_config = config
    transform = config.transforms()
    if transform is None:
        raise InvalidArgumentError(f"{source} records no classification preprocessing, so its images cannot be "
                                   "prepared; save it again with save_pretrained(..., preprocessing={...})")
    classes = list(config.classes) or [str(i) for i in range(model.num_classes)]
    # ImageNet's class names are words, a data folder's are WordNet ids: as for registered weights, only the order
    # can be compared.
    return LoadedModel(model, classes, model.in_chans, config.preprocessing["crop_size"], transform,
                       dict(config.preprocessing), registered="imagenet-1k" in config.datasets)


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
    ``batch_size``; fp32 and bf16 are not compiled, which would not pay off for a few batches. ``auto`` where the
    machine's fastest precision is fp32 returns ``loaded`` as it is: the model as trained, without the layout
    timing (a dozen forward passes) that a few images would not repay."""
    from .deploy import optimize_for_inference

    if precision == AUTO and choose_precision(AUTO, "cpu", DEPLOY_PRECISIONS).name == "fp32":
        return loaded

    example = torch.zeros(batch_size, loaded.in_chans, loaded.img_size, loaded.img_size)
    if calibration is not None:
        example = calibration[:batch_size]
    model = optimize_for_inference(loaded.model, precision, calibration, example_input=example)
    return dataclasses.replace(loaded, model=model)


def calibration_images(loaded: LoadedModel, data: str, count: int = 512) -> torch.Tensor:
    """The first ``count`` readable *training* images of ``data`` (``fashion-mnist`` or an ImageNet-layout folder),
    preprocessed as for evaluation: int8 calibration never sees the images it is evaluated on."""
    train_set = dataset_for(loaded, data, "train")
    samples = readable_samples(train_set, range(min(len(train_set), 2 * count)))
    return torch.stack([image for image, _ in samples[:count]])


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
        raise InvalidArgumentError("no readable images to calibrate int8 with")
    return torch.stack(tensors)


def image_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and the images inside folders (recursively, sorted)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield path


def unique_stem(path: Path, used: set[str]) -> str:
    """The file's stem for the outputs made from it, numbered where two inputs share one (photos/a.jpg and
    more/a.png): explain's overlays and segment predict's masks."""
    stem, number = path.stem, 1
    while stem in used:
        number += 1
        stem = f"{path.stem}-{number}"
    used.add(stem)
    return stem


def class_entry(loaded: LoadedModel, probabilities: torch.Tensor, index: int) -> dict[str, Any]:
    """One class of a result: ``{"class", "index", "probability"}``, as predict and explain report them."""
    return {"class": loaded.classes[index], "index": index, "probability": float(probabilities[index])}


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
        indices = probabilities.topk(k, dim=1).indices
        for (slot, _), row, row_indices in zip(pending, probabilities, indices, strict=True):
            results[slot]["predictions"] = [class_entry(loaded, row, i) for i in row_indices.tolist()]
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


def load_model(checkpoint: str | Path | None = None, model: str = "xception",
               weights: str | None = None) -> LoadedModel:
    """A training run, a save_pretrained folder or a weight file (``checkpoint``), or registered ``weights`` of
    ``model``, or a Hub repository (``hf-hub:org/name[@revision]``, either way): exactly one."""
    if (checkpoint is None) == (weights is None):
        raise InvalidArgumentError("give either --checkpoint RUN_DIR|WEIGHTS or --weights NAME "
                                   "(e.g. --weights imagenet, or --weights hf-hub:org/name)")
    given = checkpoint if checkpoint is not None else weights
    if parse_hub_spec(given) is not None:
        return load_pretrained(given)
    return load_trained(checkpoint) if checkpoint is not None else load_registered(model, weights)


def checked_dataset(loaded: LoadedModel, data: str, split: str) -> ImageDataset:
    """:func:`dataset_for`, checked to have ``loaded``'s classes (the subset of them a run trained on)."""
    dataset = dataset_for(loaded, data, split)
    if not loaded.registered and len(loaded.classes) < len(dataset.classes) and set(loaded.classes) <= set(
            dataset.classes):
        dataset = dataset.subset(loaded.classes)  # a run trained on some of the data's classes (--classes)
    if len(dataset.classes) != loaded.model.num_classes:
        raise InvalidArgumentError(f"the data has {len(dataset.classes)} classes but the model "
                                   f"{loaded.model.num_classes}")
    # Registered weights name their classes (ImageNet's words), the folders by id (n01440764...): only the order,
    # sorted folder names, can be relied on there.
    generic = [str(i) for i in range(len(loaded.classes))]
    if not loaded.registered and dataset.classes != loaded.classes and loaded.classes != generic:
        raise InvalidArgumentError(f"the data's classes {dataset.classes[:5]}... differ from the model's "
                                   f"{loaded.classes[:5]}...")
    return dataset


def deploy_inputs(loaded: LoadedModel, data: str, calibration_count: int,
                  held_out_count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``xception deploy`` measures a classifier on: ``calibration_count`` training images of ``data`` (int8
    calibrates on them), and ``held_out_count`` validation images, evenly spaced, with their labels (agreement with
    fp32 is measured on them); all preprocessed as for evaluation."""
    calibration = calibration_images(loaded, data, calibration_count)
    dataset = checked_dataset(loaded, data, "val").spread(held_out_count)
    samples = readable_samples(dataset, range(len(dataset)))
    if not samples:
        raise InvalidArgumentError(f"{data} has no readable validation images to check the deployment on")
    return calibration, torch.stack([s[0] for s in samples]), torch.tensor([int(s[1]) for s in samples])


def loaded_from_deployment(deployment: Deployment) -> LoadedModel:
    """A deployed classifier (:func:`xception.load_deployed`) with the preprocessing and class names it records."""
    preprocessing = deployment.preprocessing or {}
    model = deployment.model
    return LoadedModel(model, deployment.classes, model.in_chans, preprocessing["crop_size"],
                       transform_from_preprocessing(preprocessing), preprocessing,
                       registered=deployment.record.get("registered", False))


def evaluate_on(loaded: LoadedModel, data: str, split: str = "val", *, batch_size: int = 64, workers: int = 0,
                precision: str | None = "auto", max_images: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Top-1/top-5, loss, per-class accuracy and the confusion matrix of ``loaded`` on ``split`` of ``data``,
    preprocessed with the model's own transform; and the data's class names. ``precision``: evaluate the model
    deployed by :func:`xception.optimize_for_inference` at this precision (``auto``: the machine's fastest native
    one, the model as loaded where that is fp32; int8 calibrated on training images, never the evaluated ones); None:
    the model as loaded, in fp32. ``max_images``: a quick check on that many images, evenly spaced over the split."""
    from torch.utils.data import DataLoader

    from .data import ResumableSampler, collate_skipping

    dataset = checked_dataset(loaded, data, split)
    evaluated = loaded
    if precision is not None:  # after the checks above: int8 calibration takes a while
        calibration = calibration_images(loaded, data, CALIBRATION_IMAGES) if precision == "int8" else None
        evaluated = deploy_loaded(loaded, precision, calibration, batch_size=batch_size)
    if max_images is not None:
        dataset = dataset.spread(max_images)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping,
                        sampler=ResumableSampler(len(dataset), shuffle=False))
    metrics = evaluate(evaluated.model, loader, len(dataset.classes), torch.device("cpu"),
                       channels_last=evaluated is loaded)  # a deployed model lays out its input itself
    return metrics, dataset.classes


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    """The confusion matrix as a PNG (class names on the axes up to 40 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(max(5, 0.45 * len(classes)), 20)  # 1000 classes would otherwise ask for a 45000-pixel square
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(confusion, cmap="Blues")
    if len(classes) <= 40:
        axis.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        axis.set_yticks(range(len(classes)), classes, fontsize=7)
    axis.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    figure.colorbar(image)
    figure.tight_layout()
    return save_figure(figure, path)


def add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to an ONNX file's metadata_props (the file is rewritten atomically)."""
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as temporary:
        onnx.save(model, str(temporary))


def describe_preprocessing(preprocessing: dict[str, Any]) -> str:
    """A LoadedModel's preprocessing in words: "RGB, resize the shorter side to 333 (bicubic), centre crop 299, ..."."""
    resize = preprocessing["resize_size"]
    if isinstance(resize, list):
        resized = f"resize to {resize[0]}x{resize[1]}"
    else:
        resized = f"resize the shorter side to {resize}"
    return (f"{'RGB' if len(preprocessing['mean']) == 3 else 'grayscale'}, {resized} "
            f"({preprocessing['interpolation']}), centre crop {preprocessing['crop_size']}, scale to 0..1, "
            f"normalise with mean {preprocessing['mean']} and std {preprocessing['std']}")
