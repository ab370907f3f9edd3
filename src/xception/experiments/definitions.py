"""What the experiments are: how much to train, the data checked before any run, and each experiment's claim and
variants (architectures built on the compact recipe, the spectrum and Inception ones fitted to its parameter count;
the decoder experiment's DeepLab models on the camvid recipe, with its settings in :mod:`.segmentation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data import ImageDataset, load_fashion_mnist
from ..errors import InvalidArgumentError
from ..models import create_model
from ..training import TrainConfig
from ..training.recipes import get_recipe
from .segmentation import (
    RECORDED_BATCH_SIZE,
    SEGMENTATION_RECIPE,
    SegmentationSettings,
    count_segmentation_data,
    make_segmentation_settings,
    segmentation_command_line,
)

# The Xception paper's claims, in order: what `xception experiment all` runs and the report gathers.
EXPERIMENT_NAMES = ("activation", "residual", "spectrum", "order", "inception")
# Semantic segmentation on a segmentation folder (DeepLabV3+'s claims), run by name only.
SEGMENTATION_EXPERIMENTS = ("decoder",)
FULL_SCALE = {"input_scale": 1.0}  # the decoder experiment's DeepLab models run at the images' own resolution
# ... and train with the optimizer and loss of its recorded runs (benchmarks/results/decoder/), the camvid recipe's
# until it moved to AdamW and the Lovász term: SGD with the recipe's momentum 0.9, 0.05 at a batch of 8 (given at the
# recipe's reference batch, which the loop scales linearly), cross-entropy alone on every pixel.
RECORDED_LR = 0.05
RECORDED_TRAINING = {"optimizer": "sgd",
                     "lr": RECORDED_LR * get_recipe(SEGMENTATION_RECIPE).reference_batch_size / RECORDED_BATCH_SIZE,
                     "lovasz_weight": 0.0, "label_stride": 1}
RECIPE = "compact"
SPECTRUM_SEGMENTS = (1, 4, 16, None)  # None: one segment per channel, a depthwise convolution (Xception)
BASELINE_KEY = "xception"
INCEPTION_MODEL = "inception_v3_compact"
# The paper's Table 3 (60 K80 GPUs, synchronous SGD); Inception V3's count is without the auxiliary tower.
PAPER_TABLE3 = {"xception": {"params": 22_855_952, "steps_per_s": 28},
                "inception_v3": {"params": 23_626_728, "steps_per_s": 31}}


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


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
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_subset", "val_subset", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1 when given, got {value}")

    def seeds_for(self, fewer: bool) -> int:
        """Runs of a variant: every variant of these experiments is part of its claim."""
        return self.seeds


FULL = ExperimentSettings()
QUICK = ExperimentSettings(seeds=1, epochs=3, train_subset=6000, val_subset=2000, quick=True, benchmark_repeats=2)


def make_settings(*, experiment: str = "all", quick: bool = False, data: str | None = None, seeds: int | None = None,
                  epochs: int | None = None) -> ExperimentSettings | SegmentationSettings:
    """The full or quick preset of ``experiment`` with the command line's choices on top (an explicit ``seeds``
    wins over ``--quick``'s one seed; ``data`` None: the preset's, Fashion-MNIST or CamVid)."""
    if experiment in SEGMENTATION_EXPERIMENTS:
        return make_segmentation_settings(quick=quick, data=data, seeds=seeds, epochs=epochs)
    preset = QUICK if quick else FULL
    return replace(preset, data=data or preset.data, seeds=seeds or preset.seeds, epochs=epochs or preset.epochs)


def command_line(name: str, settings: ExperimentSettings | SegmentationSettings,
                 output: str | Path = "runs/experiments") -> str:
    """The ``xception experiment`` command that runs ``name`` with ``settings``, for the outputs to quote."""
    if isinstance(settings, SegmentationSettings):
        return segmentation_command_line(name, settings, output)
    preset = QUICK if settings.quick else FULL
    parts = ["xception experiment", name, *(["--data", settings.data] if settings.data != FULL.data else []),
             *(["--quick"] if settings.quick else []),
             *(["--seeds", str(settings.seeds)] if settings.seeds != preset.seeds else []),
             *(["--epochs", str(settings.epochs)] if settings.epochs != preset.epochs else []),
             *(["--output", str(output)] if Path(output) != Path("runs/experiments") else [])]
    hidden = replace(settings, data=preset.data, seeds=preset.seeds, epochs=preset.epochs, progress=preset.progress)
    return " ".join(parts) + ("" if hidden == preset else " (other settings through the Python API)")


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


@dataclass(frozen=True)
class SegmentationDataInfo(DataInfo):
    """A segmentation folder's counts, and the training crops the variants are built with."""

    crop_size: int  # the baseline's square training crop (evaluation is at full resolution)
    small_crop_size: int


