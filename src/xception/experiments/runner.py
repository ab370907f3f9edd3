"""Running the experiments: every variant trained with every seed through :func:`xception.training.train`, judged, and
written out. Runs are cached in ``OUTPUT/runs/<variant>-<digest>/seed<k>`` (see :func:`_run_folder`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..files import write_text_atomic
from ..hardware import probe
from ..training import TrainConfig, train
from ..training.recipes import get_recipe
from .definitions import (
    EXPERIMENT_NAMES,
    EXPERIMENTS,
    FULL,
    PAPER_TABLE3,
    SEGMENTATION_EXPERIMENTS,
    DataInfo,
    ExperimentSettings,
    Variant,
    command_line,
    describe_data,
    model_options,
    parameter_count,
)
from .report import today, write_outputs
from .segmentation import SegmentationSettings
from .verdicts import SCORE_NAMES, ExperimentResult, RunResult, VariantResult, judge_experiment


def _resolve_names(name: str, settings: ExperimentSettings | SegmentationSettings) -> list[str]:
    if name == "all":
        names = list(EXPERIMENT_NAMES)
    elif name in EXPERIMENTS:
        names = [name]
    else:
        raise InvalidArgumentError(f"unknown experiment {name!r}; valid experiments: "
                                   f"{', '.join([*EXPERIMENT_NAMES, 'all', *SEGMENTATION_EXPERIMENTS])}")
    segmentation = names[0] in SEGMENTATION_EXPERIMENTS
    if segmentation != isinstance(settings, SegmentationSettings):
        wanted = "SegmentationSettings" if segmentation else "ExperimentSettings"
        raise InvalidArgumentError(f"experiment {name!r} takes {wanted}: make them with "
                                   f"make_settings(experiment={name!r}, ...)")
    return names


def run_experiments(name: str, settings: ExperimentSettings | SegmentationSettings = FULL,
                    output: str | Path = "runs/experiments", *,
                    report: Callable[[str], None] | None = None) -> list[ExperimentResult]:
    """Run ``name`` (an experiment or ``all``, the Xception paper's) and write its outputs under ``output``;
    ``report`` receives one line per finished run. The name and the data are checked before anything trains."""
    names = _resolve_names(name, settings)
    info = describe_data(settings)
    command = command_line(name, settings, output)
    return [_run_experiment(each, settings, Path(output), info, command, report) for each in names]


def _run_experiment(name: str, settings: ExperimentSettings | SegmentationSettings, output: Path, info: DataInfo,
                    command: str, report: Callable[[str], None] | None) -> ExperimentResult:
    """Train every variant of one experiment with every seed, judge, and write ``output/name/``."""
    experiment = EXPERIMENTS[name]
    variants = []
    for variant in experiment.variants(info):
        model, options = model_options(variant)
        runs = [_train_variant(variant, seed, settings, output, report=report, tag=name, score=experiment.score)
                for seed in range(settings.seeds_for(variant.fewer_seeds))]
        variants.append(VariantResult(variant.key, variant.label, model, options, parameter_count(variant, info),
                                      variant.note, runs))
    full_size = _measure_full_size(settings, output, report) if name == "inception" and settings.benchmark else None
    verdict = judge_experiment(name, variants, settings, info, full_size)
    runs = [run for v in variants for run in v.runs]
    result = ExperimentResult(
        name=name, title=experiment.title, paper=experiment.paper, claim=experiment.claim, settings=asdict(settings),
        data=asdict(info), variants=variants, verdict=verdict, full_size=full_size,
        machine="; ".join(sorted({run.machine for run in runs if run.machine})) or probe().line(),
        date=max((run.date for run in runs if run.date), default=today()),
        command=command)
    write_outputs(result, output / name)
    return result


def _training_config(variant: Variant, seed: int, settings: ExperimentSettings | SegmentationSettings,
                     folder: Path = Path()) -> TrainConfig:
    """What ``xception train`` (or ``segment train``) would be given for this run: the variant's recipe (compact,
    or camvid) plus its options and training fields (crop size, output stride)."""
    return TrainConfig(task=get_recipe(variant.recipe).task, data=settings.data, recipe=variant.recipe,
                       model=variant.model, model_options=dict(variant.options), epochs=settings.epochs,
                       batch_size=settings.batch_size, output=folder, resume=True, seed=seed, workers=settings.workers,
                       train_subset=settings.train_subset, val_subset=settings.val_subset,
                       progress=settings.progress, **variant.train)


def _run_folder(variant: Variant, seed: int, settings: ExperimentSettings | SegmentationSettings,
                output: Path) -> Path:
    """``output/runs/<key>-<digest>/seed<k>``: the digest covers everything that changes the run (the resolved
    recipe included, so a finished run is never reused once the recipe has changed)."""
    config = _training_config(variant, seed, settings)
    recipe = {k: v for k, v in asdict(config.resolved_recipe()).items() if k != "source"}
    data = settings.data if settings.data == "fashion-mnist" else str(Path(settings.data).resolve())
    identity = {"recipe": recipe, "options": config.model_options, "data": data,
                "train_subset": settings.train_subset, "val_subset": settings.val_subset}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return output / "runs" / f"{variant.key}-{digest}" / f"seed{seed}"


def _train_variant(variant: Variant, seed: int, settings: ExperimentSettings | SegmentationSettings, output: Path, *,
                   report: Callable[[str], None] | None = None, tag: str = "", score: str = "top1") -> RunResult:
    """One run through :func:`xception.training.train`, measured by its history's ``val_<score>``; a finished run
    is read back, an interrupted one resumed."""
    folder = _run_folder(variant, seed, settings, output)
    record = folder / "experiment-run.json"
    if record.exists():
        return RunResult(**json.loads(record.read_text()))
    resumed = (folder / "last.safetensors").exists()
    started = time.monotonic()
    result = train(_training_config(variant, seed, settings, folder))
    seconds = time.monotonic() - started
    history = result["history"]
    if not history:
        raise RuntimeError(f"the run in {folder} stopped ({result['stopped']}) before its first evaluation")
    run = RunResult(
        seed=seed, output=str(folder), final_top1=history[-1][f"val_{score}"], best_top1=result[f"best_{score}"],
        steps=result["steps"], seconds=None if resumed else round(seconds, 2),
        steps_per_s=None if resumed else round(result["steps"] / seconds, 3),
        curve=[[r["step"], r[f"val_{score}"]] for r in history],
        loss=[[record["step"], record["train_loss"]] for record in result["steps_log"]],
        date=today(), machine=probe().line())
    if result["stopped"] == "finished":
        write_text_atomic(record, json.dumps(asdict(run), indent=2))
    if report:
        speed = f", {run.steps_per_s:.2f} steps/s" if run.steps_per_s else ""
        report(f"[{tag}] {variant.label}, seed {seed}: {SCORE_NAMES[score]} {run.final_top1:.4f} after {run.steps} "
               f"steps{speed}")
    return run


def _measure_full_size(settings: ExperimentSettings, output: Path,
                       report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The paper's Table 3 on this machine: parameters and training steps/s of Xception and torchvision's
    Inception V3 at 299x299 with 1000 classes, timed interleaved (:func:`xception.benchmark.compare`). Kept in
    ``output/runs`` so that regenerating the report does not time them again."""
    from .. import benchmark

    config = benchmark.BenchmarkConfig(model="xception", batch_size=settings.benchmark_batch_size, img_size=299,
                                       mode="train", channels_last=True, warmup=1,
                                       repeats=settings.benchmark_repeats, iterations=1)
    path = output / "runs" / f"full-size-b{config.batch_size}-r{config.repeats}.json"
    if path.exists():
        return json.loads(path.read_text())
    results = benchmark.compare(config, peers=("inception_v3",))
    rows = [{"network": r.candidate, "params": r.params, "skipped": r.skipped,
             "steps_per_s": r.images_per_s / config.batch_size if r.images_per_s else None} for r in results]
    ours, theirs = rows
    ratio = ours["steps_per_s"] / theirs["steps_per_s"] if ours["steps_per_s"] and theirs["steps_per_s"] else None
    measured = {"batch_size": config.batch_size, "img_size": 299, "repeats": config.repeats,
                "threads": torch.get_num_threads(), "rows": rows, "speed_ratio": ratio, "paper": PAPER_TABLE3}
    write_text_atomic(path, json.dumps(measured, indent=2))
    if report:
        report("[inception] full size: " + ", ".join(
            f"{row['network']} {row['steps_per_s']:.3f} steps/s" if row["steps_per_s"] else
            f"{row['network']} skipped ({row['skipped']})" for row in rows))
    return measured

