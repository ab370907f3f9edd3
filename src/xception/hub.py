"""Sharing models: a folder the Hugging Face Hub understands, loading one back by path or ``hf-hub:`` name, pushing.

- :func:`save_pretrained` writes a model, a training run (its best weights, classes, preprocessing and the best
  validation result from its history) or a loaded pretrained model as ``config.json``, ``model.safetensors`` and a
  model card ``README.md`` with the Hub's metadata (library, pipeline tag, license, datasets, metrics).
- :func:`from_pretrained` rebuilds the model from such a folder or from ``hf-hub:org/name[@revision]`` (through
  ``huggingface_hub``'s cache), bit for bit; ``model.pretrained_config`` keeps what the folder says.
- :func:`push_to_hub` uploads one with ``huggingface_hub`` (``xception push``).

The folder format itself is :mod:`xception.weights.pretrained`, which needs no model code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .data.transforms import eval_transform_description
from .errors import InvalidArgumentError
from .files import write_text_atomic
from .models import create_model
from .models.registry import model_task
from .training.checkpoint import read_architecture
from .training.finetune import run_weights
from .version import __version__
from .weights import save_weights
from .weights.loading import PRETRAINED_WEIGHTS, registered_weights
from .weights.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    PretrainedConfig,
    is_pretrained_folder,
    pretrained_folder,
    read_pretrained,
)

FORMATS = ("xception", "timm")
FASHION_MNIST = ("Fashion-MNIST", "zalando-datasets/fashion_mnist")
IMAGENET = ("ImageNet-1k", "imagenet-1k")
# Epoch records of a run's metrics.jsonl: key -> (Hub metric type, name). The first present ranks the epochs.
RUN_METRICS = {"val_miou": ("mean_iou", "mIoU"), "val_top1": ("accuracy", "top-1 accuracy"),
               "val_top5": ("top_5_accuracy", "top-5 accuracy"),
               "val_balanced_accuracy": ("balanced_accuracy", "balanced accuracy"),
               "val_pixel_accuracy": ("accuracy", "pixel accuracy")}


def save_pretrained(model_or_run_dir: nn.Module | str | Path, directory: str | Path, *, format: str = "xception",
                    repo_id: str | None = None, preprocessing: dict[str, Any] | None = None,
                    license: str | None = None) -> Path:
    """Write ``model_or_run_dir`` to ``directory`` for sharing; returns ``directory``.

    Args:
        model_or_run_dir: a model of the family, a training run folder (its ``best`` weights, else ``last``), or a
            folder written by save_pretrained (re-saved with its metadata).
        format: ``"xception"`` (``config.json``, ``model.safetensors``, ``README.md``) or ``"timm"`` (the folder
            :func:`xception.timm_interop.save_timm_folder` writes, which ``timm.create_model("local-dir:...")``
            loads: the aligned models, and ``xception`` with ``numerics="timm"``).
        repo_id: the Hub name (``org/name``) the card's usage snippet loads; default the folder.
        preprocessing: the evaluation preprocessing to record (:class:`~xception.data.ClassificationTransform`'s
            fields), for a model that has none of its own (registered weights and runs bring theirs).
        license: the Hub license id (``"mit"``, ``"apache-2.0"``, ...); default that of the pretrained weights.
    """
    if format not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    model, config = describe(model_or_run_dir)
    if format == "timm":
        return save_timm(model, directory)
    if preprocessing is not None:
        config["preprocessing"] = preprocessing
    if license is not None:
        config["license"] = license
    pretrained = PretrainedConfig(**config)
    pretrained.transforms()  # a preprocessing that cannot be built is refused now, not when loading
    directory = Path(directory)
    save_weights(model, directory / PRETRAINED_WEIGHTS)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(pretrained.to_json(), indent=2) + "\n")
    write_text_atomic(directory / CARD_FILE, model_card(pretrained, repo_id=repo_id, folder=directory))
    return directory


def save_timm(model: nn.Module, directory: str | Path) -> Path:
    """timm's folder (timm_interop.save_timm_folder); timm is needed for it only."""
    try:
        from .timm_interop import save_timm_folder
    except ImportError as error:
        raise InvalidArgumentError(f"format='timm' needs timm (pip install timm): {error}") from None
    return save_timm_folder(model, directory)


def from_pretrained(source: str | Path) -> nn.Module:
    """The model a save_pretrained folder or a Hub repository (``"hf-hub:org/name[@revision]"``) holds, with its
    weights, in evaluation mode. ``model.pretrained_config`` (:class:`~xception.weights.pretrained.PretrainedConfig`)
    has its classes, metrics and preprocessing: ``model.pretrained_config.transforms()``."""
    config, weights = read_pretrained(pretrained_folder(source))
    model = create_model(config.model, weights=weights, **config.architecture)
    model.pretrained_config = config
    return model.eval()


