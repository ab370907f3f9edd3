"""The paper's claims, tested at small scale: ``xception experiment NAME``.

Chollet (2017) supports its design with experiments few readers can rerun (ImageNet and JFT, 60 K80 GPUs). Each
experiment here asks one of its questions of the compact recipe's network (a narrow Xception for 28-32 px images)
on Fashion-MNIST or any ImageNet-layout folder, in minutes to hours on a CPU:

- ``activation``: no activation, ReLU or ELU between depthwise and pointwise (Figure 10: none is best);
- ``residual``: with and without residual connections (Figure 9: residuals help);
- ``spectrum``: 1, 4, 16 segments or one per channel in every separable convolution, widths adjusted so that
  the parameter count stays within a few percent (the paper's open question: the intermediate points);
- ``order``: depthwise-first against pointwise-first separable convolutions (section 3: little difference);
- ``inception``: Xception against an Inception-V3-style network at the same parameter count (Table 1), and
  torchvision's Inception V3 against Xception at full size for parameters and training speed (Table 3).

Every variant is trained with several seeds by :func:`xception.train.train`, the code behind ``xception train``,
with the compact recipe unchanged except for the variant's architecture options. An experiment writes, in
``OUTPUT/NAME/``: ``curves.png`` (validation top-1 and training loss against the step, mean over seeds and their
min-max band), ``results.md`` (parameters, final top-1 mean ± std, steps/s) and ``results.json`` (every number).
Its verdict is computed from the numbers: a gap between two variants counts only when it exceeds the noise (the
larger of their seed standard deviations and the validation set's sampling error).

Runs live in ``OUTPUT/runs/<variant>-<digest>/seed<k>``, the digest covering everything that changes the run, so
variants shared between experiments (the compact Xception is the baseline of all five) train once, a finished run
is reused and an interrupted one resumes. :func:`write_report` turns the results into ``docs/paper-reproduction.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .data import ImageDataset, load_fashion_mnist
from .recipes import get_recipe
from .registry import create_model
from .train import TrainConfig, train

EXPERIMENT_NAMES = ("activation", "residual", "spectrum", "order", "inception")
RECIPE = "compact"
SPECTRUM_SEGMENTS = (1, 4, 16, None)  # None: one segment per channel, a depthwise convolution (Xception)
BASELINE_KEY = "xception"
INCEPTION_MODEL = "inception_v3_compact"
# The paper's Table 3 (60 K80 GPUs, synchronous SGD); Inception V3's count is without the auxiliary tower.
PAPER_TABLE3 = {"xception": {"params": 22_855_952, "steps_per_s": 28},
                "inception_v3": {"params": 23_626_728, "steps_per_s": 31}}


# --- settings and data -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExperimentSettings:
    """How much to train. The defaults are the full run; :data:`QUICK` is the ``--quick`` one."""

    data: str = "fashion-mnist"  # or an ImageNet-layout folder (train/<class>/*, val/<class>/*)
    seeds: int = 3  # runs per variant, seeds 0..seeds-1
    epochs: int = 3  # the compact recipe's cosine schedule is fitted to this many epochs
    train_subset: int | None = None  # first N training images only
    val_subset: int | None = None  # first N validation images only
    batch_size: int | None = None  # None: the compact recipe's (128)
    quick: bool = False  # labels the results as a smoke test rather than evidence
    benchmark: bool = True  # inception: time the full-size networks (Table 3)
    benchmark_batch_size: int = 8
    benchmark_repeats: int = 3
    workers: int = 0
    progress: bool = False  # training progress bars

    def __post_init__(self) -> None:
        for name in ("seeds", "epochs", "benchmark_batch_size", "benchmark_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_subset", "val_subset", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}")


FULL = ExperimentSettings()
QUICK = ExperimentSettings(seeds=1, epochs=3, train_subset=6000, val_subset=2000, quick=True, benchmark_repeats=2)


def make_settings(*, quick: bool = False, data: str = "fashion-mnist", seeds: int | None = None,
                  epochs: int | None = None) -> ExperimentSettings:
    """The full or quick preset with the command line's choices on top (an explicit ``seeds`` wins over
    ``--quick``'s one seed)."""
    preset = QUICK if quick else FULL
    return replace(preset, data=data, seeds=seeds or preset.seeds, epochs=epochs or preset.epochs)


