"""What the runs gave and what it says about the paper's claims: the result records, the noise a gap must exceed,
and each experiment's judge, which turns the numbers into an outcome and a sentence."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .definitions import BASELINE_KEY, DataInfo, ExperimentSettings, SegmentationDataInfo, plural
from .segmentation import SegmentationSettings

# What each experiment's score is (Experiment.score), in sentences and table headings.
SCORE_NAMES = {"top1": "val top-1", "miou": "val mIoU"}

# --- results ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One training run (one variant, one seed). Its score is the experiment's (``Experiment.score``): validation
    top-1, or for the segmentation experiment the validation mIoU at full resolution; the fields keep the names
    ``*_top1`` so that recorded results and cached runs read back unchanged."""

    seed: int
    output: str
    final_top1: float  # the score after the last epoch (EMA weights where the recipe has them, as train evaluates)
    best_top1: float
    steps: int
    seconds: float | None  # wall time of the run; None when it resumed an interrupted one
    steps_per_s: float | None  # optimizer steps per second, per-epoch evaluation included
    curve: list[list[float]]  # [step, score] after each epoch
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
    def minutes_per_run(self) -> float | None:
        """Mean wall time of the runs that trained in one go (a resumed run's is not known)."""
        measured = [run.seconds for run in self.runs if run.seconds]
        return statistics.fmean(measured) / 60 if measured else None

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


# --- the noise -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Gap:
    """``better``'s mean final top-1 minus ``worse``'s, and the noise it has to exceed to count."""

    better: VariantResult
    worse: VariantResult
    gap: float
    noise: float

    @classmethod
    def between(cls, a: VariantResult, b: VariantResult, val_images: int | None) -> _Gap:
        better, worse = (a, b) if a.mean >= b.mean else (b, a)
        return cls(better, worse, better.mean - worse.mean, _noise_level(a, b, val_images))

    @property
    def significant(self) -> bool:
        return self.gap > self.noise

    def describe(self) -> str:
        return f"a gap of {100 * self.gap:.2f} points against a noise level of {100 * self.noise:.2f}"


def _noise_level(a: VariantResult, b: VariantResult, val_images: int | None) -> float:
    """The larger of the two seed standard deviations and the standard error of a difference of two accuracies
    on ``val_images`` images. With one seed only the latter is known, and seed-to-seed noise is not counted.
    ``val_images`` None: the score is not a proportion of images (mIoU), and only the seeds' spread counts."""
    if val_images is None:
        return max(a.std, b.std)
    sampling = math.sqrt(sum(v.mean * (1 - v.mean) for v in (a, b)) / max(val_images, 1))
    return max(a.std, b.std, sampling)


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- the judges ------------------------------------------------------------------------------------

def _judge_best(variants: list[VariantResult], expected_key: str, val_images: int | None) -> tuple[str, str]:
    """Whether the variant the paper favours ends best, beyond the noise."""
    ranking = sorted(variants, key=lambda v: v.mean, reverse=True)
    expected = next(v for v in variants if v.key == expected_key)
    if ranking[0] is expected:
        gap = _Gap.between(expected, ranking[1], val_images)
        scores = f"{percent(expected.mean)} against {percent(gap.worse.mean)} for the next best ({gap.worse.label})"
        if gap.significant:
            return "held", f"{_capitalised(expected.label)} ends best: {scores}, {gap.describe()}."
        return "inconclusive", (f"{_capitalised(expected.label)} has the best mean, {scores}, but {gap.describe()}: "
                                "within the noise.")
    gap = _Gap.between(ranking[0], expected, val_images)
    best = _capitalised(gap.better.label)
    if gap.significant:
        return "not held", (f"{best} beats {expected.label}: {percent(gap.better.mean)} against "
                            f"{percent(expected.mean)}, {gap.describe()}.")
    return "inconclusive", (f"{best} has the best mean, {percent(gap.better.mean)} against {percent(expected.mean)} "
                            f"for {expected.label}, but {gap.describe()}: within the noise.")


def _judge_activation(variants: list[VariantResult], val_images: int,
                      full_size: dict | None = None) -> tuple[str, str]:
    outcome, text = _judge_best(variants, BASELINE_KEY, val_images)
    relu, elu = (next(v for v in variants if v.key == key) for key in ("mid-relu", "mid-elu"))
    gap = _Gap.between(elu, relu, val_images)
    where = "beyond" if gap.significant else "within"
    return outcome, (f"{text} Between the activations, {gap.better.label} ends above {gap.worse.label} by "
                     f"{100 * gap.gap:.2f} points, {where} the noise (the paper: ELU above ReLU).")


