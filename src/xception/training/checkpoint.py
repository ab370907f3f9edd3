"""Training checkpoints: written atomically, read without running pickled code, complete enough to resume a run
bit for bit.

A checkpoint ``<name>`` in a run folder is two safetensors files:

- ``<name>.safetensors``: the model weights, named as in ``model.state_dict()``, with the metadata
  :func:`xception.save_weights` writes (``format``, ``model``, ``architecture``), so the file loads with
  :func:`xception.load_weights` and ``create_model(weights=...)`` like any saved weight file. It adds
  ``checkpoint_id``, ``checkpoint_step``, ``checkpoint_epoch``, ``checkpoint_saved_at`` and
  ``checkpoint_sha256`` to the metadata, which weight loading ignores.
- ``<name>.state.safetensors``: every other tensor (optimizer state, EMA weights, RNG states), flattened under
  path keys such as ``optimizer/state/3/exp_avg``, and in the metadata the format and its version, the same
  ``checkpoint_id``, a digest of the tensors, and the structure of the rest as JSON (``state``) in which the
  tensors appear as placeholders.

Nothing is pickled: tensors are raw safetensors data, everything else JSON. The JSON keeps Python types that
plain JSON loses: tuples, dict keys that are not strings (the optimizer's integer parameter ids), and the
floats inf, -inf and nan (an LR scheduler's ``best``).

Saving writes both files under temporary names in the run folder, flushes them to disk (fsync), then renames
the state file over the old one and after it the weights file, syncing the folder after each rename. The
weights file goes last because it is the one read on its own (evaluation, ``create_model(weights=...)``,
:func:`read_architecture`): it only ever changes once the state that goes with it is safely on disk, so it
always holds the last fully written checkpoint's weights. A failure before the first rename leaves the previous
checkpoint untouched, and no temporary file behind. A crash between the two renames leaves a new state file next
to the previous weights file: the ids differ, and :func:`load_checkpoint` refuses the pair and names the stale
file (and the complete new weights file left under its temporary name, which finishes the save when renamed:
:func:`finish_interrupted_save` does that, and a resumed run calls it first).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InvalidArgumentError
from ..files import sync_file, sync_folder
from ..weights import WeightFileError, read_safetensors_metadata
from .state_codec import CheckpointError, flatten_state, storable_tensor, tensors_digest, unflatten_state

FORMAT = "xception-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.safetensors"
TEMP_INFIX = ".tmp-"  # temporary files are "<final name>.tmp-<checkpoint id>"



@dataclass
class TrainingState:
    """Everything a training run needs to go on exactly where it stopped."""

    epoch: int  # epoch in progress (0-based)
    step: int  # optimizer steps done in total
    position: int  # samples of this epoch already consumed (per rank), for the resumable sampler
    best_score: float | None  # the best validation score so far: top-1 (classification) or mIoU (segmentation)
    model: dict[str, torch.Tensor]  # model.state_dict()
    ema: dict[str, torch.Tensor] | None  # the EMA model's state_dict, if any
    optimizer: dict  # optimizer.state_dict()
    scheduler: dict | None  # lr_scheduler.state_dict()
    grad_scaler: dict | None  # torch.amp.GradScaler.state_dict()
    rng: dict  # capture_rng_state()
    extra: dict  # JSON-able: config, metrics history, counters


# --- random number generators ----------------------------------------------------------------------

def capture_rng_state() -> dict:
    """The states of the global random number generators a training step draws from: PyTorch's CPU generator,
    its CUDA generators (where CUDA is initialised), NumPy's global ``np.random`` state and Python's ``random``.
    Tensors and JSON values only, so :func:`save_checkpoint` stores it without pickling.

    Generators a program creates itself (``torch.Generator``, ``np.random.default_rng``) are not global: put
    their states in :attr:`TrainingState.extra` or derive them from the epoch.
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Set the global generators to a :func:`capture_rng_state` result (as saved, or as loaded from a
    checkpoint). CUDA states are restored where CUDA is available, for as many devices as both have; a warning
    says when some cannot be."""
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    numpy = state["numpy"]
    np.random.set_state((numpy["bit_generator"], np.asarray(numpy["key"].numpy(), dtype=np.uint32), int(numpy["pos"]),
                         int(numpy["has_gauss"]), float(numpy["cached_gaussian"])))
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss_next"]))
    cuda = state.get("cuda")
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for device, cuda_state in enumerate(cuda[:available]):
            torch.cuda.set_rng_state(cuda_state.to(device="cpu", dtype=torch.uint8), device)
        if available < len(cuda):
            warnings.warn(f"the checkpoint has the CUDA random states of {len(cuda)} device(s) but {available} "
                          "are available here: the others are not restored, so the run will not repeat exactly",
                          stacklevel=2)


# --- saving ----------------------------------------------------------------------------------------

def checkpoint_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """The weights and state files of checkpoint ``name`` in ``directory``."""
    if (not name or name != Path(name).name or name.startswith(".") or name.endswith((".state", WEIGHTS_SUFFIX))
            or TEMP_INFIX in name):
        raise InvalidArgumentError(f"checkpoint name {name!r} should be a plain file name stem such as 'last' or "
                                   f"'best' "
                                   "(no folder, no leading dot, not ending in .state or .safetensors)")
    directory = Path(directory)
    return directory / f"{name}{WEIGHTS_SUFFIX}", directory / f"{name}{STATE_SUFFIX}"


def save_checkpoint(directory: str | Path, name: str, state: TrainingState, *, architecture: dict,
                    model_name: str) -> Path:
    """Write checkpoint ``name`` (e.g. "last" or "best") into ``directory``, atomically; returns the weights
    file ``<directory>/<name>.safetensors``. See the module documentation for the files and the write order.

    ``architecture`` and ``model_name`` (``model.architecture()``, ``model.model_name``) go into the weights
    file's metadata as :func:`xception.save_weights` writes them, so the model can be rebuilt from the file.
    Raises :class:`CheckpointError` for a value that cannot be stored or a failed write; the previous
    checkpoint of that name is then unchanged.
    """
    weights_path, state_path = checkpoint_paths(directory, name)
    checkpoint_id = secrets.token_hex(16)
    common = {"checkpoint_id": checkpoint_id, "checkpoint_step": str(state.step),
              "checkpoint_epoch": str(state.epoch),
              "checkpoint_saved_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}

    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state.model.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot store model entry {key!r}: a {type(tensor).__qualname__}, not a tensor")
        weights[key] = storable_tensor(tensor, f"model/{key}")
    weights_metadata = {"format": "xception", "model": model_name, "architecture": json.dumps(architecture),
                        **common, "checkpoint_sha256": tensors_digest(weights)}

    skeleton, tensors = flatten_state({
        "epoch": state.epoch, "step": state.step, "position": state.position, "best_score": state.best_score,
        "model_keys": list(weights), "ema": state.ema, "optimizer": state.optimizer, "scheduler": state.scheduler,
        "grad_scaler": state.grad_scaler, "rng": state.rng, "extra": state.extra,
    })
    state_metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **common, "model": model_name,
                      "weights_file": weights_path.name, "tensors_sha256": tensors_digest(tensors),
                      "state": json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    weights_tmp, state_tmp = (temporary_path(path, checkpoint_id) for path in (weights_path, state_path))
    keep_weights_tmp = False
    try:
        try:
            write_synced(state_tmp, tensors, state_metadata)
            write_synced(weights_tmp, weights, weights_metadata)
            os.replace(state_tmp, state_path)
        except Exception as error:
            raise CheckpointError(f"could not save checkpoint {name!r} in {weights_path.parent} ({error}); the "
                                  "previous checkpoint of that name, if any, is unchanged") from error
        # From here the state file is the new one: until the weights file follows, the pair is mismatched.
        keep_weights_tmp = True
        sync_folder(state_path.parent)
        try:
            os.replace(weights_tmp, weights_path)
        except Exception as error:
            raise CheckpointError(f"checkpoint {name!r} is half written: {state_path.name} is new but {weights_path} "
                                  f"could not be replaced ({error}); the new weights are complete in {weights_tmp}: "
                                  f"rename it to {weights_path.name} to finish the save") from error
        keep_weights_tmp = False
        sync_folder(weights_path.parent)
    finally:
        state_tmp.unlink(missing_ok=True)
        if not keep_weights_tmp:
            weights_tmp.unlink(missing_ok=True)
    remove_stale_temporaries(weights_path, state_path)
    return weights_path


def temporary_path(path: Path, checkpoint_id: str) -> Path:
    return path.with_name(f"{path.name}{TEMP_INFIX}{checkpoint_id}")


def write_synced(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file and flush it to the disk, so that a rename never exposes unwritten data."""
    save_file(tensors, str(path), metadata=metadata)
    sync_file(path)