def describe_data(settings: ExperimentSettings | SegmentationSettings) -> DataInfo:
    """Check the data before anything trains: an experiment of hours must not fail at its tenth run."""
    if isinstance(settings, SegmentationSettings):
        return SegmentationDataInfo(**count_segmentation_data(settings))
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
        raise InvalidArgumentError(f"{settings.data} is too small for the experiments: its training split gives "
                                   f"{train_images} images{subset}, fewer than one batch of {batch_size}; every "
                                   "variant needs at least one full batch per epoch (and many more for results worth "
                                   "reading)")
    if num_classes < 2:
        raise InvalidArgumentError(f"{settings.data} has {num_classes} class: the experiments compare classification "
                                   f"accuracy "
                                   "and need at least 2 classes")
    return DataInfo(settings.data, num_classes, in_chans, train_images, val_images, train_available, val_available)


# --- variants --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One architecture of an experiment: ``create_model`` options on top of its recipe's (the compact one for the
    paper's experiments)."""

    key: str  # names its runs' folder: variants with the same key and options share runs across experiments
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: the recipe's (xception); another model starts from no recipe options
    note: str = ""
    recipe: str = RECIPE
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields besides the settings' (crop, stride)
    fewer_seeds: bool = False  # a factor measured beside the claim: trained with the settings' factor seeds


def model_options(variant: Variant) -> tuple[str, dict[str, Any]]:
    """The model name and full options ``train`` builds the variant with (as it merges them)."""
    recipe = TrainConfig(task=get_recipe(variant.recipe).task, recipe=variant.recipe,
                         model=variant.model).resolved_recipe()
    return recipe.model, {**recipe.model_options, **variant.options}


def parameter_count(variant: Variant, info: DataInfo) -> int:
    model, options = model_options(variant)
    return sum(p.numel() for p in create_model(model, num_classes=info.num_classes, in_chans=info.in_chans,
                                               **options).parameters())


def _baseline(label: str) -> Variant:
    return Variant(BASELINE_KEY, label)


def _activation_variants(info: DataInfo) -> list[Variant]:
    return [_baseline("none (Xception)"), Variant("mid-relu", "ReLU", {"mid_activation": "relu"}),
            Variant("mid-elu", "ELU", {"mid_activation": "elu"})]


def _residual_variants(info: DataInfo) -> list[Variant]:
    return [_baseline("residual (Xception)"), Variant("no-residual", "no residual", {"residual": False})]


def _order_variants(info: DataInfo) -> list[Variant]:
    return [_baseline("depthwise first (Xception)"),
            Variant("pointwise-first", "pointwise first", {"order": "pointwise_first"})]


def _spectrum_variants(info: DataInfo) -> list[Variant]:
    """Segment counts from a regular convolution (1) to a depthwise one, each at the baseline's parameter count."""
    target = parameter_count(_baseline(""), info)
    variants = []
    for segments in SPECTRUM_SEGMENTS:
        if segments is None:
            variants.append(_baseline("depthwise (Xception)"))
            continue
        options = _spectrum_options(segments, target, info)
        widths = ", ".join(f"{name.split('_')[0]} {options[name]}"
                           for name in ("entry_widths", "exit_widths", "tail_widths"))
        variants.append(Variant(f"segments-{segments}", plural(segments, "segment"), options, note=f"widths: {widths}"))
    return variants


