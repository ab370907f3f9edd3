"""A deploy folder: the chosen model's files (a ``.pt2``, a ``.onnx``, or an OpenVINO ``.xml`` and ``.bin``) and
``deploy.json``, which names them and records everything else: the task, class names and preprocessing of the model
it was made from, every candidate's speed and agreement, and the machine it was measured on.

``deploy.json`` is the commit point. A new deployment writes its model under new names (``model-<id>.*``), then
replaces ``deploy.json`` atomically, then deletes the files of the deployment it replaced: a crash at any point
leaves the folder as it was or as it is meant to be, never a ``deploy.json`` naming half-written files.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, WeightFileError
from ..files import read_json, sync_file, write_text_atomic
from .base import RuntimeModel
from .runtimes import RUNTIMES

DEPLOY_FILE = "deploy.json"
FORMAT, FORMAT_VERSION = "xception-deployment", 1
MODEL_PREFIX = "model-"


@dataclass
class Deployment:
    """A deployed model read back, with what its ``deploy.json`` records."""

    model: RuntimeModel
    record: dict[str, Any]

    @property
    def task(self) -> str:
        return self.record["task"]

    @property
    def classes(self) -> list[str]:
        return list(self.record["classes"])

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        return self.record.get("preprocessing")


def write_deployment(folder: str | Path, model: RuntimeModel, record: dict[str, Any]) -> Path:
    """Write ``model`` and ``deploy.json`` (``record``, with the model's description and file names) into
    ``folder``, replacing a deployment already there; the path of ``deploy.json``. A folder that holds other files
    but no ``deploy.json`` is refused: it is not a deploy folder, and nothing in it is touched."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / DEPLOY_FILE).is_file():
        raise InvalidArgumentError(f"{folder} holds files but no {DEPLOY_FILE}: give a new or empty folder (or one "
                                   "xception deploy wrote) for the deployment")
    folder.mkdir(parents=True, exist_ok=True)
    files = model.save(folder, f"{MODEL_PREFIX}{uuid.uuid4().hex[:8]}")
    for name in files:
        sync_file(folder / name)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **record,
              "artifact": {**model.describe(), "files": files}}
    path = write_text_atomic(folder / DEPLOY_FILE, json.dumps(record, indent=2) + "\n")
    for stale in folder.glob(f"{MODEL_PREFIX}*"):
        if stale.name not in files:
            stale.unlink()
    return path


def read_record(folder: str | Path) -> dict[str, Any]:
    """``deploy.json`` of ``folder``, checked to be one this version reads."""
    path = Path(folder) / DEPLOY_FILE
    if not path.is_file():
        raise InvalidArgumentError(f"{folder} holds no {DEPLOY_FILE}: give a folder written by xception deploy")
    record = read_json(path, "deploy the model again")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise WeightFileError(f"{path} is not a deploy record (no format {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise WeightFileError(f"{path} has format version {record.get('format_version')!r}; this version of "
                              f"xception reads version {FORMAT_VERSION}: deploy the model again, or upgrade xception")
    return record


def load_deployed(folder: str | Path) -> Deployment:
    """The model ``xception deploy`` (or :func:`write_deployment`) wrote into ``folder``, ready to run in its
    runtime, with its record: the same preprocessing and class names as the model it was made from."""
    folder = Path(folder)
    record = read_record(folder)
    artifact = record["artifact"]
    runtime = RUNTIMES.get(artifact.get("runtime"))
    if runtime is None:
        raise WeightFileError(f"{folder / DEPLOY_FILE} names runtime {artifact.get('runtime')!r}; this version "
                              f"runs {', '.join(RUNTIMES)}")
    missing = [name for name in artifact["files"] if not (folder / name).is_file()]
    if missing:
        raise WeightFileError(f"{folder} lacks {', '.join(missing)}, which its {DEPLOY_FILE} names: copy the whole "
                              "folder, or deploy the model again")
    return Deployment(runtime.load(folder, artifact["files"], artifact), record)