def push_to_hub(source: nn.Module | str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, license: str | None = None, token: str | None = None) -> str:
    """Upload ``source`` (a model, a run folder or a save_pretrained folder) to the Hub model repository
    ``repo_id``, creating it if needed; returns the commit's URL. The token is ``token``, else huggingface_hub's
    (``HF_TOKEN``, or ``hf auth login``); ``revision`` a branch, created from main if new."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise InvalidArgumentError(f"pushing to {repo_id} needs a Hugging Face token with write access: run "
                                   "`hf auth login`, or set HF_TOKEN")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="xception-push-") as folder:
        save_pretrained(source, folder, repo_id=repo_id, license=license)
        model = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload {model} (xception {__version__})")
    return str(getattr(info, "commit_url", info))


# --- what a model or a run says about itself ------------------------------------------------------------------

def describe(source: nn.Module | str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the fields of its PretrainedConfig, from a model, a run folder or a save_pretrained folder."""
    if isinstance(source, nn.Module):
        return source, describe_model(source)
    path = Path(source)
    if is_pretrained_folder(path):
        return describe(from_pretrained(path))
    if not path.is_dir():
        raise InvalidArgumentError(f"{path} is neither a model, a training run folder nor a save_pretrained folder")
    return describe_run(path)


def describe_model(model: nn.Module) -> dict[str, Any]:
    if not hasattr(model, "architecture") or not hasattr(model, "model_name"):
        raise InvalidArgumentError(f"save_pretrained takes a model of the xception family (create_model), not "
                                   f"{type(model).__name__}: it needs model_name and architecture()")
    name = model.model_name
    fields: dict[str, Any] = {"model": name, "architecture": model.architecture(), "task": task_of(name),
                              "library_version": __version__}
    loaded = getattr(model, "pretrained_config", None)
    registered = getattr(model, "pretrained_weights", None)
    if isinstance(loaded, PretrainedConfig):
        keep = ("classes", "preprocessing", "metrics", "datasets", "license", "base_model")
        fields.update({key: getattr(loaded, key) for key in keep})
    elif registered is not None:
        fields.update(registered_fields(registered))
    return fields


def registered_fields(registered: Any) -> dict[str, Any]:
    """Classes, preprocessing, published results, dataset and license of registered weights."""
    imagenet = registered.meta.get("categories") == "imagenet"
    dataset, dataset_id = IMAGENET if imagenet else (None, None)
    metrics = []
    for scores in registered.meta.get("metrics", {}).values():
        for key, name in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy")):
            if key in scores:
                metrics.append({"name": f"{name} (%)", "type": "accuracy" if key == "top1" else "top_5_accuracy",
                                "value": scores[key], "dataset": dataset, "dataset_id": dataset_id,
                                "split": "validation", "source": f"as published: {registered.meta.get('source')}"})
    license = registered.meta.get("license")
    return {"classes": tuple(registered.categories),
            "preprocessing": {key: list(value) if isinstance(value, tuple) else value
                              for key, value in registered.transform_config.items()},
            "metrics": tuple(metrics), "datasets": (dataset_id,) if dataset_id else (),
            "license": license.lower() if license else None,
            "base_model": f"{registered.model}.{registered.name}"}