@dataclass(frozen=True)
class DataInfo:
    """What the variants are built for, and how many images the runs really use."""

    data: str
    num_classes: int
    in_chans: int
    train_images: int  # used: after the subset
    val_images: int
    train_available: int
    val_available: int


def describe_data(settings: ExperimentSettings) -> DataInfo:
    """Check the data before anything trains: an experiment of hours must not fail at its tenth run."""
    if settings.data == "fashion-mnist":
        train_available = len(load_fashion_mnist("train")[1])
        val_available = len(load_fashion_mnist("test")[1])
        num_classes, in_chans = 10, 1
    else:
        root = Path(settings.data)
        train_set = ImageDataset.from_folder(root, "train", None)
        val_set = ImageDataset.from_folder(root, "val", None, classes=train_set.classes)
        train_available, val_available = len(train_set), len(val_set)
        num_classes, in_chans = len(train_set.classes), train_set.in_chans
    train_images = min(train_available, settings.train_subset or train_available)
    val_images = min(val_available, settings.val_subset or val_available)
    batch_size = settings.batch_size or get_recipe(RECIPE).batch_size
    if train_images < batch_size:
        subset = f" (a subset of {settings.train_subset} requested)" if settings.train_subset else ""
        raise ValueError(f"{settings.data} is too small for the experiments: its training split gives {train_images} "
                         f"images{subset}, fewer than one batch of {batch_size}; every variant needs at least one "
                         f"full batch per epoch (and many more for results worth reading)")
    if num_classes < 2:
        raise ValueError(f"{settings.data} has {num_classes} class: the experiments compare classification accuracy "
                         "and need at least 2 classes")
    return DataInfo(settings.data, num_classes, in_chans, train_images, val_images, train_available, val_available)


# --- variants --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One architecture of an experiment: ``create_model`` options on top of the compact recipe's."""

    key: str  # names its runs' folder: variants with the same key and options share runs across experiments
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: the recipe's (xception); another model starts from no recipe options
    note: str = ""


def model_options(variant: Variant) -> tuple[str, dict[str, Any]]:
    """The model name and full options ``train`` builds the variant with (as it merges them)."""
    recipe = TrainConfig(recipe=RECIPE, model=variant.model).resolved_recipe()
    return recipe.model, {**recipe.model_options, **variant.options}


def parameter_count(variant: Variant, info: DataInfo) -> int:
    model, options = model_options(variant)
    return sum(p.numel() for p in create_model(model, num_classes=info.num_classes, in_chans=info.in_chans,
                                               **options).parameters())


def baseline(label: str) -> Variant:
    return Variant(BASELINE_KEY, label)


def activation_variants(info: DataInfo) -> list[Variant]:
    return [baseline("none (Xception)"), Variant("mid-relu", "ReLU", {"mid_activation": "relu"}),
            Variant("mid-elu", "ELU", {"mid_activation": "elu"})]


def residual_variants(info: DataInfo) -> list[Variant]:
    return [baseline("residual (Xception)"), Variant("no-residual", "no residual", {"residual": False})]


def order_variants(info: DataInfo) -> list[Variant]:
    return [baseline("depthwise first (Xception)"),
            Variant("pointwise-first", "pointwise first", {"order": "pointwise_first"})]


def spectrum_variants(info: DataInfo) -> list[Variant]:
    """Segment counts from a regular convolution (1) to a depthwise one, each at the baseline's parameter count."""
    target = parameter_count(baseline(""), info)
    variants = []
    for segments in SPECTRUM_SEGMENTS:
        if segments is None:
            variants.append(baseline("depthwise (Xception)"))
            continue
        options = spectrum_options(segments, target, info)
        widths = ", ".join(f"{name.split('_')[0]} {options[name]}"
                           for name in ("entry_widths", "exit_widths", "tail_widths"))
        variants.append(Variant(f"segments-{segments}", plural(segments, "segment"), options, note=f"widths: {widths}"))
    return variants


