"""Training recipes: the paper's two (tuned for Inception V3 and reused unchanged for Xception), a compact one for
small images, one for fine-tuning, and ``camvid`` for semantic segmentation. Each names its source; every field can
be overridden on the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..data.segmentation import SCALE_RANGE
from ..errors import InvalidArgumentError

TASKS = ("classification", "segmentation")
OPTIMIZERS = ("sgd", "rmsprop", "adamw")


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    task: str = "classification"  # or "segmentation": xception segment train
    model: str = "xception"
    model_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.045  # for the reference batch size; scaled linearly to the global batch size used
    reference_batch_size: int = 32
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-5
    # "step": lr * decay_rate every decay_samples; "cosine": to 0 over the run; "poly": DeepLab's
    # lr * (1 - step / total) ** poly_power, to 0 over the run
    schedule: str = "step"
    poly_power: float = 0.9
    decay_rate: float = 0.94
    decay_samples: int | None = None  # None: every decay_epochs epochs
    decay_epochs: float = 2.0
    warmup_epochs: float = 0.0  # linear warm-up from 0
    warmup_steps: int = 0  # the same in optimizer steps (fine-tuning, at any data size); the longer of the two
    epochs: int = 100
    batch_size: int = 32
    img_size: int = 299  # segmentation: the side of the square training crop (evaluation is at full resolution)
    output_stride: int = 16  # segmentation: the backbone's output stride (DeepLab trains at 16)
    augmentation: str = "inception"  # see xception.data.train_transform
    scale_range: tuple[float, float] = SCALE_RANGE  # segmentation, "deeplab" augmentation: the random scale's range
    eval_resize_ratio: float = 1.0  # eval: resize to img_size * ratio, centre crop img_size
    drop_rate: float = 0.0
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # Polyak averaging of the weights, used for evaluation
    clip_grad_norm: float | None = None
    # autocast: "auto" (the machine's fastest native precision: xception.precision.choose_precision), "fp32",
    # "bf16" (CPUs with AVX512_BF16 or AMX, recent GPUs) or "fp16" (CUDA)
    precision: str = "auto"
    # Fine-tuning pretrained weights (see the "finetune" recipe). Its phases count optimizer steps, not epochs: a
    # new classifier needs as many updates from 50 images as from 50,000.
    head_steps: int = 0  # first train the classifier alone, the rest frozen with its BatchNorm in inference mode
    min_steps: int = 0  # a run of the recipe's epochs lasts at least this many steps (more epochs on small data)
    # The head-only phase's rate as a multiple of the schedule's: a lone linear classifier on fixed features takes
    # far larger steps than the whole network can (Keras's transfer-learning guide trains the head at 100x the
    # rate of the full fine-tuning).
    freeze_lr_scale: float = 1.0
    layer_decay: float | None = None  # learning rate x layer_decay ** depth, depth counted in blocks from the head
    freeze_bn: bool = False  # keep every BatchNorm's running statistics as they are (small data)
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha) on each batch (Zhang et al. 2018); 0: off
    cutmix: float = 0.0  # CutMix's Beta(alpha, alpha) (Yun et al. 2019); with mixup too, one of the two per batch
    random_erasing: float = 0.0  # probability of erasing a random rectangle of each image (Zhong et al. 2020)
    class_weights: str | None = None  # "balanced": N / (classes x count); segmentation: "median-frequency"
    # Segmentation: loss = cross-entropy + lovasz_weight x Lovász-softmax (xception.training.losses), on the labels
    # nearest the centre of each label_stride x label_stride cell (the logits predicted on that grid).
    lovasz_weight: float = 0.0
    label_stride: int = 1

    def warmup_length(self, steps_per_epoch: int) -> float:
        """The warm-up's length in optimizer steps."""
        return max(self.warmup_epochs * steps_per_epoch, self.warmup_steps)

    def learning_rate(self, step: int, steps_per_epoch: int, global_batch_size: int, total_steps: int) -> float:
        """The learning rate at optimizer step ``step``: a pure function of the step, so resuming needs no
        scheduler state and every rank agrees."""
        base = self.lr * global_batch_size / self.reference_batch_size
        if step < self.head_steps:
            base *= self.freeze_lr_scale
        warmup_steps = self.warmup_length(steps_per_epoch)
        if step < warmup_steps:
            return base * (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if self.schedule == "cosine":
            return base * 0.5 * (1 + math.cos(math.pi * progress))
        if self.schedule == "poly":
            return base * (1 - progress) ** self.poly_power
        decay_samples = self.decay_samples or self.decay_epochs * steps_per_epoch * global_batch_size
        return base * self.decay_rate ** math.floor(step * global_batch_size / decay_samples)


RECIPES: dict[str, Recipe] = {
    "imagenet-paper": Recipe(
        name="imagenet-paper",
        source="Chollet 2017, section 4.3: SGD, momentum 0.9, initial learning rate 0.045 decayed by 0.94 every "
               "2 epochs, weight decay 1e-5, dropout 0.5 before the classifier, Polyak averaging at inference",
        optimizer="sgd", lr=0.045, momentum=0.9, weight_decay=1e-5, schedule="step", decay_rate=0.94,
        decay_epochs=2.0, epochs=100, batch_size=32, img_size=299, augmentation="inception",
        eval_resize_ratio=333 / 299, drop_rate=0.5, ema_decay=0.9999,
    ),
    "jft-paper": Recipe(
        name="jft-paper",
        source="Chollet 2017, section 4.3: RMSprop, momentum 0.9, initial learning rate 0.001 decayed by 0.9 "
               "every 3,000,000 samples, weight decay 1e-5, no dropout, Polyak averaging at inference",
        optimizer="rmsprop", lr=0.001, momentum=0.9, weight_decay=1e-5, schedule="step", decay_rate=0.9,
        decay_samples=3_000_000, epochs=10, batch_size=32, img_size=299, augmentation="inception",
        eval_resize_ratio=333 / 299, drop_rate=0.0, ema_decay=0.9999,
    ),
    # Tuned here for Fashion-MNIST (28x28 grayscale) on a 2-core CPU: see benchmarks/fashion_mnist.py.
    "compact": Recipe(
        name="compact",
        source="this project: a narrow Xception for 28-32 px images (stem without stride, two entry modules), "
               "SGD with Nesterov momentum, linear warm-up and cosine decay, label smoothing, EMA",
        model_options={"stem_stride": 1, "stem_padding": "same", "stem_widths": (16, 32), "entry_widths": (48, 96),
                       "middle_repeats": 1, "exit_widths": (96, 192), "tail_widths": (192, 384),
                       "bn_momentum": 0.1},
        optimizer="sgd", lr=0.1, reference_batch_size=128, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="cosine", warmup_epochs=0.5, epochs=9, batch_size=128, img_size=28, augmentation="compact",
        drop_rate=0.1, label_smoothing=0.1, ema_decay=0.999, clip_grad_norm=None,
    ),
    "finetune": Recipe(
        name="finetune",
        source="transfer learning from pretrained weights: first the classifier alone on a frozen backbone with "
               "BatchNorm in inference mode and at a higher rate, then the whole network at the lower one (Keras's "
               "transfer-learning guide, keras.io/guides/transfer_learning, built on Xception; 'linear probe, then "
               "fine-tune'), with layer-wise learning-rate decay from the head down (timm's layer_decay, after "
               "BEiT); rates, decay and BatchNorm tuned on held-out training images of benchmarks/finetune.py's task",
        # The rate, layer decay, head rate and adapting BatchNorm statistics were chosen on held-out training
        # images of benchmarks/finetune.py's task (the new classes' statistics differ from the pretraining ones, so
        # they adapt by default; --freeze-bn is for data like the pretraining data in very small batches).
        # The phases are in steps so that they hold at any data size. 15 head-only steps was the best of 0 to 90 at
        # both 10 and 100 images per class (`benchmarks/finetune.py --tune`, benchmarks/results/*/finetune-tuning/):
        # without the phase the untrained classifier's gradients cost the backbone on 50 images, and longer phases
        # take steps from the full one. min_steps 180 is the 12 epochs of 100 images per class, kept for less data.
        optimizer="adamw", lr=5e-3, reference_batch_size=64, weight_decay=0.05, schedule="cosine",
        warmup_steps=8, epochs=12, batch_size=32, img_size=299, augmentation="inception",
        eval_resize_ratio=333 / 299, drop_rate=0.2, label_smoothing=0.1, head_steps=15, min_steps=180,
        freeze_lr_scale=10.0, layer_decay=0.85, freeze_bn=False,
    ),
    # CamVid (480x360 street scenes, 11 classes) on a 2-core CPU, from scratch, against the clock (issue #14's
    # recorded run, benchmarks/camvid.py): only the schedule and augmentation are the paper's.
    "camvid": Recipe(
        name="camvid",
        source="DeepLabV3+ (Chen et al., ECCV 2018, section 4): the 'poly' learning-rate decay (1 - step/total)^0.9, "
               "random scaling 0.5-2.0, random crop and horizontal flip, output stride 16, predictions at full "
               "resolution; here on a narrow Xception (stem stride 2, three entry modules) trained from scratch for "
               "CamVid's 480x360 images on a 2-core CPU, with AdamW (Loshchilov and Hutter, ICLR 2019) in place of "
               "the paper's SGD, run at half the input's resolution (input_scale 0.5), with colour jitter "
               "and the Lovász-softmax loss (Berman et al., CVPR 2018) beside the cross-entropy on a "
               "4-pixel label grid",
        task="segmentation", model="deeplabv3plus_xception",
        # input_scale 0.5: the network runs at 240x180 for a 480x360 image and its logits are resized back, so the
        # loss and the metrics stay at full resolution. An epoch of 448-pixel crops takes 0.68 minutes where one of
        # 320-pixel crops at full scale took 0.97 (the recorded runs' curves, benchmarks/results/camvid.json at
        # commits 956ab0a and a95126b): more epochs in the same minutes, 54.1% val mIoU against 51.9% (both SGD).
        # AdamW rather than the paper's SGD (momentum 0.9, 0.05 here): from scratch and in few steps it learns much
        # faster. Recorded with the same 42 epochs: 59.6% against SGD's 54.1% (benchmarks/results/camvid-batch8/
        # and camvid.json at 956ab0a); SGD at 0.05 and 0.1 against AdamW at 2e-3 in an 11-epoch exploration
        # (compact backbone, flips only, not in the repository): 40.6 and 38.2 against 51.2.
        model_options={"stem_widths": (16, 32), "stem_padding": "same", "entry_widths": (64, 128, 256),
                       "middle_repeats": 2, "exit_widths": (256, 384), "tail_widths": (384, 512),
                       "bn_momentum": 0.1, "input_scale": 0.5},
        # Batches of 4 at AdamW's 2e-3 (91 steps an epoch): the same images per minute as batches of 8 (the CPU's
        # time per image is the same), twice the updates. Recorded, seeds 0 and 1: 62.3% and 60.5% best, 59.3% and
        # 58.7% over the last 10 epochs, against 59.6% and 58.6% at batches of 8 (benchmarks/results/
        # camvid-batch4-seed0/, camvid-batch4-seed1/, camvid-batch8/): within the seed spread, neither seed below. In a
        # 14-epoch exploration (not in the repository) 4 at 1e-3, 8 at 4e-3 and 4 at 4e-3 did no better than 8 at
        # 2e-3.
        output_stride=16, optimizer="adamw", lr=2e-3, reference_batch_size=4, weight_decay=1e-4,
        # The Lovász-softmax term (Berman et al., CVPR 2018) beside the cross-entropy, both on the labels at the
        # centre of each 4x4 cell of the crop (the network's logits are at stride 8 of the crop: a finer grid adds
        # label detail the logits cannot follow). In a 14-epoch exploration (not in the repository, one seed each):
        # 58.1% at label stride 4 and 58.3% at stride 2 (57.7% with seed 1) against 53.5% for cross-entropy alone
        # on every pixel; cross-entropy alone at stride 2, 51.5%. Stride 4 also makes the step cheaper: 0.27 s
        # against 0.31 s (batch of 4, this machine's 2 cores), where the Lovász sort at stride 2 would cost 0.18 s.
        lovasz_weight=1.0, label_stride=4,
        # 48 epochs fit 30 minutes where bf16 is native (an epoch in about 33 s on the Zen 4 machine); elsewhere
        # --max-minutes plans fewer, with the poly schedule still run to its end (README: CamVid, recorded).
        schedule="poly", warmup_epochs=1.0, epochs=48, batch_size=4, img_size=448, augmentation="deeplab",
    ),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    if name not in RECIPES:
        raise InvalidArgumentError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("model", recipe.model) != recipe.model:
        # The recipe's architecture knobs are its own model's: another model trains with the recipe's schedule only.
        overrides.setdefault("model_options", {})
    return replace(recipe, **overrides)
