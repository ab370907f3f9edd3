"""The pretrained-model folder :func:`xception.save_pretrained` writes and :func:`xception.from_pretrained` reads,
locally or as a Hugging Face Hub repository:

- ``config.json``: the model's name and every architecture option (``create_model(model, **architecture)``
  rebuilds it), its task, class names, preprocessing, metrics, datasets, license and the library version;
- ``model.safetensors``: the weights, as :func:`xception.save_weights` writes them (so the file alone also loads
  with ``weights=``);
- ``README.md``: the model card, with the Hub's metadata.

Reading needs no model code, so that evaluation and prediction can take ``--weights hf-hub:org/name``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError, WeightFileError
from ..files import read_json
from .download import HubRepo, hub_repo_file, parse_hub_spec
from .loading import PRETRAINED_WEIGHTS

if TYPE_CHECKING:
    from ..data.transforms import Transform

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "xception-pretrained"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PretrainedConfig:
    """What ``config.json`` holds. ``metrics`` are measured or published results, each ``{"name", "type",
    "value", "dataset", "dataset_id", "split", "source"}`` (values in percent); ``preprocessing`` the evaluation
    transform (:meth:`transforms`) or None where it is not known."""

    model: str
    architecture: dict[str, Any]
    task: str = "image-classification"
    classes: tuple[str, ...] = ()
    preprocessing: dict[str, Any] | None = None
    metrics: tuple[dict[str, Any], ...] = ()
    datasets: tuple[str, ...] = ()
    license: str | None = None
    base_model: str | None = None  # the weights it was fine-tuned from, where known
    library_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "library": "xception", **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> PretrainedConfig:
        """The config in ``data`` (parsed ``config.json``), or an error naming ``where`` it came from and what is
        wrong with it."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise WeightFileError(f"{where} is not an xception pretrained-model config (its format is {found!r}, not "
                                  f"{FORMAT!r}); save one with xception.save_pretrained")
        if data.get("format_version") != FORMAT_VERSION:
            raise WeightFileError(f"{where} has format version {data.get('format_version')!r}; this version of "
                                  f"xception reads version {FORMAT_VERSION}: upgrade xception to load it")
        if not isinstance(data.get("model"), str) or not isinstance(data.get("architecture"), dict):
            raise WeightFileError(f"{where} names no model and architecture: it cannot rebuild the model")
        names = {item.name for item in fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        for key in ("classes", "metrics", "datasets"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)

    def transforms(self) -> Transform | None:
        """The evaluation preprocessing, as the weights were made or the run was evaluated; None where unknown.

        Registered weights' preprocessing (resize the shorter side, centre-crop, normalise) is a
        :class:`~xception.data.ClassificationTransform`; a training run's is its recipe's
        :func:`~xception.data.eval_transform` (marked by ``eval_resize_ratio``)."""
        settings = self.preprocessing
        if not settings or self.task != "image-classification":
            return None
        from ..data.transforms import transform_from_preprocessing

        return transform_from_preprocessing(settings)


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by save_pretrained (its ``config.json`` says so)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, AttributeError, OSError):
        return False


def pretrained_folder(source: str | Path) -> Path:
    """The local folder of ``source``: the folder itself, or for ``hf-hub:org/name[@revision]`` the Hub cache's
    snapshot holding its ``config.json`` and ``model.safetensors`` (both of the same commit)."""
    repo = parse_hub_spec(source)
    if repo is None:
        folder = Path(source)
        if not folder.is_dir():
            raise InvalidArgumentError(f"{folder} is not a folder: give the folder save_pretrained wrote or "
                                       "hf-hub:org/name[@revision]")
        return folder
    config = hub_repo_file(repo, CONFIG_FILE)
    # The snapshot folder is named by the commit the revision resolved to: fetch the weights at that same commit,
    # even if the branch moves in between.
    commit = config.parent.name if len(config.parent.name) == 40 else repo.revision
    weights = hub_repo_file(HubRepo(repo.repo, commit), PRETRAINED_WEIGHTS)
    if weights.parent != config.parent:
        raise WeightFileError(f"the Hub gave {weights} and {config} for {repo}, from different snapshots")
    return config.parent


def read_pretrained(folder: str | Path) -> tuple[PretrainedConfig, Path]:
    """The config and the weights file of a save_pretrained folder, or an error saying what the folder lacks."""
    folder = Path(folder)
    config_path, weights = folder / CONFIG_FILE, folder / PRETRAINED_WEIGHTS
    run = any((folder / f"{name}.safetensors").is_file() for name in ("best", "last"))
    if run and not is_pretrained_folder(folder):
        raise WeightFileError(f"{folder} is a training run, not a folder written by xception.save_pretrained: load "
                              f"it with --checkpoint, or share it with xception.save_pretrained(run_dir, folder)")
    if not config_path.is_file():
        raise WeightFileError(f"{folder} has no {CONFIG_FILE}: it is not a folder written by xception.save_pretrained")
    config = PretrainedConfig.from_json(read_json(config_path), str(config_path))
    if not weights.is_file():
        raise WeightFileError(f"{folder} has a {CONFIG_FILE} but no {PRETRAINED_WEIGHTS}")
    return config, weights