def spectrum_options(segments: int, target: int, info: DataInfo) -> dict[str, Any]:
    """Widths for ``segments`` segments per spatial convolution at about ``target`` parameters.

    Fewer segments make each spatial convolution denser (1 segment: a regular 3x3 convolution, 9 x C^2 weights
    instead of 9 x C), so every width of the separable part is scaled by one factor and rounded to a multiple of
    ``segments`` (each convolution's input must split evenly); the last width, which feeds only the classifier,
    is then set to close the remaining gap. The stem, a regular convolution in every variant, keeps its widths.
    """
    base = get_recipe(RECIPE).model_options
    if base["stem_widths"][1] % segments:
        raise ValueError(f"{segments} segments do not divide the stem's {base['stem_widths'][1]} output channels")

    def scaled(factor: float, last: int | None = None) -> dict[str, Any]:
        def fit(width: int) -> int:
            return max(segments, round(width * factor / segments) * segments)

        tail_last = max(1, round(base["tail_widths"][1] * factor)) if last is None else last
        return {"segments": segments, "entry_widths": tuple(fit(w) for w in base["entry_widths"]),
                "exit_widths": tuple(fit(w) for w in base["exit_widths"]),
                "tail_widths": (fit(base["tail_widths"][0]), tail_last)}

    def count(options: dict[str, Any]) -> int:
        return parameter_count(Variant("probe", "", options), info)

    factor = fit_monotone(lambda f: count(scaled(f)), target, 0.05, 4.0)
    options = scaled(factor)
    # Parameters grow linearly with the last width: solve for it, keeping it within a factor 2 of its scaled value.
    last = options["tail_widths"][1]
    at_last = count(options)
    slope = count(scaled(factor, last + 1)) - at_last
    solved = last + round((target - at_last) / slope) if slope else last
    if last / 2 <= solved <= last * 2:
        options = scaled(factor, max(1, solved))
    return options


def inception_variants(info: DataInfo) -> list[Variant]:
    """The compact Xception and the Inception-V3-style network, its width fitted to the same parameter count."""
    target = parameter_count(baseline(""), info)

    def count(width: float) -> int:
        return parameter_count(Variant("probe", "", {"width": width}, model=INCEPTION_MODEL), info)

    width = round(fit_monotone(count, target, 0.01, 2.0), 4)
    return [baseline("Xception (compact)"),
            Variant("inception-v3-compact", "Inception V3 style", {"width": width}, model=INCEPTION_MODEL,
                    note=f"{INCEPTION_MODEL}, width {width}")]


def fit_monotone(count: Callable[[float], int], target: int, low: float, high: float, steps: int = 30) -> float:
    """The factor in [low, high] whose (non-decreasing, stepwise) count is closest to ``target``, by bisection."""
    for _ in range(steps):
        middle = (low + high) / 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda factor: abs(count(factor) - target))


# --- results ---------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One training run (one variant, one seed)."""

    seed: int
    output: str
    final_top1: float  # validation top-1 after the last epoch (EMA weights, as train evaluates)
    best_top1: float
    steps: int
    seconds: float | None  # wall time of the run; None when it resumed an interrupted one
    steps_per_s: float | None  # optimizer steps per second, per-epoch evaluation included
    curve: list[list[float]]  # [step, validation top-1] after each epoch
    loss: list[list[float]]  # [step, training loss] every 20 steps (running mean within the epoch)
    date: str = ""  # when and where it trained: a report regenerated elsewhere still says so
    machine: str = ""


