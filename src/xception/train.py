"""Training: one readable loop, every knob visible in :class:`TrainConfig`.

Runs on one process or, under ``torchrun``, as DistributedDataParallel (gloo on CPU, NCCL on CUDA): each
rank sees its shard of the data, gradients are averaged, and only rank 0 writes files.

Resuming is exact: the learning rate is a function of the step, the sampler can start mid-epoch, each
sample's augmentation is seeded by (seed, epoch, index), and the checkpoint carries the RNG states. With
``deterministic=True`` a run killed at any point and resumed ends with the same weights, bit for bit on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import TrainingState, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    ResumableSampler,
    collate_skipping,
    eval_transform,
    load_fashion_mnist,
    train_transform,
)
from .recipes import Recipe, get_recipe
from .registry import create_model

log = logging.getLogger("xception.train")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, data that does not fit the checkpoint); the last good
    checkpoint is kept."""


@dataclass
class TrainConfig:
    data: str = "fashion-mnist"  # or an ImageNet-layout folder: train/<class>/*, val/<class>/*
    recipe: str = "compact"
    model: str | None = None  # None: the recipe's
    model_options: dict[str, Any] = field(default_factory=dict)  # on top of the recipe's
    epochs: int | None = None  # None: the recipe's
    batch_size: int | None = None  # per process
    lr: float | None = None  # base learning rate at the recipe's reference batch size
    img_size: int | None = None
    output: Path = Path("runs/xception")
    resume: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int = 0
    precision: str | None = None  # "fp32", "bf16" (CPU or CUDA) or "fp16" (CUDA); None: the recipe's
    # Depthwise convolutions run several times faster in channels_last on the CPU (measured: 3.6x for the compact
    # model's forward pass on this project's 2-core machine with torch 2.14).
    channels_last: bool = True
    compile: bool = False
    max_minutes: float | None = None  # stop cleanly (checkpoint written) after this long
    grad_accumulation: int = 1
    clip_grad_norm: float | None = None
    drop_rate: float | None = None
    label_smoothing: float | None = None
    ema_decay: float | None = None
    sync_bn: bool = False
    checkpoint_every: int = 200  # optimizer steps between "last" checkpoints (and at each epoch end)
    max_steps: int | None = None  # stop after this many optimizer steps (tests, quick runs)
    train_subset: int | None = None  # use only the first N training samples (quick runs)
    val_subset: int | None = None  # evaluate on the first N validation samples only (quick runs)
    progress: bool = True

    def resolved_recipe(self) -> Recipe:
        return get_recipe(self.recipe, model=self.model, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                          img_size=self.img_size, drop_rate=self.drop_rate, label_smoothing=self.label_smoothing,
                          ema_decay=self.ema_decay, precision=self.precision,
                          clip_grad_norm=self.clip_grad_norm)


# --- distributed -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --- data ------------------------------------------------------------------------------------------

def build_datasets(config: TrainConfig, recipe: Recipe) -> tuple[ImageDataset, ImageDataset]:
    """Train and validation sets; errors about the data come here, before any training."""
    if config.data == "fashion-mnist":
        images, labels = load_fashion_mnist("train")
        if config.train_subset:
            images, labels = images[: config.train_subset], labels[: config.train_subset]
        test_images, test_labels = load_fashion_mnist("test")
        if config.val_subset:
            test_images, test_labels = test_images[: config.val_subset], test_labels[: config.val_subset]
        classes = list(FASHION_MNIST_CLASSES)
        train = ImageDataset.in_memory(images, labels, train_transform(recipe.img_size, 1, recipe.augmentation),
                                       classes, seed=config.seed)
        val = ImageDataset.in_memory(test_images, test_labels, eval_transform(recipe.img_size, 1), classes)
        return train, val
    root = Path(config.data)
    # The folder's channel count is known once it is scanned, and the transforms depend on it.
    train = ImageDataset.from_folder(root, "train", None, seed=config.seed)
    val = ImageDataset.from_folder(root, "val", None, classes=train.classes)
    train.transform = train_transform(recipe.img_size, train.in_chans, recipe.augmentation)
    val.transform = eval_transform(recipe.img_size, train.in_chans, recipe.eval_resize_ratio)
    val.in_chans = train.in_chans
    return train, val