def remove_stale_temporaries(*paths: Path) -> None:
    """Temporary files of earlier saves that were killed before they could clean up."""
    for path in paths:
        for leftover in path.parent.glob(f"*{TEMP_INFIX}*"):
            if leftover.name.startswith(path.name + TEMP_INFIX):
                leftover.unlink(missing_ok=True)


# --- loading ---------------------------------------------------------------------------------------

def load_checkpoint(directory: str | Path, name: str = "last") -> TrainingState:
    """Read checkpoint ``name`` from ``directory``, without unpickling anything: tensors come back on the CPU
    (``load_state_dict`` moves them to the parameters' devices), everything else with its Python types.

    Raises :class:`CheckpointError`, saying what is wrong and with which file, when a file is missing,
    truncated or corrupt, when the two files are not from the same save, or when the format version is not one
    this version reads.
    """
    weights_path, state_path = checkpoint_paths(directory, name)
    missing = [path for path in (weights_path, state_path) if not path.is_file()]
    if len(missing) == 2:
        raise CheckpointError(f"no checkpoint {name!r} in {weights_path.parent}: {weights_path.name} and "
                              f"{state_path.name} do not exist")
    if missing:
        present = state_path if missing[0] == weights_path else weights_path
        hint = "" if missing[0] == weights_path else (" (a weight file alone, e.g. from save_weights, loads with "
                                                      "load_weights but cannot resume training)")
        raise CheckpointError(f"checkpoint {name!r} in {weights_path.parent} is incomplete: {missing[0].name} is "
                              f"missing next to {present.name}{hint}")

    state_metadata = read_header(state_path)
    weights_metadata = read_header(weights_path)
    check_state_format(state_path, state_metadata)
    check_same_checkpoint(weights_path, weights_metadata, state_path, state_metadata)

    tensors = read_tensors(state_path, state_metadata.get("tensors_sha256"))
    weights = read_tensors(weights_path, weights_metadata.get("checkpoint_sha256"))
    try:
        tree = unflatten_state(json.loads(state_metadata["state"]), tensors)
        model_keys = tree["model_keys"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{state_path} is corrupt: its structure cannot be read ({error})") from error
    except CheckpointError as error:
        raise CheckpointError(f"{state_path} is corrupt: {error}") from error
    if set(model_keys) != set(weights):
        raise CheckpointError(f"{weights_path} does not hold the weights {state_path.name} lists "
                              f"({len(weights)} tensors, {len(model_keys)} expected); the checkpoint is corrupt")
    # Checkpoints written before segmentation training named the best score "best_top1".
    best_score = tree["best_score"] if "best_score" in tree else tree["best_top1"]
    return TrainingState(
        epoch=tree["epoch"], step=tree["step"], position=tree["position"], best_score=best_score,
        model={key: weights[key] for key in model_keys}, ema=tree["ema"], optimizer=tree["optimizer"],
        scheduler=tree["scheduler"], grad_scaler=tree["grad_scaler"], rng=tree["rng"], extra=tree["extra"],
    )


def read_header(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, after safetensors has checked the header and the file's length."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt: it cannot be read as safetensors ({error})") from error


def read_tensors(path: Path, expected_digest: str | None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt: it cannot be read as safetensors ({error})") from error
    if expected_digest is None or tensors_digest(tensors) != expected_digest:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the digest written with them "
                              "(damaged on disk or edited)")
    return tensors


def check_state_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint state file (its metadata format is "
                              f"{metadata.get('format')!r}, not {FORMAT!r})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        version = None
    if version != FORMAT_VERSION:
        newer = version is not None and version > FORMAT_VERSION
        raise CheckpointError(f"{path} has checkpoint format version {metadata.get('format_version')!r}; this "
                              f"version of xception reads version {FORMAT_VERSION}"
                              f"{': it was written by a newer xception, upgrade to resume it' if newer else ''}")
    if "state" not in metadata or "checkpoint_id" not in metadata:
        raise CheckpointError(f"{path} is corrupt: its metadata lacks the checkpoint structure or id")


def check_same_checkpoint(weights_path: Path, weights_metadata: dict[str, str], state_path: Path,
                          state_metadata: dict[str, str]) -> None:
    """Refuse a weights file and a state file from different saves, naming the stale one."""
    state_id, weights_id = state_metadata["checkpoint_id"], weights_metadata.get("checkpoint_id")
    if weights_id == state_id:
        return
    if weights_id is None:
        raise CheckpointError(f"{weights_path} is not the weights file of the checkpoint in {state_path.name}: it "
                              "has no checkpoint id, so it was written by something else (save_weights?) over the "
                              "checkpoint's; the pair cannot be resumed")

    def describe(metadata: dict[str, str]) -> str:
        return (f"checkpoint {metadata.get('checkpoint_id', '?')[:8]}, step {metadata.get('checkpoint_step', '?')}, "
                f"saved {metadata.get('checkpoint_saved_at', '?')}")

    def order(metadata: dict[str, str]) -> tuple[int, str]:
        step = metadata.get("checkpoint_step", "")
        return (int(step) if step.lstrip("-").isdigit() else -1, metadata.get("checkpoint_saved_at", ""))

    # The state file is replaced first, so after an interrupted save the weights file is the older one.
    stale = state_path if order(state_metadata) < order(weights_metadata) else weights_path
    leftover = new_weights_leftover(weights_path, state_id)
    finish = (f"; the complete new weights file is {leftover}: renaming it to {weights_path.name} finishes the "
              "interrupted save" if leftover is not None and stale == weights_path else "")
    raise CheckpointError(
        f"the checkpoint files do not belong together: {stale} is stale. {weights_path.name} is from "
        f"{describe(weights_metadata)}; {state_path.name} is from {describe(state_metadata)}. A save was "
        f"interrupted between replacing {state_path.name} and {weights_path.name}, or the files were copied "
        f"separately{finish}. Refusing to resume from a mismatched pair"
    )


def finish_interrupted_save(directory: str | Path, name: str = "last") -> bool:
    """Finish a save that was killed between its two renames: the state file is the new one, and the new weights
    file, complete and synced before the state file was renamed, still waits under its temporary name with the
    state's checkpoint id. Renames it into place and returns True; False (and nothing changed) in any other case, so
    :func:`load_checkpoint` reports whatever else is wrong. Safe to call from several processes at once."""
    weights_path, state_path = checkpoint_paths(directory, name)
    state_id = header_id(state_path) if state_path.is_file() else None
    if state_id is None or (weights_path.is_file() and header_id(weights_path) == state_id):
        return False
    leftover = new_weights_leftover(weights_path, state_id)
    if leftover is None:
        return False
    try:
        os.replace(leftover, weights_path)
    except FileNotFoundError:  # another process (a DDP rank) finished it first
        return header_id(weights_path) == state_id
    sync_folder(weights_path.parent)
    return True


def new_weights_leftover(weights_path: Path, state_id: str) -> Path | None:
    """The complete weights file an interrupted save left under its temporary name, with the state's id."""
    return next((path for path in sorted(weights_path.parent.glob(f"{weights_path.name}{TEMP_INFIX}*"))
                 if header_id(path) == state_id), None)


def header_id(path: Path) -> str | None:
    try:
        return read_header(path).get("checkpoint_id")
    except CheckpointError:
        return None


# --- architecture ----------------------------------------------------------------------------------

def read_architecture(path: str | Path) -> tuple[str, dict]:
    """``(model_name, architecture)`` from a weights file written by :func:`save_checkpoint` or
    :func:`xception.save_weights`, or from a run folder (its ``best.safetensors``, else ``last.safetensors``):
    ``create_model(model_name, **architecture)`` rebuilds the model the weights fit."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / f"best{WEIGHTS_SUFFIX}", path / f"last{WEIGHTS_SUFFIX}"]
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path} has no checkpoint: neither {candidates[0].name} nor {candidates[1].name}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    if path.name.endswith(STATE_SUFFIX):
        weights = path.with_name(path.name[: -len(STATE_SUFFIX)] + WEIGHTS_SUFFIX)
        raise CheckpointError(f"{path} is a checkpoint's training state, not its weights: use {weights}")
    try:
        metadata = read_safetensors_metadata(path)
    except (WeightFileError, OSError, AttributeError) as error:
        raise CheckpointError(f"{path} cannot be read as a safetensors weight file ({error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != "xception" or "architecture" not in metadata:
        raise CheckpointError(f"{path} has no architecture in its metadata: it was not written by save_checkpoint "
                              "or xception.save_weights, so the model cannot be rebuilt from it")
    try:
        architecture = json.loads(metadata["architecture"])
    except ValueError as error:
        raise CheckpointError(f"{path} has an unreadable architecture in its metadata ({error})") from error
    return metadata.get("model", "xception"), architecture


__all__ = [
    "CheckpointError",
    "TrainingState",
    "capture_rng_state",
    "flatten_state",
    "load_checkpoint",
    "read_architecture",
    "restore_rng_state",
    "save_checkpoint",
    "unflatten_state",
]
