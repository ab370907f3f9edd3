"""Every training option, once: :class:`TrainConfig`. The ``xception train`` flags are generated from its fields
(their help, bounds and defaults), and "None means the recipe's value" is resolved in :meth:`resolved_recipe`.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data.segmentation import SEGMENTATION_AUGMENTATIONS, check_scale_range
from ..errors import InvalidArgumentError
from ..precision import AUTO, TRAINING_PRECISIONS
from .recipes import OPTIMIZERS, RECIPES, TASKS, Recipe, get_recipe

CLASSIFICATION, SEGMENTATION = ("classification",), ("segmentation",)
CLASSIFICATION_AUGMENTATIONS = ("none", "basic", "randaugment", "trivialaugment", "inception", "compact")
DEFAULT_RECIPES = {"classification": "compact", "segmentation": "camvid"}


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None, recipe: bool = False, flag: str | None = None,
           choices: tuple[Any, ...] | None = None, cli: bool = True, tasks: tuple[str, ...] = TASKS,
           task_flags: dict[str, str] | None = None, task_choices: dict[str, tuple[Any, ...]] | None = None,
           required_for: tuple[str, ...] = ()) -> Any:
    """A TrainConfig field: its help text and bounds serve the command line and the Python API alike.
    ``recipe=True``: None takes the recipe's value. ``tasks``: the tasks it applies to (``xception train`` has
    the classification flags, ``xception segment train`` the segmentation ones); ``task_flags``: its flag where a
    task spells it otherwise; ``task_choices``: the choices a task's command offers, where they are fewer than
    ``choices``; ``required_for``: the tasks whose command requires it."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "above": above, "below": below,
                "recipe": recipe, "flag": flag, "choices": choices, "cli": cli, "tasks": tasks,
                "task_flags": task_flags or {}, "task_choices": task_choices or {}, "required_for": required_for}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    task: str = option("classification", "what is learnt: a class per image (xception train) or per pixel "
                                         "(xception segment train)", choices=TASKS, cli=False)
    data: str = option("fashion-mnist", "fashion-mnist, or a folder with train/<class>/* and val/<class>/*; "
                                        "segmentation: a folder with classes.txt, train/images/<stem>.jpg, "
                                        "train/labels/<stem>.png and val/ alike", required_for=SEGMENTATION)
    recipe: str | None = option(None, "training recipe (default: compact; segmentation: camvid)",
                                choices=tuple(sorted(RECIPES)))
    model: str | None = option(None, "model to train (default: the recipe's)", recipe=True)
    model_options: dict[str, Any] = option({}, "architecture option on top of the recipe's, e.g. --set "
                                               "middle_repeats=4 (repeatable)", flag="--set")
    epochs: int | None = option(None, "epochs (default: the recipe's)", minimum=1, recipe=True)
    batch_size: int | None = option(None, "images per step and process (default: the recipe's)", minimum=1,
                                    recipe=True)
    lr: float | None = option(None, "learning rate at the recipe's reference batch size (scaled linearly to the "
                                    "global batch)", above=0, recipe=True)
    optimizer: str | None = option(None, "optimizer (default: the recipe's): sgd (with the recipe's momentum), "
                                         "rmsprop or adamw", recipe=True, choices=OPTIMIZERS)
    weight_decay: float | None = option(None, "weight decay (default: the recipe's); decoupled for adamw", minimum=0,
                                        recipe=True)
    img_size: int | None = option(None, "training and evaluation image size; segmentation: the side of the square "
                                        "training crop, evaluation being at full resolution (default: the "
                                        "recipe's)", minimum=8, recipe=True, task_flags={"segmentation": "--crop-size"})
    weights: str | None = option(None, "start from pretrained weights, a new class count getting a new classifier: "
                                       "a finished run folder or save_pretrained folder (its architecture too), or a "
                                       "weight file of any format the library reads; classification also takes a "
                                       "registered name (imagenet, tf_in1k...), segmentation a whole segmentation "
                                       "model only (--backbone-weights takes classification weights)")
    backbone_weights: str | None = option(None, "start the backbone from pretrained weights: a registered name of the "
                                                "backbone (tf_in1k, imagenet...), a weight file, or a classification "
                                                "run folder (its backbone architecture too)", tasks=SEGMENTATION)
    output_stride: int | None = option(None, "the backbone's output stride (default: the recipe's)", recipe=True,
                                       choices=(8, 16, 32), tasks=SEGMENTATION)
    ignore_index: int = option(255, "label value that the loss and the metrics ignore", minimum=0, maximum=255,
                               tasks=SEGMENTATION)
    head_steps: int | None = option(None, "optimizer steps that first train the classifier alone, the rest frozen "
                                          "(default: the recipe's)", minimum=0, recipe=True, tasks=CLASSIFICATION)
    min_steps: int | None = option(None, "the fewest optimizer steps a run of the recipe's epochs takes: more "
                                         "epochs on small data (default: the recipe's)", minimum=0, recipe=True)
    freeze_lr_scale: float | None = option(None, "the learning rate of the classifier-alone steps, as a multiple of "
                                                 "the schedule's (default: the recipe's)", above=0, recipe=True,
                                           tasks=CLASSIFICATION)
    layer_decay: float | None = option(None, "learning rate x this ** depth, depth in blocks from the classifier "
                                             "(default: the recipe's)", above=0, maximum=1, recipe=True,
                                       tasks=CLASSIFICATION)
    freeze_bn: bool | None = option(None, "keep BatchNorm running statistics frozen (default: the recipe's)",
                                    recipe=True)
    augmentation: str | None = option(None, "training augmentation (default: the recipe's); segmentation: deeplab "
                                            "(scale 0.5-2, crop, flip, colour jitter), basic (crop, flip) or none "
                                            "(crop)", recipe=True,
                                      flag="--augment", choices=(*CLASSIFICATION_AUGMENTATIONS, "deeplab"),
                                      task_choices={"classification": CLASSIFICATION_AUGMENTATIONS,
                                                    "segmentation": SEGMENTATION_AUGMENTATIONS})
    scale_range: tuple[float, float] | None = option(None, "the range of the deeplab augmentation's random scale "
                                                           "(default: the recipe's; DeepLab's is 0.5 2.0)",
                                                     recipe=True, tasks=SEGMENTATION)
    lovasz_weight: float | None = option(None, "add this x the Lovász-softmax loss (a surrogate of 1 - IoU per class, "
                                               "Berman et al. 2018) to the cross-entropy (0: off; default: the "
                                               "recipe's)", minimum=0, recipe=True, tasks=SEGMENTATION)
    label_stride: int | None = option(None, "compute the training loss on the label nearest the centre of each N x N "
                                            "cell, the logits predicted on that grid: cheaper, evaluation unchanged "
                                            "(1: every pixel; default: the recipe's)", minimum=1, recipe=True,
                                      tasks=SEGMENTATION)
    mixup: float | None = option(None, "MixUp alpha (0: off; default: the recipe's)", minimum=0, recipe=True,
                                 tasks=CLASSIFICATION)
    cutmix: float | None = option(None, "CutMix alpha (0: off; default: the recipe's)", minimum=0, recipe=True,
                                  tasks=CLASSIFICATION)
    random_erasing: float | None = option(None, "probability of random erasing (default: the recipe's)",
                                          minimum=0, maximum=1, recipe=True, tasks=CLASSIFICATION)
    class_weights: str | None = option(None, "weight the loss of each class by its rarity (default: the recipe's): "
                                             "'balanced' (classification: N / (classes x its count)) or "
                                             "'median-frequency' (segmentation: median frequency balancing)",
                                       recipe=True, choices=("balanced", "median-frequency"),
                                       task_choices={"classification": ("balanced",),
                                                     "segmentation": ("median-frequency",)})
    freeze: str | None = option(None, "keep the parameters whose names match this regular expression frozen "
                                      "throughout, e.g. '^blocks\\.block[1-4]\\.'")
    output: Path = option(Path("runs/xception"), "run folder: checkpoints, metrics, curves",
                          required_for=SEGMENTATION)
    resume: bool = option(False, "continue the run in --output where it stopped")
    seed: int = option(0, "random seed (data order, augmentation, initialisation)", minimum=0)
    deterministic: bool = option(False, "deterministic kernels: a resumed run ends bit for bit the same")
    workers: int = option(0, "DataLoader worker processes", minimum=0)
    precision: str | None = option(None, "autocast precision; auto: the fastest this machine runs natively (bf16 "
                                         "with AVX512_BF16, AMX or a bf16 GPU; fp16 on older GPUs; else fp32), "
                                         "printed at start (default: the recipe's, auto)", recipe=True,
                                   choices=(AUTO, *TRAINING_PRECISIONS))
    # Depthwise convolutions run several times faster in channels_last on the CPU (measured: 3.6x for the compact
    # model's forward pass on this project's 2-core machine with torch 2.14).
    channels_last: bool = option(True, "channels_last memory layout (depthwise convolutions are faster in it)")
    compile: bool = option(False, "torch.compile the model")
    max_minutes: float | None = option(None, "time budget: a cosine or poly schedule is planned to end inside it "
                                             "from the speed of the first steps; any run stops cleanly when it is "
                                             "spent, checkpoint written (resume later)", above=0)
    grad_accumulation: int = option(1, "micro-batches per optimizer step", minimum=1)
    clip_grad_norm: float | None = option(None, "clip the gradient norm to this", above=0, recipe=True)
    drop_rate: float | None = option(None, "dropout before the classifier (default: the recipe's)", minimum=0,
                                     below=1, recipe=True, tasks=CLASSIFICATION)
    label_smoothing: float | None = option(None, "label smoothing (default: the recipe's)", minimum=0, below=1,
                                           recipe=True)
    ema_decay: float | None = option(None, "decay of the weights' moving average used for evaluation (default: "
                                           "the recipe's)", minimum=0, below=1, recipe=True)
    sync_bn: bool = option(False, "SyncBatchNorm under torchrun (GPUs only)")
    checkpoint_every: int = option(200, "optimizer steps between 'last' checkpoints (and at each epoch end)",
                                   minimum=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps", minimum=1)
    classes: str | None = option(None, "train on these classes only: comma-separated names or indices (labels are "
                                       "renumbered in this order, the names kept)", tasks=CLASSIFICATION)
    train_per_class: int | None = option(None, "train on the first N images of each class only", minimum=1,
                                         tasks=CLASSIFICATION)
    train_subset: int | None = option(None, "train on the first N images only", minimum=1)
    val_subset: int | None = option(None, "evaluate on the first N validation images only", minimum=1)
    progress: bool = option(True, "progress bars", cli=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InvalidArgumentError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.recipe is None:
            self.recipe = DEFAULT_RECIPES[self.task]
        self.output = Path(self.output)
        if self.freeze is not None:
            try:
                re.compile(self.freeze)
            except re.error as error:
                raise InvalidArgumentError(f"freeze (--freeze) is not a regular expression: {error}") from None
        self.model_options = dict(self.model_options)
        if self.scale_range is not None:
            self.scale_range = check_scale_range(self.scale_range)  # a tuple, also when given a list
        for item in fields(self):
            problem = bound_problem(getattr(self, item.name), item.metadata)
            if problem:
                raise InvalidArgumentError(f"{item.name} ({flag_name(item, self.task)}) {problem}")
            if self.task not in item.metadata["tasks"] and getattr(self, item.name) != default_value(item):
                raise InvalidArgumentError(f"{item.name} ({flag_name(item, self.task)}) does not apply to "
                                           f"{self.task}; it is an option of {' and '.join(item.metadata['tasks'])}")

    def resolved_recipe(self) -> Recipe:
        """The recipe with every option this config sets (not None) in place of the recipe's value; it must be a
        recipe of this config's task."""
        recipe = get_recipe(self.recipe, **{item.name: getattr(self, item.name) for item in fields(self)
                                            if item.metadata["recipe"]})
        if recipe.task != self.task:
            others = ", ".join(sorted(name for name, r in RECIPES.items() if r.task == self.task))
            command = "xception segment train" if recipe.task == "segmentation" else "xception train"
            raise InvalidArgumentError(f"recipe {self.recipe!r} trains {recipe.task} models, not {self.task}: use "
                                       f"{command} for it, or one of these recipes: {others}")
        return recipe

    def class_list(self) -> list[str] | None:
        """``classes`` as a list of names or indices."""
        return None if self.classes is None else [name.strip() for name in self.classes.split(",") if name.strip()]

    def to_json(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


def flag_name(item: Any, task: str = "classification") -> str:
    return item.metadata["task_flags"].get(task) or item.metadata["flag"] or "--" + item.name.replace("_", "-")


def default_value(item: Any) -> Any:
    return item.default_factory() if item.default is MISSING else item.default


def bound_problem(value: Any, metadata: Any) -> str | None:
    """What is wrong with ``value`` under the field's bounds and choices, or None."""
    if value is None:
        return None
    if metadata.get("choices") and value not in metadata["choices"]:
        return f"must be one of {', '.join(map(str, metadata['choices']))}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for key, test, words in (("minimum", lambda v, b: v >= b, "must be >= {}"),
                             ("maximum", lambda v, b: v <= b, "must be <= {}"),
                             ("above", lambda v, b: v > b, "must be > {}"),
                             ("below", lambda v, b: v < b, "must be < {}")):
        bound = metadata.get(key)
        if bound is not None and not test(value, bound):
            return f"{words.format(bound)}, got {value}"
    return None


def task_fields(task: str) -> list[Any]:
    """The TrainConfig fields a task's training command has flags for."""
    return [item for item in fields(TrainConfig) if item.metadata["cli"] and task in item.metadata["tasks"]]


def add_train_arguments(parser: argparse.ArgumentParser, model_choices: list[str],
                        task: str = "classification") -> None:
    """One flag per :class:`TrainConfig` field of ``task``, with its help, type, bounds and default."""
    for item in task_fields(task):
        metadata = item.metadata
        name = flag_name(item, task)
        required = task in metadata["required_for"]
        default = None if required or item.default is MISSING else item.default
        help_text = metadata["help"] + ("" if default in (None, False) else f" (default: {default})")
        # dest is the field's name even where the flag is spelt otherwise (--set, --augment, --crop-size)
        flag = {"dest": item.name, "help": help_text}
        if item.name == "model_options":
            parser.add_argument(name, action="append", default=[], metavar="KEY=VALUE", **flag)
        elif item.type == "tuple[float, float] | None":
            parser.add_argument(name, type=bounded(float, above=0), nargs=2, metavar=("LOW", "HIGH"), **flag)
        elif item.type == "bool | None":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, **flag)
        elif item.type == "bool" and default:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=True, **flag)
        elif item.type == "bool":
            parser.add_argument(name, action="store_true", **flag)
        else:
            choices = metadata["task_choices"].get(task, metadata["choices"])
            if item.name == "model":
                choices = model_choices
            elif item.name == "recipe":
                choices = sorted(name for name, recipe in RECIPES.items() if recipe.task == task)
            parser.add_argument(name, type=checked_type(item), default=default, choices=choices, required=required,
                                metavar=None if choices else name.lstrip("-").replace("-", "_").upper(), **flag)


def checked_type(item: Any) -> Callable[[str], Any]:
    """The argparse type of a TrainConfig field: its type, and its bounds checked where the flag is parsed."""
    kind = {"int | None": int, "int": int, "float | None": float, "float": float, "Path": Path}.get(item.type, str)
    return bounded(kind, **{key: item.metadata[key] for key in ("minimum", "maximum", "above", "below")})


def bounded(kind: type, **bounds: float | None) -> Callable[[str], Any]:
    """An argparse type that parses ``kind`` and refuses values outside ``bounds`` (minimum, maximum, above,
    below), so that argparse names the flag in the error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        problem = bound_problem(value, bounds)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def config_from_args(args: argparse.Namespace, model_options: dict[str, Any],
                     task: str = "classification") -> TrainConfig:
    """The TrainConfig the parsed ``xception train`` (or ``segment train``) flags describe."""
    values = {item.name: getattr(args, item.name) for item in task_fields(task)}
    return TrainConfig(**{**values, "model_options": model_options, "task": task})