def make_loader(dataset: ImageDataset, sampler: ResumableSampler, batch_size: int, workers: int,
                drop_last: bool = False) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a resumed run (which
    # creates its iterator at another moment) would see different dropout masks.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skipping, generator=torch.Generator().manual_seed(0))


# --- model averaging -------------------------------------------------------------------------------

class ModelEMA:
    """Polyak averaging of the weights (the paper evaluates with it). BatchNorm statistics are averaged too.
    The decay ramps up as ``(1 + step) / (10 + step)`` so that early averages are not dominated by the
    random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(current.detach(), 1 - decay)
            else:
                averaged.copy_(current)


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False,
             distributed: Distributed = Distributed()) -> dict[str, Any]:
    """Top-1/top-5 accuracy, loss, per-class accuracy and the confusion matrix (summed over ranks)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels, num_skipped in loader:
        skipped += num_skipped
        if len(labels) == 0:
            continue
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        k = min(5, num_classes)
        top5_correct += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    if distributed.world_size > 1:
        for tensor in (confusion, top5_correct, loss_sum, skipped):
            dist.all_reduce(tensor)
    model.train(was_training)
    total = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp(min=1)
    return {
        "top1": float(confusion.diag().sum()) / max(total, 1),
        "top5": float(top5_correct) / max(total, 1),
        "loss": float(loss_sum) / max(total, 1),
        "samples": total,
        "skipped": int(skipped),
        "per_class": (confusion.diag() / per_class_total).tolist(),
        "confusion": confusion.cpu().tolist(),
    }


def autocast(device: torch.device, precision: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --- the loop --------------------------------------------------------------------------------------

def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run in ``config.output``; returns the final metrics."""
    recipe = config.resolved_recipe()
    if recipe.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {recipe.precision!r}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if recipe.precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA; use --precision bf16 on the CPU")
    distributed = init_distributed(device)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(config.seed + distributed.rank)
    output = Path(config.output)

    train_set, val_set = build_datasets(config, recipe)
    num_classes = len(train_set.classes)
    options = {**recipe.model_options, **config.model_options}
    model = create_model(recipe.model, num_classes=num_classes, in_chans=train_set.in_chans,
                         drop_rate=recipe.drop_rate, **options).to(device)
    if config.sync_bn and distributed.world_size > 1:
        if device.type == "cpu":
            raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(recipe, model)
    ema = ModelEMA(model, recipe.ema_decay) if recipe.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16")

    batch_size = recipe.batch_size
    accumulation = config.grad_accumulation
    global_batch = batch_size * accumulation * distributed.world_size
    # Chunks of one batch: the ranks' batches of a step form the same global batch as one process would see.
    train_sampler = ResumableSampler(len(train_set), shuffle=True, seed=config.seed, rank=distributed.rank,
                                     world_size=distributed.world_size, drop_last=True, chunk=batch_size)
    val_sampler = ResumableSampler(len(val_set), shuffle=False, rank=distributed.rank,
                                   world_size=distributed.world_size)
    steps_per_epoch = len(train_sampler) // (batch_size * accumulation)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global batch "
                         f"({global_batch}): lower --batch-size")
    total_steps = steps_per_epoch * recipe.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    epoch, step, position, best_top1 = 0, 0, 0, None
    history: list[dict[str, Any]] = []
    totals = new_totals()  # this epoch's running sums, kept in checkpoints so a resumed epoch reports the same
    if config.resume and (output / "last.safetensors").exists():
        state = load_checkpoint(output, "last")
        check_resumable(state, num_classes, config, recipe)
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        if ema is not None and state.ema is not None:
            ema.module.load_state_dict(state.ema)
        if state.grad_scaler:
            scaler.load_state_dict(state.grad_scaler)
        epoch, step, position, best_top1 = state.epoch, state.step, state.position, state.best_top1
        history = state.extra.get("history", [])
        totals = state.extra.get("epoch_totals", totals)
        restore_rng_state(state.rng)
        log.info("resumed %s at epoch %d, step %d", output, epoch, step)
    elif config.resume:
        log.info("nothing to resume in %s: starting afresh", output)

    trainable = DistributedDataParallel(model) if distributed.world_size > 1 else model
    forward = torch.compile(trainable) if config.compile else trainable
    if distributed.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(
            {"train": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
             "recipe": asdict(recipe), "classes": train_set.classes, "in_chans": train_set.in_chans}, indent=2))
    logger = MetricsLogger(output, enabled=distributed.is_main)
    started = time.monotonic()
    stop_reason = "finished"
    val_loader = make_loader(val_set, val_sampler, batch_size, config.workers)

    def save(name: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Checkpoint ``name``; ``weights`` replaces the model's in the weights file (``best`` takes the
        evaluated weights: the EMA's when averaging is on)."""
        if not distributed.is_main:
            return
        # A step with a finite loss can still overflow the weights: never let such weights replace a good file.
        if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.dtype.is_floating_point):
            raise TrainingError(f"non-finite weights after step {step} (epoch {epoch + 1}); the last good checkpoint "
                                f"in {output} is kept: lower the learning rate or use --clip-grad-norm")
        state = TrainingState(
            epoch=epoch, step=step, position=position, best_top1=best_top1,
            model=weights if weights is not None else model.state_dict(),
            ema=ema.module.state_dict() if ema else None, optimizer=optimizer.state_dict(), scheduler=None,
            grad_scaler=scaler.state_dict() if scaler.is_enabled() else None, rng=capture_rng_state(),
            extra={"history": history, "epoch_totals": totals,
                   "config": {k: str(v) for k, v in asdict(config).items()}})
        save_checkpoint(output, name, state, architecture=model.architecture(), model_name=model.model_name)

    while epoch < recipe.epochs and step < total_steps and stop_reason == "finished":
        train_sampler.set_epoch(epoch)
        train_sampler.set_start(position)
        loader = make_loader(train_set, train_sampler, batch_size, config.workers, drop_last=True)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        micro = position // batch_size  # micro-batches of this epoch already done
        bar = tqdm(total=steps_per_epoch, initial=micro // accumulation, unit="step",
                   desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not (config.progress and distributed.is_main),
                   dynamic_ncols=True)
        for images, labels, num_skipped in loader:
            if micro == steps_per_epoch * accumulation:
                break  # the remainder would not fill an optimizer step
            totals["skipped"] += num_skipped
            position += batch_size
            if len(labels):
                images, labels = images.to(device), labels.to(device)
                if config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, recipe.precision):
                    logits = forward(images)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({loss.item()}) at step {step + 1} (epoch {epoch + 1}); "
                                        f"the last good checkpoint in {output} is kept: lower the learning rate or "
                                        "use --clip-grad-norm")
                scaler.scale(loss / accumulation).backward()
                totals["seen"] += len(labels)
                totals["loss_sum"] += loss.item() * len(labels)
                totals["correct"] += (logits.argmax(1) == labels).sum().item()
            micro += 1
            if micro % accumulation:
                continue
            lr = recipe.learning_rate(step, steps_per_epoch, global_batch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if recipe.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(model, step)
            bar.update(1)
            train_loss = totals["loss_sum"] / max(totals["seen"], 1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.4g}")
            if step % 20 == 0:
                logger.log({"step": step, "epoch": epoch + micro / (steps_per_epoch * accumulation),
                            "train_loss": train_loss, "lr": lr})
            if config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes:
                stop_reason = f"time limit of {config.max_minutes} minutes"
            if step >= total_steps and micro < steps_per_epoch * accumulation:
                stop_reason = f"max_steps={config.max_steps}"
            if stop_reason != "finished":
                break
            if step % config.checkpoint_every == 0:
                save("last")
        bar.close()
        if stop_reason != "finished":
            save("last")
            break
        # End of epoch: evaluate (the EMA weights where there are some), record, checkpoint.
        evaluated = ema.module if ema is not None else model
        metrics = evaluate(evaluated, val_loader, num_classes, device, recipe.precision, config.channels_last,
                           distributed)
        record = {"epoch": epoch + 1, "step": step, "train_loss": totals["loss_sum"] / max(totals["seen"], 1),
                  "train_top1": totals["correct"] / max(totals["seen"], 1), "val_loss": metrics["loss"],
                  "val_top1": metrics["top1"], "val_top5": metrics["top5"],
                  "skipped_images": totals["skipped"] + metrics["skipped"],
                  "minutes": (time.monotonic() - started) / 60}
        history.append(record)
        logger.log(record)
        if distributed.is_main:
            log.info("epoch %d: val top-1 %.4f top-5 %.4f", epoch + 1, metrics["top1"], metrics["top5"])
        epoch, position, totals = epoch + 1, 0, new_totals()
        if best_top1 is None or metrics["top1"] > best_top1:
            best_top1 = metrics["top1"]
            save("best", ema.module.state_dict() if ema is not None else None)
        save("last")

    logger.close()
    if distributed.is_main and history:
        plot_history(history, output / "curves.png")
    result = {"output": str(output), "epochs": epoch, "steps": step, "best_top1": best_top1,
              "history": history, "stopped": stop_reason}
    if distributed.world_size > 1:
        dist.barrier()
    return result


def new_totals() -> dict[str, float]:
    return {"seen": 0, "loss_sum": 0.0, "correct": 0, "skipped": 0}


def check_resumable(state: TrainingState, num_classes: int, config: TrainConfig, recipe: Recipe) -> None:
    head = state.model.get("head.predictions.weight")
    if head is not None and head.shape[0] != num_classes:
        raise TrainingError(f"the checkpoint in {config.output} has {head.shape[0]} classes but the data has "
                            f"{num_classes}: use another --output, or the data it was trained on")


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay applies to weights, not to BN parameters and biases (as Keras's kernel regularizers do).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    if recipe.optimizer == "rmsprop":
        # TensorFlow's RMSprop defaults (decay 0.9, epsilon 1.0 in the Inception recipes' slim code use 1.0).
        return torch.optim.RMSprop(groups, lr=recipe.lr, alpha=0.9, eps=1.0, momentum=recipe.momentum)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- outputs ---------------------------------------------------------------------------------------

class MetricsLogger:
    """Metrics as JSON lines (``metrics.jsonl``) and, where TensorBoard is installed, as event files."""

    def __init__(self, output: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = output / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Training curves: loss, and train/val top-1, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_axis.plot(epochs, [r["val_loss"] for r in history], label="val")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy_axis.plot(epochs, [r["train_top1"] for r in history], label="train")
    accuracy_axis.plot(epochs, [r["val_top1"] for r in history], label="val")
    accuracy_axis.set(xlabel="epoch", ylabel="top-1", title="Top-1 accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
