"""The fastest correct deployment of a model on this machine, chosen by measurement.

Every candidate of :data:`xception.deploy.CANDIDATES` this machine can build is built from the model (int8 calibrated
on the calibration images), run on held-out images and compared with the eager fp32 model by the task's agreement
(:data:`xception.deploy.AGREEMENTS`), then all of them are timed interleaved in one process at the target batch size
(:func:`~.timing.run_interleaved`, as every benchmark here). The winner is the fastest candidate that agrees. A
candidate that cannot be built here is kept in the record as skipped (its runtime not installed, bf16 not native) or
failed (the error), never silently dropped.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy import AGREEMENTS, CANDIDATE_NAMES, RuntimeCandidate, RuntimeModel, get_candidate
from ..hardware import probe
from .timing import BenchmarkConfig, Candidate, run_interleaved

log = logging.getLogger("xception.deploy")


@dataclass
class Selection:
    """The chosen model (None if none agreed) and what deploy.json records of the choice (machine, sizes, bound,
    and every candidate's row)."""

    winner: RuntimeModel | None
    record: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.record["candidates"]


def choose_deployment(model: nn.Module, calibration: torch.Tensor, held_out: torch.Tensor, labels: torch.Tensor, *,
                      batch_size: int = 1, candidates: Sequence[str] = CANDIDATE_NAMES, agreement: Any = None,
                      repeats: int = 5, iterations: int = 5) -> Selection:
    """Build, check and time each of ``candidates`` (see the module docstring).

    Args:
        model: the trained model (classification or segmentation: its ``task`` picks the agreement).
        calibration: real images, preprocessed as for evaluation (NCHW), that int8 calibrates on and whose first
            ``batch_size`` are the timed batch; never the held-out images.
        held_out: other real images, and their ``labels``: agreement with fp32 is measured on them.
        agreement: a :class:`~xception.deploy.TopOneAgreement` or :class:`~xception.deploy.MeanIoUAgreement`;
            by default the task's with its default bound.
    """
    model = model.eval()
    agreement = agreement or AGREEMENTS[getattr(model, "task", "classification")]()
    example = timed_batch(calibration, batch_size)
    batches = calibration_batches(calibration, batch_size)
    reference = batched_outputs(model, held_out, batch_size)

    rows: list[dict[str, Any]] = []
    built: dict[str, RuntimeModel] = {}
    with tempfile.TemporaryDirectory(prefix="xception-deploy-") as workdir:
        for name in candidates:
            rows.append(_build(get_candidate(name), model, example, batches, Path(workdir), built))
    for row in (row for row in rows if row["candidate"] in built):
        try:
            outputs = batched_outputs(built[row["candidate"]], held_out, batch_size)
        except Exception as error:  # as for a build: recorded, the others still run
            del built[row["candidate"]]
            row.update(status="failed", reason=_failure(row["candidate"], error))
            continue
        measured = agreement.measure(reference, outputs, labels)
        rejected = agreement.rejects(measured)
        row.update({key: round(value, 6) for key, value in measured.items()})
        row.update(status="rejected" if rejected else "accepted", reason=rejected)

    _time(built, rows, example, repeats, iterations)
    accepted = [row for row in rows if row["status"] == "accepted"]
    best = max(accepted, key=lambda row: row["images_per_s"], default=None)
    if best is not None:
        best["status"] = "chosen"
    record = {"machine": probe().line(), "batch_size": batch_size, "img_size": list(example.shape[-2:]),
              "held_out_images": len(held_out), "calibration_images": len(calibration), "bound": agreement.bound,
              "threads": torch.get_num_threads(), "candidates": rows}
    return Selection(built[best["candidate"]] if best else None, record)


def _build(candidate: RuntimeCandidate, model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor],
           workdir: Path, built: dict[str, RuntimeModel]) -> dict[str, Any]:
    """The candidate's row: skipped (with why) or failed (with the error), or built into ``built``."""
    row: dict[str, Any] = {"candidate": candidate.name, "runtime": candidate.runtime, "precision": candidate.precision}
    if (reason := candidate.unavailable()) is not None:
        return row | {"status": "skipped", "reason": reason}
    start = time.perf_counter()
    try:
        built[candidate.name] = candidate.build(model, example, calibration, workdir)
    except Exception as error:  # a runtime's own failure on this model: recorded, the others still run
        return row | {"status": "failed", "reason": _failure(candidate.name, error)}
    row["build_s"] = round(time.perf_counter() - start, 2)
    log.info("built %s in %.1f s", candidate.name, row["build_s"])
    return row


def _failure(name: str, error: Exception) -> str:
    """The reason a deploy.json gives for a failed candidate (the traceback goes to the debug log)."""
    log.debug("%s failed:\n%s", name, traceback.format_exc())
    return f"{type(error).__name__}: {error}".strip()[:500]


def timed_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` of ``images``, repeated where there are fewer: the batch a candidate is timed on."""
    repeats = -(-batch_size // len(images))
    return images.repeat(repeats, 1, 1, 1)[:batch_size] if repeats > 1 else images[:batch_size]


def calibration_batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``images`` in the batches int8 calibrates on: the target batch, at least 16 (a few, not one per image)."""
    return list(images.split(max(batch_size, 16)))


@torch.no_grad()
def batched_outputs(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's float32 outputs on ``images``, in batches of ``batch_size`` (the size it is made for), on the
    CPU (where the labels are)."""
    return torch.cat([model(batch).float().cpu() for batch in images.split(batch_size)])


def _time(built: dict[str, RuntimeModel], rows: list[dict[str, Any]], example: torch.Tensor, repeats: int,
          iterations: int) -> None:
    """Every built candidate timed interleaved on ``example``: images/s and p50 latency into its row."""
    if not built:
        return
    size = tuple(example.shape[-2:])
    config = BenchmarkConfig(batch_size=len(example), img_size=size, precision="fp32", warmup=2, repeats=repeats,
                             iterations=iterations)
    timed = [Candidate(name, "-", _runner(runtime_model, example), size, precision=runtime_model.precision)
             for name, runtime_model in built.items()]
    for result in run_interleaved(timed, config):
        row = next(row for row in rows if row["candidate"] == result.candidate)
        row.update(images_per_s=round(result.images_per_s or 0.0, 3), p50_ms=round(result.p50_ms or 0.0, 3))


def _runner(model: RuntimeModel, x: torch.Tensor) -> Any:
    def step() -> torch.Tensor:
        return model(x)

    return step