def _judge_residual(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    outcome, text = _judge_best(variants, BASELINE_KEY, val_images)
    with_skip, without = (next(v for v in variants if v.key == key) for key in (BASELINE_KEY, "no-residual"))
    first = [statistics.fmean(run.curve[0][1] for run in v.runs) for v in (with_skip, without)]
    step = int(with_skip.runs[0].curve[0][0])
    return outcome, (f"{text} Convergence: at the first evaluation (step {step}) {percent(first[0])} with residuals "
                     f"against {percent(first[1])} without (the paper: faster and higher with residuals).")


def _judge_order(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    """The paper expects little difference: the claim holds when the gap stays within the noise."""
    first, second = sorted(variants, key=lambda v: v.mean, reverse=True)[:2]
    gap = _Gap.between(first, second, val_images)
    if gap.significant:
        return "not held", (f"{_capitalised(first.label)} ends above {second.label}: {percent(first.mean)} against "
                            f"{percent(second.mean)}, {gap.describe()}: a difference beyond the noise.")
    return "held", (f"The two orders end within the noise of each other: {first.label} {percent(first.mean)}, "
                    f"{second.label} {percent(second.mean)}, {gap.describe()}.")


def _judge_spectrum(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    """The paper leaves the intermediate points open: report where the best lies and what is within its noise."""
    ranking = sorted(variants, key=lambda v: v.mean, reverse=True)
    best = ranking[0]
    tied = [v for v in ranking[1:] if not _Gap.between(best, v, val_images).significant]
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


def _judge_inception(variants: list[VariantResult], val_images: int,
                     full_size: dict | None = None) -> tuple[str, str]:
    outcome, text = _judge_best(variants, BASELINE_KEY, val_images)
    if full_size and full_size.get("speed_ratio"):
        ours, theirs = full_size["rows"]
        text += (f" At full size (299 px, 1000 classes, training steps at batch {full_size['batch_size']} on this "
                 f"CPU): Xception {ours['params']:,} parameters and {ours['steps_per_s']:.3f} steps/s, Inception V3 "
                 f"{theirs['params']:,} and {theirs['steps_per_s']:.3f}: Xception trains at "
                 f"{full_size['speed_ratio']:.2f}x Inception V3's speed (the paper, on 60 K80 GPUs: 28/31 = 0.90x).")
    return outcome, text


def _judge_decoder(variants: list[VariantResult], val_images: int, full_size: dict | None = None) -> tuple[str, str]:
    """DeepLabV3+ against DeepLabV3 beyond the seeds' spread (mIoU is no proportion of images: no sampling term),
    then each other factor's difference from the baseline."""
    baseline, no_decoder, *factors = variants
    outcome, text = _judge_best([baseline, no_decoder], baseline.key, None)
    if factors:
        parts = []
        for factor in factors:
            gap = _Gap.between(factor, baseline, None)
            where = "beyond" if gap.significant else "within"
            parts.append(f"{factor.label} {100 * (factor.mean - baseline.mean):+.2f} points ({where} the noise of "
                         f"{100 * gap.noise:.2f})")
        text += f" Against the baseline: {'; '.join(parts)}."
    return outcome, text


_JUDGES: dict[str, Callable[[list[VariantResult], int, dict | None], tuple[str, str]]] = {
    "activation": _judge_activation, "residual": _judge_residual, "spectrum": _judge_spectrum,
    "order": _judge_order, "inception": _judge_inception, "decoder": _judge_decoder,
}

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
    "decoder": "The paper fine-tunes pretrained backbones on PASCAL VOC 2012 and Cityscapes at 513-pixel crops; "
               "here a narrow Xception trains from scratch for a few minutes, when the decoder's sharper boundaries "
               "may matter less than what the encoder has yet to learn. The noise is the seeds' spread only: mIoU "
               "over a fixed validation set has no simple sampling error, and the factors' fewer seeds make their "
               "differences rougher than the decoder's.",
}


def _segmentation_scale_caveat(settings: SegmentationSettings, info: SegmentationDataInfo, params: int) -> str:
    text = (f"Small scale: the folder {info.data}, {info.train_images:,} training and {info.val_images:,} validation "
            f"images (scored at full resolution), a network of about {params:,} parameters trained from scratch for "
            f"{plural(settings.epochs, 'epoch')} on {info.crop_size}-pixel crops, the decoder's variants with "
            f"{plural(settings.seeds, 'seed')} and the other factors with "
            f"{plural(settings.seeds_for(fewer=True), 'seed')}.")
    if settings.seeds == 1:
        text += " One seed: no noise is measured, and any gap counts; the outcome is tentative."
    if settings.quick:
        text += " Quick run: a subset and a few steps, a smoke test of the pipeline rather than evidence."
    return text


def _scale_caveat(settings: ExperimentSettings | SegmentationSettings, info: DataInfo, params: int) -> str:
    if isinstance(settings, SegmentationSettings) and isinstance(info, SegmentationDataInfo):
        return _segmentation_scale_caveat(settings, info, params)
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


def judge_experiment(name: str, variants: list[VariantResult], settings: ExperimentSettings | SegmentationSettings,
                     info: DataInfo, full_size: dict[str, Any] | None = None) -> Verdict:
    """The verdict on experiment ``name`` from its variants' results (in the order the experiment lists them): a
    gap counts only beyond the noise, and an outcome from one seed is marked tentative."""
    outcome, text = _JUDGES[name](variants, info.val_images, full_size)
    if settings.seeds < 2 and outcome in ("held", "not held"):
        outcome += " (one seed: tentative)"
    return Verdict(outcome, text, f"{_scale_caveat(settings, info, variants[0].params)} {CAVEATS[name]}")
