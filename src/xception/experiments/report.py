"""The outputs: each experiment's figure, tables and JSON in ``OUTPUT/NAME/``, and ``paper-reproduction.md``, the
report that gathers them with a summary of the verdicts."""

from __future__ import annotations

import json
import shutil
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import save_figure, write_text_atomic
from ..training.recipes import get_recipe
from .definitions import EXPERIMENT_NAMES, EXPERIMENTS, FULL, RECIPE, plural
from .verdicts import SCORE_NAMES, ExperimentResult, percent

# --- when and where runs trained -------------------------------------------------------------------

def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


# --- outputs ---------------------------------------------------------------------------------------

def write_outputs(result: ExperimentResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _plot_experiment(result, folder / "curves.png")
    write_text_atomic(folder / "results.md", _result_markdown(result, figure="curves.png"))
    write_text_atomic(folder / "results.json", result.to_json() + "\n")


def _score_name(result: ExperimentResult) -> str:
    return SCORE_NAMES[EXPERIMENTS[result.name].score]


def _results_table(result: ExperimentResult) -> str:
    seeds = result.settings["seeds"]
    notes = any(v.note for v in result.variants)
    lines = [f"| variant | parameters | final {_score_name(result)} (mean ± std, {plural(seeds, 'seed')}) | "
             f"steps/s |{' notes |' if notes else ''}",
             f"|---|---:|---:|---:|{'---|' if notes else ''}"]
    for v in result.variants:
        speed = f"{v.steps_per_s:.2f}" if v.steps_per_s else "-"
        row = f"| {v.label} | {v.params:,} | {100 * v.mean:.2f} ± {100 * v.std:.2f}% | {speed} |"
        lines.append(row + (f" {v.note} |" if notes else ""))
    return "\n".join(lines)


def _factor_table(result: ExperimentResult) -> str:
    """What each variant buys: its score's difference from the first variant (the baseline), and its cost."""
    baseline = result.variants[0]
    lines = [f"| variant | what changes | parameters | seeds | final {_score_name(result)} (mean ± std) | "
             "vs baseline | minutes per run |", "|---|---|---:|---:|---:|---:|---:|"]
    for v in result.variants:
        gap = "-" if v is baseline else f"{100 * (v.mean - baseline.mean):+.2f}"
        minutes = f"{v.minutes_per_run:.2f}" if v.minutes_per_run else "-"
        lines.append(f"| {v.label} | {v.note} | {v.params:,} | {len(v.runs)} | {100 * v.mean:.2f} ± "
                     f"{100 * v.std:.2f}% | {gap} | {minutes} |")
    return "\n".join(lines)


# The table of an experiment whose variants are factors measured against a baseline, rather than rivals.
_TABLES = {"decoder": _factor_table}


def _full_size_table(full_size: dict[str, Any]) -> str:
    lines = [f"| network (299x299, 1000 classes) | parameters | training steps/s (batch {full_size['batch_size']}, "
             "this CPU) | paper: parameters | paper: steps/s (60 K80) |", "|---|---:|---:|---:|---:|"]
    names = {"xception": "Xception (this library)", "inception_v3": "Inception V3 (torchvision, no aux. tower)"}
    for row, (paper, name) in zip(full_size["rows"], names.items(), strict=True):
        speed = f"{row['steps_per_s']:.3f}" if row["steps_per_s"] else f"skipped: {row['skipped']}"
        params = f"{row['params']:,}" if row["params"] else "-"
        reference = full_size["paper"][paper]
        lines.append(f"| {name} | {params} | {speed} | {reference['params']:,} | {reference['steps_per_s']} |")
    return "\n".join(lines)


def _result_markdown(result: ExperimentResult, figure: str, level: int = 1) -> str:
    """One experiment: the claim, the figure, the tables, the verdict and its caveats."""
    settings = result.settings
    subset = (f"{result.data['train_images']:,} training images, {result.data['val_images']:,} validation images, "
              f"{plural(settings['epochs'], 'epoch')}, {plural(settings['seeds'], 'seed')}")
    parts = [f"{'#' * level} {result.title} ({result.paper})", "",
             f"**The paper:** {result.claim}", "",
             f"Setting: {subset}; `{result.command}`, {result.date}.", "",
             f"![{result.title}]({figure})", "", _TABLES.get(result.name, _results_table)(result), ""]
    if result.full_size:
        parts += [_full_size_table(result.full_size), ""]
    parts += [f"**Verdict: {result.verdict.outcome}.** {result.verdict.text}", "",
              f"*Caveats:* {result.verdict.caveats}", ""]
    return "\n".join(parts)


def _plot_experiment(result: ExperimentResult, path: Path) -> None:
    """The paper's kind of figure: the validation score (top-1, or mIoU) against the training step, one colour per
    variant, the mean over seeds as a line and their min-max as a band; training loss beside it, where convergence
    shows best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab10")
    for index, variant in enumerate(result.variants):
        colour = colours(index % 10)
        for axis, curves in ((accuracy_axis, [run.curve for run in variant.runs]),
                             (loss_axis, [run.loss for run in variant.runs])):
            length = min(len(curve) for curve in curves)
            if length == 0:
                continue
            steps = [curves[0][i][0] for i in range(length)]
            values = [[curve[i][1] for curve in curves] for i in range(length)]
            axis.plot(steps, [statistics.fmean(v) for v in values], color=colour, marker="o" if length < 30 else None,
                      markersize=3, label=f"{variant.label} ({percent(variant.mean)})")
            if len(curves) > 1:
                axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)
    seeds = result.settings["seeds"]
    fewest = min(len(variant.runs) for variant in result.variants)  # the decoder's factors train fewer seeds
    band = f"mean and min-max of {seeds} seeds" if seeds > 1 else "one seed"
    if 1 < fewest < seeds:
        band = f"mean and min-max of {fewest}-{seeds} seeds"
    elif fewest == 1 < seeds:
        band = f"mean and min-max of up to {seeds} seeds"
    accuracy_axis.set(xlabel="training step", ylabel=_score_name(result).replace("val ", "validation "),
                      title=f"{result.title} ({band})")
    loss_axis.set(xlabel="training step", ylabel="training loss", title="Training loss (running mean per epoch)")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
        else:  # train logs the loss every 20 steps
            axis.text(0.5, 0.5, "no records: runs shorter than 20 steps", ha="center", transform=axis.transAxes)
    accuracy_axis.title.set_fontsize(10)
    figure.tight_layout()
    save_figure(figure, path)


# --- the report ------------------------------------------------------------------------------------

REPORT_NAME = "paper-reproduction.md"


def write_report(results_dir: str | Path, docs_dir: str | Path) -> Path:
    """``docs_dir/paper-reproduction.md`` from the experiments found in ``results_dir`` (their ``results.json``),
    with their figures copied to ``docs_dir/figures/``. Returns the report's path."""
    results_dir, docs_dir = Path(results_dir), Path(docs_dir)
    results = [ExperimentResult.from_json((results_dir / name / "results.json").read_text())
               for name in EXPERIMENT_NAMES if (results_dir / name / "results.json").exists()]
    if not results:
        raise FileNotFoundError(f"no experiment results in {results_dir}: run `xception experiment all` first")
    figures = docs_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for result in results:
        shutil.copyfile(results_dir / result.name / "curves.png", figures / f"{result.name}.png")
    path = docs_dir / REPORT_NAME
    write_text_atomic(path, _render_report(results, docs_dir))
    return path


def _render_report(results: list[ExperimentResult], docs_dir: str | Path = "docs") -> str:
    """The report's markdown: what was run where, a summary of the verdicts, then each experiment in full."""
    first = results[0]
    quick = any(r.settings["quick"] for r in results)
    commands = sorted({r.command for r in results})
    machines = sorted({r.machine for r in results})
    unique_runs = {run.output: run.seconds for r in results for v in r.variants for run in v.runs}
    minutes = sum(seconds for seconds in unique_runs.values() if seconds) / 60
    lines = ["# Reproducing the paper's claims at small scale", ""]
    if quick:
        settings, data = first.settings, first.data
        lines += [f"> **This is a quick run, not the reproduction:** {plural(settings['seeds'], 'seed')}, "
                  f"{data['train_images']:,} of {data['train_available']:,} training images, "
                  f"{plural(settings['epochs'], 'epoch')}. It shows that the pipeline runs end to end and what its "
                  f"outputs look like; its verdicts are not evidence. The full run ({plural(FULL.seeds, 'seed')}, "
                  f"{plural(FULL.epochs, 'epoch')} on all the data) is `xception experiment all --docs {docs_dir}` "
                  "and has not been recorded yet.", ""]
    lines += [f"Generated by `{'`, `'.join(commands)}` on {max(r.date for r in results)}, on {'; '.join(machines)}: "
              f"{minutes:.1f} minutes of training over {len(unique_runs)} runs (a variant shared by several "
              "experiments trains once).", "",
              f"To regenerate, add `--docs {docs_dir}` to the command: it writes this file and its figures "
              f"(`{docs_dir}/figures/`). Finished runs in the output folder (default `runs/experiments`) are reused, "
              "so where they exist this only re-renders. Every number is in the output folder's "
              "`NAME/results.json`.", "",
              "Verdicts are computed from the numbers: a difference counts only when it exceeds the noise, the larger "
              "of the two variants' seed standard deviations and the validation set's sampling error.", "",
              "| experiment | paper | verdict |", "|---|---|---|"]
    for r in results:
        lines.append(f"| [{r.title}](#{_anchor(r.title, r.paper)}) | {r.paper} | {r.verdict.outcome} |")
    lines.append("")
    estimate = _full_run_estimate(results) if quick else None
    if estimate:
        lines += [f"The full run, estimated from the speeds measured here (machine and threads above): {estimate}", ""]
    for r in results:
        lines.append(_result_markdown(r, figure=f"figures/{r.name}.png", level=2))
    return "\n".join(lines)


def _anchor(title: str, paper: str) -> str:
    """GitHub's anchor for the heading ``title (paper)``."""
    text = f"{title} ({paper})".lower()
    return "".join(c for c in text.replace(" ", "-") if c.isalnum() or c in "-_")


def _full_run_estimate(results: list[ExperimentResult]) -> str | None:
    """Hours the full settings would take, from each variant's measured steps/s (evaluation is in them)."""
    full = FULL
    variants: dict[tuple[str, str], float | None] = {}  # shared variants count once
    for r in results:
        for v in r.variants:
            variants.setdefault((v.key, json.dumps(v.options, sort_keys=True, default=str)), v.steps_per_s)
    if not variants or not all(variants.values()):
        return None
    train_images = results[0].data["train_available"]
    batch = full.batch_size or get_recipe(RECIPE).batch_size
    steps = train_images // batch * full.epochs * full.seeds
    seconds = sum(steps / speed for speed in variants.values())
    return (f"{len(variants)} distinct variants x {full.seeds} seeds x {full.epochs} epochs of "
            f"{train_images // batch} steps = about {seconds / 3600:.1f} hours of training, plus the full-size timing.")