def _spectrum_options(segments: int, target: int, info: DataInfo) -> dict[str, Any]:
    """Widths for ``segments`` segments per spatial convolution at about ``target`` parameters.

    Fewer segments make each spatial convolution denser (1 segment: a regular 3x3 convolution, 9 x C^2 weights
    instead of 9 x C), so every width of the separable part is scaled by one factor and rounded to a multiple of
    ``segments`` (each convolution's input must split evenly); the last width, which feeds only the classifier,
    is then set to close the remaining gap. The stem, a regular convolution in every variant, keeps its widths.
    """
    base = get_recipe(RECIPE).model_options
    if base["stem_widths"][1] % segments:
        raise InvalidArgumentError(f"{segments} segments do not divide the stem's {base['stem_widths'][1]} output "
                                   f"channels")

    def scaled(factor: float, last: int | None = None) -> dict[str, Any]:
        def fit(width: int) -> int:
            return max(segments, round(width * factor / segments) * segments)

        tail_last = max(1, round(base["tail_widths"][1] * factor)) if last is None else last
        return {"segments": segments, "entry_widths": tuple(fit(w) for w in base["entry_widths"]),
                "exit_widths": tuple(fit(w) for w in base["exit_widths"]),
                "tail_widths": (fit(base["tail_widths"][0]), tail_last)}

    def count(options: dict[str, Any]) -> int:
        return parameter_count(Variant("probe", "", options), info)

    factor = _fit_monotone(lambda f: count(scaled(f)), target, 0.05, 4.0)
    options = scaled(factor)
    # Parameters grow linearly with the last width: solve for it, keeping it within a factor 2 of its scaled value.
    last = options["tail_widths"][1]
    at_last = count(options)
    slope = count(scaled(factor, last + 1)) - at_last
    solved = last + round((target - at_last) / slope) if slope else last
    if last / 2 <= solved <= last * 2:
        options = scaled(factor, max(1, solved))
    return options


def _inception_variants(info: DataInfo) -> list[Variant]:
    """The compact Xception and the Inception-V3-style network, its width fitted to the same parameter count."""
    target = parameter_count(_baseline(""), info)

    def count(width: float) -> int:
        return parameter_count(Variant("probe", "", {"width": width}, model=INCEPTION_MODEL), info)

    width = round(_fit_monotone(count, target, 0.01, 2.0), 4)
    return [_baseline("Xception (compact)"),
            Variant("inception-v3-compact", "Inception V3 style", {"width": width}, model=INCEPTION_MODEL,
                    note=f"{INCEPTION_MODEL}, width {width}")]