def describe_run(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A training run: its best weights (else last), rebuilt from their architecture; its classes, the
    preprocessing its validation used, the best validation epoch of its history, its data set."""
    weights = run_weights(folder)
    name, architecture = read_architecture(weights)
    model = create_model(name, weights=weights, **architecture)
    run = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() \
        else {}
    train, recipe = run.get("train", {}), run.get("recipe", {})
    in_chans = run.get("in_chans", getattr(model, "in_chans", 3))
    fields = describe_model(model)
    fields["classes"] = tuple(run.get("classes") or ())
    registered = None
    if train.get("weights"):
        try:
            registered = registered_weights(name, train["weights"])
        except InvalidArgumentError:  # a file that has since gone: not registered weights either way
            registered = None
    if registered is not None:
        fields["license"] = (registered.meta.get("license") or "").lower() or None
        fields["base_model"] = f"{registered.model}.{registered.name}"
    elif train.get("weights"):
        fields["base_model"] = str(train["weights"])
    # The transform the run's validation used (training.data): registered weights' own for RGB fine-tuning. A
    # segmentation run's (images and masks together) has no classification transform to record.
    if fields["task"] != "image-classification":
        fields["preprocessing"] = None
    elif registered is not None and in_chans == 3:
        fields["preprocessing"] = registered_fields(registered)["preprocessing"]
    elif recipe.get("img_size"):
        fields["preprocessing"] = eval_transform_description(recipe["img_size"], in_chans,
                                                             recipe.get("eval_resize_ratio", 1.0))
    data = str(train.get("data", ""))
    dataset, dataset_id, split = (*FASHION_MNIST, "test") if data == "fashion-mnist" else (
        Path(data).name or None, None, "val")
    fields["datasets"] = (dataset_id,) if dataset_id else ()
    fields["metrics"] = run_metrics(folder / "metrics.jsonl", dataset, dataset_id, split, train.get("val_subset"))
    return model, fields


def run_metrics(path: Path, dataset: str | None, dataset_id: str | None, split: str,
                subset: int | None) -> tuple[dict[str, Any], ...]:
    """The validation results of a run's best epoch (by mIoU, else top-1) from its metrics.jsonl, in percent."""
    if not path.is_file():
        return ()
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and any(isinstance(record.get(key), int | float) for key in RUN_METRICS):
            records.append(record)
    rank = next((key for key in RUN_METRICS if any(key in record for record in records)), None)
    if rank is None:
        return ()
    best = max((record for record in records if isinstance(record.get(rank), int | float)), key=lambda r: r[rank])
    where = f"the first {subset} images of " if subset else ""
    source = f"measured by xception train: best epoch ({best.get('epoch')}) on {where}the {split} split"
    return tuple({"name": f"{name} (%)", "type": kind, "value": round(100 * best[key], 2), "dataset": dataset,
                  "dataset_id": dataset_id, "split": split, "source": source}
                 for key, (kind, name) in RUN_METRICS.items() if isinstance(best.get(key), int | float))


def task_of(model_name: str) -> str:
    """The Hub's pipeline tag for a model of the registry."""
    return "image-segmentation" if model_task(model_name) == "segmentation" else "image-classification"


# --- the model card ----------------------------------------------------------------------------------------------

def model_card(config: PretrainedConfig, *, repo_id: str | None = None, folder: Path | None = None) -> str:
    """README.md: the Hub's metadata (YAML front matter, written by huggingface_hub) and what the model is, how it
    was measured and how to load it."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [EvalResult(task_type=config.task, dataset_type=m["dataset_id"] or m["dataset"] or "unknown",
                          dataset_name=m["dataset"] or "unknown", dataset_split=m.get("split"),
                          metric_type=m["type"], metric_value=m["value"], metric_name=m["name"])
               for m in config.metrics]
    metadata = ModelCardData(library_name="xception", pipeline_tag=config.task, license=config.license,
                             datasets=list(config.datasets) or None, tags=[config.task, "xception", config.model],
                             model_name=repo_id or config.model, eval_results=results or None)
    source = f"hf-hub:{repo_id}" if repo_id else str(folder or "path/to/this/folder")
    as_weights = source if repo_id else f"{source}/{PRETRAINED_WEIGHTS}"
    command = f"--weights {source}" if repo_id else f"--checkpoint {source}"
    classes = ", ".join(config.classes[:20]) + (f", ... ({len(config.classes)} in all)" if len(config.classes) > 20
                                                 else "")
    lines = [f"# {repo_id or config.model}", "",
             f"`{config.model}` ({config.task}) from the `xception` library (version {config.library_version}), "
             "saved with `xception.save_pretrained`.", "",
             "## Model", "",
             f"- Architecture: `xception.create_model({config.model!r}, **architecture)` with `architecture` = "
             f"`{json.dumps(config.architecture)}`",
             f"- Classes: {classes or 'not named (class indices)'}",
             f"- Preprocessing: {describe_preprocessing(config.preprocessing)}"]
    if config.base_model:
        lines.append(f"- Fine-tuned from: `{config.base_model}`")
    lines.append(f"- License: {config.license or 'not stated (pass license= to save_pretrained)'}")
    if config.metrics:
        lines += ["", "## Results", "", "| metric | data set | split | value | source |", "|---|---|---|---:|---|"]
        lines += [f"| {m['name']} | {m['dataset'] or '-'} | {m['split'] or '-'} | {m['value']} | {m['source']} |"
                  for m in config.metrics]
    lines += ["", "## Usage", "", "```python", "import xception", "",
              f"model = xception.from_pretrained({source!r})  # evaluation mode, weights checked on loading",
              "preprocess = model.pretrained_config.transforms()  # the evaluation preprocessing, or None",
              "logits = model(preprocess(\"image.jpg\").unsqueeze(0))", "```", "",
              f"Or from the command line: `xception predict {command} image.jpg`. As weights for a model built "
              f"otherwise: `xception.create_model({config.model!r}, weights={as_weights!r}, ...)`.", ""]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)


def describe_preprocessing(preprocessing: dict[str, Any] | None) -> str:
    if not preprocessing:
        return "not recorded"
    resize = preprocessing.get("resize_size")
    resize_text = (f"resize to {resize[0]}x{resize[1]}" if isinstance(resize, list)
                   else f"resize the shorter side to {resize}")
    return (f"{resize_text} ({preprocessing.get('interpolation', 'bilinear')}), centre crop "
            f"{preprocessing.get('crop_size')}, scale to [0, 1], normalise with mean {preprocessing.get('mean')} and "
            f"std {preprocessing.get('std')}")