@dataclass
class VariantResult:
    key: str
    label: str
    model: str
    options: dict[str, Any]
    params: int
    note: str
    runs: list[RunResult]

    @property
    def finals(self) -> list[float]:
        return [run.final_top1 for run in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds; 0 with one seed (no spread measured)."""
        return statistics.stdev(self.finals) if len(self.finals) > 1 else 0.0

    @property
    def steps_per_s(self) -> float | None:
        measured = [run.steps_per_s for run in self.runs if run.steps_per_s]
        return statistics.fmean(measured) if measured else None


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "held", "not held", "inconclusive", or "finding" (the spectrum, an open question)
    text: str
    caveats: str


@dataclass
class ExperimentResult:
    name: str
    title: str
    paper: str  # where the paper makes the claim
    claim: str
    settings: dict[str, Any]
    data: dict[str, Any]
    variants: list[VariantResult]
    verdict: Verdict
    full_size: dict[str, Any] | None  # inception: the Table 3 measurement
    machine: str
    date: str
    command: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ExperimentResult:
        raw = json.loads(text)
        variants = [VariantResult(**{**v, "runs": [RunResult(**run) for run in v["runs"]]}) for v in raw["variants"]]
        return cls(**{**raw, "variants": variants, "verdict": Verdict(**raw["verdict"])})

    def summary_line(self) -> str:
        return f"{self.name} ({self.paper}): {self.verdict.outcome}: {self.verdict.text}"


# --- verdicts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gap:
    """``better``'s mean final top-1 minus ``worse``'s, and the noise it has to exceed to count."""

    better: VariantResult
    worse: VariantResult
    gap: float
    noise: float

    @classmethod
    def between(cls, a: VariantResult, b: VariantResult, val_images: int) -> Gap:
        better, worse = (a, b) if a.mean >= b.mean else (b, a)
        return cls(better, worse, better.mean - worse.mean, noise_level(a, b, val_images))

    @property
    def significant(self) -> bool:
        return self.gap > self.noise

    def describe(self) -> str:
        return f"a gap of {100 * self.gap:.2f} points against a noise level of {100 * self.noise:.2f}"


def noise_level(a: VariantResult, b: VariantResult, val_images: int) -> float:
    """The larger of the two seed standard deviations and the standard error of a difference of two accuracies
    on ``val_images`` images. With one seed only the latter is known, and seed-to-seed noise is not counted."""
    sampling = math.sqrt(sum(v.mean * (1 - v.mean) for v in (a, b)) / max(val_images, 1))
    return max(a.std, b.std, sampling)


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def judge_best(variants: list[VariantResult], expected_key: str, val_images: int) -> tuple[str, str]:
    """Whether the variant the paper favours ends best, beyond the noise."""
    ranking = sorted(variants, key=lambda v: v.mean, reverse=True)
    expected = next(v for v in variants if v.key == expected_key)
    if ranking[0] is expected:
        gap = Gap.between(expected, ranking[1], val_images)
        scores = f"{percent(expected.mean)} against {percent(gap.worse.mean)} for the next best ({gap.worse.label})"
        if gap.significant:
            return "held", f"{capitalised(expected.label)} ends best: {scores}, {gap.describe()}."
        return "inconclusive", (f"{capitalised(expected.label)} has the best mean, {scores}, but {gap.describe()}: "
                                "within the noise.")
    gap = Gap.between(ranking[0], expected, val_images)
    best = capitalised(gap.better.label)
    if gap.significant:
        return "not held", (f"{best} beats {expected.label}: {percent(gap.better.mean)} against "
                            f"{percent(expected.mean)}, {gap.describe()}.")
    return "inconclusive", (f"{best} has the best mean, {percent(gap.better.mean)} against {percent(expected.mean)} "
                            f"for {expected.label}, but {gap.describe()}: within the noise.")


def judge_activation(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    outcome, text = judge_best(variants, BASELINE_KEY, val_images)
    relu, elu = (next(v for v in variants if v.key == key) for key in ("mid-relu", "mid-elu"))
    gap = Gap.between(elu, relu, val_images)
    where = "beyond" if gap.significant else "within"
    return outcome, (f"{text} Between the activations, {gap.better.label} ends above {gap.worse.label} by "
                     f"{100 * gap.gap:.2f} points, {where} the noise (the paper: ELU above ReLU).")


def judge_residual(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    outcome, text = judge_best(variants, BASELINE_KEY, val_images)
    with_skip, without = (next(v for v in variants if v.key == key) for key in (BASELINE_KEY, "no-residual"))
    first = [statistics.fmean(run.curve[0][1] for run in v.runs) for v in (with_skip, without)]
    step = int(with_skip.runs[0].curve[0][0])
    return outcome, (f"{text} Convergence: at the first evaluation (step {step}) {percent(first[0])} with residuals "
                     f"against {percent(first[1])} without (the paper: faster and higher with residuals).")


def judge_order(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    """The paper expects little difference: the claim holds when the gap stays within the noise."""
    first, second = sorted(variants, key=lambda v: v.mean, reverse=True)[:2]
    gap = Gap.between(first, second, val_images)
    if gap.significant:
        return "not held", (f"{capitalised(first.label)} ends above {second.label}: {percent(first.mean)} against "
                            f"{percent(second.mean)}, {gap.describe()}: a difference beyond the noise.")
    return "held", (f"The two orders end within the noise of each other: {first.label} {percent(first.mean)}, "
                    f"{second.label} {percent(second.mean)}, {gap.describe()}.")


def judge_spectrum(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    """The paper leaves the intermediate points open: report where the best lies and what is within its noise."""
    ranking = sorted(variants, key=lambda v: v.mean, reverse=True)
    best = ranking[0]
    tied = [v for v in ranking[1:] if not Gap.between(best, v, val_images).significant]
    depthwise = next(v for v in variants if v.key == BASELINE_KEY)
    order = " > ".join(f"{v.label} {percent(v.mean)}" for v in ranking)
    if tied:
        text = f"Best: {best.label}; within its noise: {', '.join(v.label for v in tied)}. Ranking by mean: {order}."
    else:
        text = f"Best: {best.label}, above every other segment count beyond the noise. Ranking by mean: {order}."
    if depthwise is best:
        text += " The depthwise end (Xception's choice) is the best point measured."
    elif depthwise in tied:
        text += " The depthwise end (Xception's choice) is within the noise of the best."
    else:
        text += " The depthwise end (Xception's choice) is below the best beyond the noise."
    return "finding", text


def judge_inception(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    outcome, text = judge_best(variants, BASELINE_KEY, val_images)
    if full_size and full_size.get("speed_ratio"):
        ours, theirs = full_size["rows"]
        text += (f" At full size (299 px, 1000 classes, training steps at batch {full_size['batch_size']} on this "
                 f"CPU): Xception {ours['params']:,} parameters and {ours['steps_per_s']:.3f} steps/s, Inception V3 "
                 f"{theirs['params']:,} and {theirs['steps_per_s']:.3f}: Xception trains at "
                 f"{full_size['speed_ratio']:.2f}x Inception V3's speed (the paper, on 60 K80 GPUs: 28/31 = 0.90x).")
    return outcome, text


CAVEATS = {
    "activation": "The compact network has one middle-flow module where the paper's has eight, so fewer intermediate "
                  "activations are at stake.",
    "residual": "The compact network is about a third as deep as the paper's (13 separable convolutions against 34), "
                "and residual connections matter most in deep networks: a smaller effect is expected.",
    "spectrum": "Keeping the parameter count fixed changes the widths (listed in the table) along with the segments, "
                "and one segment count applies to every separable convolution; the paper only describes the "
                "spectrum and never trained its intermediate points.",
    "order": "With BatchNorm after every separable convolution and no activation between its two halves, the orders "
             "differ mainly at block boundaries, which is the paper's own argument for expecting little difference. "
             "Pointwise first has 1.4% more parameters (its depthwise filters run on a layer's output channels, which "
             "outnumber the input channels where a layer widens the network); the widths are not rematched.",
    "inception": "The Inception network here is this project's width-scaled design (Inception V3's module types, 1-2-1 "
                 "modules), not Inception V3; both train with the compact recipe, tuned for Xception, whereas the "
                 "paper tuned its recipe for Inception V3. The full-size speeds come from a few training steps at "
                 "batch 8 on this CPU, not from 60 K80 GPUs.",
}


def scale_caveat(settings: ExperimentSettings, info: DataInfo, params: int) -> str:
    data = "Fashion-MNIST (28x28 grayscale)" if info.data == "fashion-mnist" else f"the folder {info.data}"
    text = (f"Small scale: {data}, {info.train_images:,} training and {info.val_images:,} validation images, a network "
            f"of about {params:,} parameters trained for {plural(settings.epochs, 'epoch')} with "
            f"{plural(settings.seeds, 'seed')}; the "
            "paper trained the full network on ImageNet for about 100 epochs on 60 GPUs, and a result here need not "
            "carry over.")
    if settings.seeds == 1:
        text += " One seed: the noise level is only the validation set's sampling error, seed-to-seed noise is unknown."
    if settings.quick:
        text += " Quick run: a subset and a few hundred steps, a smoke test of the pipeline rather than evidence."
    return text


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    paper: str
    claim: str
    variants: Callable[[DataInfo], list[Variant]]
    judge: Callable[[list[VariantResult], int, dict | None], tuple[str, str]]


EXPERIMENTS: dict[str, Experiment] = {
    "activation": Experiment(
        "activation", "Activation between depthwise and pointwise", "Figure 10",
        "No intermediate activation converges faster and ends better than ELU, which beats ReLU.",
        activation_variants, judge_activation),
    "residual": Experiment(
        "residual", "Residual connections", "Figure 9",
        "Residual connections speed up convergence and improve the final accuracy.",
        residual_variants, judge_residual),
    "spectrum": Experiment(
        "spectrum", "The Inception spectrum: segments per spatial convolution", "Section 2, an open question",
        "Between a regular convolution (1 segment) and a depthwise one (1 segment per channel) lie intermediate "
        "points; the paper leaves their merit to future work.",
        spectrum_variants, judge_spectrum),
    "order": Experiment(
        "order", "Order of the depthwise and pointwise operations", "Section 3",
        "Depthwise-first and pointwise-first separable convolutions perform about the same in a stacked network.",
        order_variants, judge_order),
    "inception": Experiment(
        "inception", "Xception against Inception V3", "Tables 1 and 3",
        "At about the same number of parameters Xception is more accurate than Inception V3 (Table 1) and trains a "
        "little more slowly (Table 3: 28 against 31 steps/s).",
        inception_variants, judge_inception),
}


def command_line(name: str, settings: ExperimentSettings, output: str | Path = "runs/experiments") -> str:
    """The ``xception experiment`` command that runs ``name`` with ``settings``, for the outputs to quote."""
    preset = QUICK if settings.quick else FULL
    parts = ["xception experiment", name, *(["--data", settings.data] if settings.data != FULL.data else []),
             *(["--quick"] if settings.quick else []),
             *(["--seeds", str(settings.seeds)] if settings.seeds != preset.seeds else []),
             *(["--epochs", str(settings.epochs)] if settings.epochs != preset.epochs else []),
             *(["--output", str(output)] if Path(output) != Path("runs/experiments") else [])]
    hidden = replace(settings, data=preset.data, seeds=preset.seeds, epochs=preset.epochs, progress=preset.progress)
    return " ".join(parts) + ("" if hidden == preset else " (other settings through the Python API)")


def list_experiments() -> list[str]:
    """Valid names for ``xception experiment``: the five experiments and ``all``."""
    return [*EXPERIMENT_NAMES, "all"]


def resolve_names(name: str) -> list[str]:
    if name == "all":
        return list(EXPERIMENT_NAMES)
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid experiments: {', '.join(list_experiments())}")
    return [name]


# --- running ---------------------------------------------------------------------------------------

def run_experiments(name: str, settings: ExperimentSettings = FULL, output: str | Path = "runs/experiments", *,
                    report: Callable[[str], None] | None = None) -> list[ExperimentResult]:
    """Run ``name`` (an experiment or ``all``) and write its outputs under ``output``; ``report`` receives one
    line per finished run. The name and the data are checked before anything trains."""
    names = resolve_names(name)
    info = describe_data(settings)
    command = command_line(name, settings, output)
    return [run_experiment(each, settings, output, info=info, command=command, report=report) for each in names]


def run_experiment(name: str, settings: ExperimentSettings, output: str | Path, *, info: DataInfo | None = None,
                   command: str | None = None, report: Callable[[str], None] | None = None) -> ExperimentResult:
    """Train every variant of one experiment with every seed, judge, and write ``output/name/``."""
    experiment = EXPERIMENTS[resolve_names(name)[0]]
    info = info or describe_data(settings)
    output = Path(output)
    variants = []
    for variant in experiment.variants(info):
        model, options = model_options(variant)
        runs = [train_variant(variant, seed, settings, output, report=report, tag=name)
                for seed in range(settings.seeds)]
        variants.append(VariantResult(variant.key, variant.label, model, options, parameter_count(variant, info),
                                      variant.note, runs))
    full_size = measure_full_size(settings, output, report) if name == "inception" and settings.benchmark else None
    outcome, text = experiment.judge(variants, info.val_images, full_size)
    if settings.seeds < 2 and outcome in ("held", "not held"):
        outcome += " (one seed: tentative)"
    caveats = f"{scale_caveat(settings, info, variants[0].params)} {CAVEATS[name]}"
    runs = [run for v in variants for run in v.runs]
    result = ExperimentResult(
        name=name, title=experiment.title, paper=experiment.paper, claim=experiment.claim, settings=asdict(settings),
        data=asdict(info), variants=variants, verdict=Verdict(outcome, text, caveats), full_size=full_size,
        machine="; ".join(sorted({run.machine for run in runs if run.machine})) or machine_description(),
        date=max((run.date for run in runs if run.date), default=today()),
        command=command or command_line(name, settings, output))
    write_outputs(result, output / name)
    return result


def training_config(variant: Variant, seed: int, settings: ExperimentSettings, folder: Path = Path()) -> TrainConfig:
    """What ``xception train`` would be given for this run: the compact recipe plus the variant's options."""
    return TrainConfig(data=settings.data, recipe=RECIPE, model=variant.model, model_options=dict(variant.options),
                       epochs=settings.epochs, batch_size=settings.batch_size, output=folder, resume=True, seed=seed,
                       workers=settings.workers, train_subset=settings.train_subset, val_subset=settings.val_subset,
                       progress=settings.progress)


def run_folder(variant: Variant, seed: int, settings: ExperimentSettings, output: Path) -> Path:
    """``output/runs/<key>-<digest>/seed<k>``: the digest covers everything that changes the run (the resolved
    recipe included, so a finished run is never reused once the recipe has changed)."""
    config = training_config(variant, seed, settings)
    recipe = {k: v for k, v in asdict(config.resolved_recipe()).items() if k != "source"}
    data = settings.data if settings.data == "fashion-mnist" else str(Path(settings.data).resolve())
    identity = {"recipe": recipe, "options": config.model_options, "data": data,
                "train_subset": settings.train_subset, "val_subset": settings.val_subset}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return output / "runs" / f"{variant.key}-{digest}" / f"seed{seed}"


def train_variant(variant: Variant, seed: int, settings: ExperimentSettings, output: Path, *,
                  report: Callable[[str], None] | None = None, tag: str = "") -> RunResult:
    """One run through :func:`xception.train.train`; a finished run is read back, an interrupted one resumed."""
    folder = run_folder(variant, seed, settings, output)
    record = folder / "experiment-run.json"
    if record.exists():
        return RunResult(**json.loads(record.read_text()))
    resumed = (folder / "last.safetensors").exists()
    started = time.monotonic()
    result = train(training_config(variant, seed, settings, folder))
    seconds = time.monotonic() - started
    history = result["history"]
    if not history:
        raise RuntimeError(f"the run in {folder} stopped ({result['stopped']}) before its first evaluation")
    run = RunResult(
        seed=seed, output=str(folder), final_top1=history[-1]["val_top1"], best_top1=result["best_top1"],
        steps=result["steps"], seconds=None if resumed else round(seconds, 2),
        steps_per_s=None if resumed else round(result["steps"] / seconds, 3),
        curve=[[r["step"], r["val_top1"]] for r in history], loss=read_loss_curve(folder / "metrics.jsonl"),
        date=today(), machine=machine_description())
    if result["stopped"] == "finished":
        record.write_text(json.dumps(asdict(run), indent=2))
    if report:
        speed = f", {run.steps_per_s:.2f} steps/s" if run.steps_per_s else ""
        report(f"[{tag}] {variant.label}, seed {seed}: val top-1 {run.final_top1:.4f} after {run.steps} steps{speed}")
    return run


def read_loss_curve(path: Path) -> list[list[float]]:
    """``[step, train_loss]`` from the step records of ``metrics.jsonl``; after a resume the later record of a
    step wins."""
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "lr" in record and "train_loss" in record:
            losses[record["step"]] = record["train_loss"]
    return [[step, losses[step]] for step in sorted(losses)]


def measure_full_size(settings: ExperimentSettings, output: Path,
                      report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The paper's Table 3 on this machine: parameters and training steps/s of Xception and torchvision's
    Inception V3 at 299x299 with 1000 classes, timed interleaved (:func:`xception.benchmark.compare`). Kept in
    ``output/runs`` so that regenerating the report does not time them again."""
    from . import benchmark

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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(measured, indent=2))
    if report:
        report("[inception] full size: " + ", ".join(
            f"{row['network']} {row['steps_per_s']:.3f} steps/s" if row["steps_per_s"] else
            f"{row['network']} skipped ({row['skipped']})" for row in rows))
    return measured


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def machine_description() -> str:
    """CPU model, cores, torch version and the threads torch uses: what the speeds depend on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__} with "
            f"{plural(torch.get_num_threads(), 'thread')}")