def _decoder_variants(info: DataInfo) -> list[Variant]:
    """The camvid recipe's DeepLabV3+ and one change at a time: no decoder (the claim), then what the backbone, the
    output stride and the crop size each buy."""
    if not isinstance(info, SegmentationDataInfo):
        raise InvalidArgumentError("the decoder experiment trains on a segmentation folder (SegmentationSettings)")
    crop = {"img_size": info.crop_size, **RECORDED_TRAINING}
    small = {"img_size": info.small_crop_size, **RECORDED_TRAINING}
    # Every variant runs the network at full resolution, as the recorded run did (benchmarks/results/decoder/);
    # the camvid recipe itself has since moved to half resolution (input_scale 0.5).
    narrow = {**get_recipe(SEGMENTATION_RECIPE).model_options, **FULL_SCALE}
    # The compact recipe's stem has no stride (28 px images); stride 2 gives the stride-4 map the decoder takes and
    # the narrow backbone's strides (2, 4, 8, 16), at a sixth of its parameters.
    compact = {**get_recipe(RECIPE).model_options, "stem_stride": 2, **FULL_SCALE}

    def variant(key: str, label: str, note: str, **fields: Any) -> Variant:
        return Variant(key, label, note=note, recipe=SEGMENTATION_RECIPE, **fields)

    variants = [
        variant("deeplabv3plus", "DeepLabV3+", f"the baseline: camvid's narrow Xception, output stride 16, crop "
                f"{info.crop_size}", options=dict(FULL_SCALE), train=crop),
        variant("deeplabv3", "DeepLabV3", "the baseline without its decoder", options=dict(narrow),
                model="deeplabv3_xception", train=crop),
        variant("compact-backbone", "compact backbone", "the compact recipe's Xception, stem stride 2",
                options=compact, train=crop, fewer_seeds=True),
        variant("output-stride-8", "output stride 8", "ASPP rates 12/24/36", options=dict(FULL_SCALE),
                train={**crop, "output_stride": 8}, fewer_seeds=True),
        variant("small-crop", f"crop {info.small_crop_size}", f"crop {info.small_crop_size} instead of "
                f"{info.crop_size}", options=dict(FULL_SCALE), train=small, fewer_seeds=True),
    ]
    for each in variants:  # refused here rather than at the first step of the run that needs it
        model, options = model_options(each)
        minimum = create_model(model, num_classes=info.num_classes, **options).min_input_size
        if each.train["img_size"] < minimum:
            raise InvalidArgumentError(f"the {each.label} variant's crop of {each.train['img_size']} pixels is smaller "
                                       f"than {model}'s minimum input of {minimum}: use larger crops")
    return variants


def _fit_monotone(count: Callable[[float], int], target: int, low: float, high: float, steps: int = 30) -> float:
    """The factor in [low, high] whose (non-decreasing, stepwise) count is closest to ``target``, by bisection."""
    for _ in range(steps):
        middle = (low + high) / 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda factor: abs(count(factor) - target))


# --- the experiments -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Experiment:
    """One of the paper's claims and the variants that test it; :mod:`.verdicts` judges it by ``name``."""

    name: str
    title: str
    paper: str  # where the paper makes the claim
    claim: str
    variants: Callable[[DataInfo], list[Variant]]
    score: str = "top1"  # the training history's val_<score> that measures a run: "top1", or "miou"


EXPERIMENTS: dict[str, Experiment] = {
    "activation": Experiment(
        "activation", "Activation between depthwise and pointwise", "Figure 10",
        "No intermediate activation converges faster and ends better than ELU, which beats ReLU.",
        _activation_variants),
    "residual": Experiment(
        "residual", "Residual connections", "Figure 9",
        "Residual connections speed up convergence and improve the final accuracy.",
        _residual_variants),
    "spectrum": Experiment(
        "spectrum", "The Inception spectrum: segments per spatial convolution", "Section 2, an open question",
        "Between a regular convolution (1 segment) and a depthwise one (1 segment per channel) lie intermediate "
        "points; the paper leaves their merit to future work.",
        _spectrum_variants),
    "order": Experiment(
        "order", "Order of the depthwise and pointwise operations", "Section 3",
        "Depthwise-first and pointwise-first separable convolutions perform about the same in a stacked network.",
        _order_variants),
    "inception": Experiment(
        "inception", "Xception against Inception V3", "Tables 1 and 3",
        "At about the same number of parameters Xception is more accurate than Inception V3 (Table 1) and trains a "
        "little more slowly (Table 3: 28 against 31 steps/s).",
        _inception_variants),
    "decoder": Experiment(
        "decoder", "The DeepLabV3+ decoder, and what backbone, output stride and crop buy",
        "DeepLabV3+, Tables 3 and 5",
        "Adding the decoder (the stride-4 features refined with the upsampled ASPP output) to DeepLabV3 improves "
        "mIoU, especially along object boundaries.",
        _decoder_variants, score="miou"),
}