# --- outputs ---------------------------------------------------------------------------------------

def write_outputs(result: ExperimentResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plot_experiment(result, folder / "curves.png")
    (folder / "results.md").write_text(result_markdown(result, figure="curves.png"))
    (folder / "results.json").write_text(result.to_json() + "\n")


def results_table(result: ExperimentResult) -> str:
    seeds = result.settings["seeds"]
    notes = any(v.note for v in result.variants)
    lines = [f"| variant | parameters | final val top-1 (mean ± std, {plural(seeds, 'seed')}) | "
             f"steps/s |{' notes |' if notes else ''}",
             f"|---|---:|---:|---:|{'---|' if notes else ''}"]
    for v in result.variants:
        speed = f"{v.steps_per_s:.2f}" if v.steps_per_s else "-"
        row = f"| {v.label} | {v.params:,} | {100 * v.mean:.2f} ± {100 * v.std:.2f}% | {speed} |"
        lines.append(row + (f" {v.note} |" if notes else ""))
    return "\n".join(lines)


def full_size_table(full_size: dict[str, Any]) -> str:
    lines = [f"| network (299x299, 1000 classes) | parameters | training steps/s (batch {full_size['batch_size']}, "
             "this CPU) | paper: parameters | paper: steps/s (60 K80) |", "|---|---:|---:|---:|---:|"]
    names = {"xception": "Xception (this library)", "inception_v3": "Inception V3 (torchvision, no aux. tower)"}
    for row, (paper, name) in zip(full_size["rows"], names.items(), strict=True):
        speed = f"{row['steps_per_s']:.3f}" if row["steps_per_s"] else f"skipped: {row['skipped']}"
        params = f"{row['params']:,}" if row["params"] else "-"
        reference = full_size["paper"][paper]
        lines.append(f"| {name} | {params} | {speed} | {reference['params']:,} | {reference['steps_per_s']} |")
    return "\n".join(lines)


def result_markdown(result: ExperimentResult, figure: str, level: int = 1) -> str:
    """One experiment: the claim, the figure, the tables, the verdict and its caveats."""
    settings = result.settings
    subset = (f"{result.data['train_images']:,} training images, {result.data['val_images']:,} validation images, "
              f"{plural(settings['epochs'], 'epoch')}, {plural(settings['seeds'], 'seed')}")
    parts = [f"{'#' * level} {result.title} ({result.paper})", "",
             f"**The paper:** {result.claim}", "",
             f"Setting: {subset}; `{result.command}`, {result.date}.", "",
             f"![{result.title}]({figure})", "", results_table(result), ""]
    if result.full_size:
        parts += [full_size_table(result.full_size), ""]
    parts += [f"**Verdict: {result.verdict.outcome}.** {result.verdict.text}", "",
              f"*Caveats:* {result.verdict.caveats}", ""]
    return "\n".join(parts)


def plot_experiment(result: ExperimentResult, path: Path) -> None:
    """The paper's kind of figure: validation top-1 against the training step, one colour per variant, the mean
    over seeds as a line and their min-max as a band; training loss beside it, where convergence shows best."""
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
    band = f"mean and min-max of {seeds} seeds" if seeds > 1 else "one seed"
    accuracy_axis.set(xlabel="training step", ylabel="validation top-1", title=f"{result.title} ({band})")
    loss_axis.set(xlabel="training step", ylabel="training loss", title="Training loss (running mean per epoch)")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
        else:  # train logs the loss every 20 steps
            axis.text(0.5, 0.5, "no records: runs shorter than 20 steps", ha="center", transform=axis.transAxes)
    accuracy_axis.title.set_fontsize(10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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
    path.write_text(render_report(results, docs_dir))
    return path


def render_report(results: list[ExperimentResult], docs_dir: str | Path = "docs") -> str:
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
        lines.append(f"| [{r.title}](#{anchor(r.title, r.paper)}) | {r.paper} | {r.verdict.outcome} |")
    lines.append("")
    estimate = full_run_estimate(results) if quick else None
    if estimate:
        lines += [f"The full run, estimated from the speeds measured here (machine and threads above): {estimate}", ""]
    for r in results:
        lines.append(result_markdown(r, figure=f"figures/{r.name}.png", level=2))
    return "\n".join(lines)


def anchor(title: str, paper: str) -> str:
    """GitHub's anchor for the heading ``title (paper)``."""
    text = f"{title} ({paper})".lower()
    return "".join(c for c in text.replace(" ", "-") if c.isalnum() or c in "-_")


def full_run_estimate(results: list[ExperimentResult]) -> str | None:
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
