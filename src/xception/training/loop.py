"""The training loop: one readable function, every knob visible in :class:`~xception.training.config.TrainConfig`.

One loop for every task: classification and semantic segmentation differ only in the parts a task object
supplies (:mod:`.tasks`: datasets, model, loss weights and ignored label, evaluation, the score of the best
checkpoint).

Runs on one process or, under ``torchrun``, as DistributedDataParallel (gloo on CPU, NCCL on CUDA): each rank sees
its shard of the data, gradients are averaged (once per optimizer step: accumulation micro-steps skip the
all-reduce), and only rank 0 writes files.

Resuming is exact: the learning rate is a function of the step, the sampler can start mid-epoch, each sample's
augmentation is seeded by (seed, epoch, index), and the checkpoint carries the RNG states and the whole
:class:`RunState`. With ``deterministic=True`` a run killed at any point and resumed ends with the same weights,
bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import sample_labels
from ..errors import InvalidArgumentError, XceptionError
from ..files import write_text_atomic
from ..hardware import probe
from ..precision import PrecisionChoice, choose_precision
from .budget import BudgetPlanner, Schedule, SchedulePlan, time_evaluation
from .checkpoint import (
    TrainingState,
    capture_rng_state,
    finish_interrupted_save,
    load_checkpoint,
    read_architecture,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig
from .data import batch_mixer, make_loader, samplers
from .distributed import Distributed, init_distributed
from .finetune import parameter_groups, set_trainable
from .metrics import MetricsLogger, plot_history
from .recipes import OPTIMIZERS, Recipe
from .run_length import RunLength, fit_batch, fit_epochs
from .step import forward_backward, optimizer_step
from .tasks import task_for

log = logging.getLogger("xception.train")


class TrainingError(XceptionError, RuntimeError):
    """The run cannot go on (a non-finite loss, data that does not fit the checkpoint); the last good
    checkpoint is kept."""


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


# --- the run's state ---------------------------------------------------------------------------------

@dataclass
class RunState:
    """Where a run stands; saved whole with every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0
    step: int = 0  # optimizer steps done
    position: int = 0  # samples of this epoch already consumed (by this rank)
    best_score: float | None = None  # the task's: top-1 (classification) or mIoU (segmentation)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    steps_log: list[dict[str, Any]] = field(default_factory=list)  # loss and learning rate every 20 steps
    # This epoch's running sums, so that a resumed epoch reports what an uninterrupted one would.
    totals: dict[str, float] = field(default_factory=lambda: {"seen": 0, "loss_sum": 0.0, "correct": 0,
                                                              "skipped": 0})
    plan: SchedulePlan | None = None  # the epochs a --max-minutes budget holds (xception.training.budget)

    def new_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0
        self.totals = RunState().totals

    def count_batch(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = -100) -> None:
        """Add a batch to the epoch's sums: its images (classification) or labelled pixels (segmentation), the
        loss weighted by them, and how many the model got right."""
        labels = labels.cpu()
        counted = labels != ignore_index
        seen = int(counted.sum())
        self.totals["seen"] += seen
        self.totals["loss_sum"] += loss.item() * seen
        self.totals["correct"] += ((logits.argmax(1).cpu() == labels) & counted).sum().item()

    def train_loss(self) -> float:
        return self.totals["loss_sum"] / max(self.totals["seen"], 1)


@dataclass
class Trainer:
    """What a step needs besides the data: the model and everything that updates it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None


def save_run(name: str, run: RunState, trainer: Trainer, config: TrainConfig,
             weights: dict[str, torch.Tensor] | None = None) -> None:
    """Checkpoint ``name`` (rank 0 only); ``weights`` replaces the model's in the weights file (``best`` takes the
    evaluated weights: the EMA's when averaging is on)."""
    model = trainer.model
    # A step with a finite loss can still overflow the weights: never let such weights replace a good file.
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.dtype.is_floating_point):
        raise TrainingError(f"non-finite weights after step {run.step} (epoch {run.epoch + 1}); the last good "
                            f"checkpoint in {config.output} is kept: lower the learning rate or use --clip-grad-norm")
    state = TrainingState(
        epoch=run.epoch, step=run.step, position=run.position, best_score=run.best_score,
        model=weights if weights is not None else model.state_dict(),
        ema=trainer.ema.module.state_dict() if trainer.ema else None, optimizer=trainer.optimizer.state_dict(),
        scheduler=None, grad_scaler=trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        rng=capture_rng_state(),
        extra={"history": run.history, "steps_log": run.steps_log, "epoch_totals": run.totals,
               "plan": run.plan.to_json() if run.plan else None,
               "config": {k: str(v) for k, v in config.to_json().items()}})
    save_checkpoint(config.output, name, state, architecture=model.architecture(), model_name=model.model_name)


def resume_run(trainer: Trainer, config: TrainConfig, num_classes: int) -> RunState:
    """The state of the run in ``config.output`` (the trainer loaded with it), or a fresh one."""
    if config.resume and finish_interrupted_save(config.output, "last"):
        log.info("finished the last checkpoint's save in %s, which was interrupted between its two files",
                 config.output)
    if not (config.output / "last.safetensors").exists():
        if config.resume:
            log.info("nothing to resume in %s: starting afresh", config.output)
        return RunState()
    state = load_checkpoint(config.output, "last")
    saved_classes = read_architecture(config.output / "last.safetensors")[1].get("num_classes")
    if saved_classes is not None and saved_classes != num_classes:
        raise TrainingError(f"the checkpoint in {config.output} has {saved_classes} classes but the data has "
                            f"{num_classes}: use another --output, or the data it was trained on")
    trainer.model.load_state_dict(state.model)
    trainer.optimizer.load_state_dict(state.optimizer)
    if trainer.ema is not None and state.ema is not None:
        trainer.ema.module.load_state_dict(state.ema)
    if state.grad_scaler:
        trainer.scaler.load_state_dict(state.grad_scaler)
    restore_rng_state(state.rng)
    log.info("resumed %s at epoch %d, step %d", config.output, state.epoch, state.step)
    plan = state.extra.get("plan")
    return RunState(state.epoch, state.step, state.position, state.best_score, state.extra.get("history", []),
                    state.extra.get("steps_log", []), state.extra.get("epoch_totals", RunState().totals),
                    SchedulePlan(**plan) if plan else None)


# --- building a run ----------------------------------------------------------------------------------

def build_trainer(config: TrainConfig, recipe: Recipe, model: nn.Module, device: torch.device,
                  distributed: Distributed) -> Trainer:
    model = model.to(device)
    if config.sync_bn and distributed.world_size > 1:
        if device.type == "cpu":
            raise InvalidArgumentError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Trainer(model, make_optimizer(recipe, model), torch.amp.GradScaler(device.type,
                   enabled=recipe.precision == "fp16"), ModelEMA(model, recipe.ema_decay) if recipe.ema_decay else None)


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    if recipe.optimizer == "rmsprop":
        # TensorFlow's RMSprop defaults (decay 0.9, epsilon 1.0 in the Inception recipes' slim code use 1.0).
        return torch.optim.RMSprop(groups, lr=recipe.lr, alpha=0.9, eps=1.0, momentum=recipe.momentum)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    raise InvalidArgumentError(f"unknown optimizer {recipe.optimizer!r}; available: {', '.join(OPTIMIZERS)}")


def start_phase(trainer: Trainer, run: RunState, config: TrainConfig, recipe: Recipe,
                distributed: Distributed) -> tuple[nn.Module, nn.Module]:
    """Training mode, and what trains in the phase of this step (the classifier alone for the first
    ``head_steps``); returns the module to step and its (DDP-wrapped, compiled) forward. DDP is wrapped per phase:
    it fixes the set of parameters it reduces when it is built."""
    trainer.model.train()
    set_trainable(trainer.model, head_only=run.step < recipe.head_steps, freeze=config.freeze,
                  freeze_bn=recipe.freeze_bn)
    wrapped = DistributedDataParallel(trainer.model) if distributed.world_size > 1 else trainer.model
    return wrapped, torch.compile(wrapped) if config.compile else wrapped


def settle_numerics(config: TrainConfig, recipe: Recipe, device: torch.device,
                    distributed: Distributed) -> tuple[Recipe, PrecisionChoice]:
    """The recipe with its precision resolved (``auto``: the machine's fastest native one, said once), deterministic
    kernels where asked, and every random generator seeded."""
    precision = choose_precision(recipe.precision, device)
    if distributed.is_main:
        log.info("%s", precision.describe())
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(config.seed + distributed.rank)
    return replace(recipe, precision=precision.name), precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the loop ----------------------------------------------------------------------------------------

def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run in ``config.output``. Returns the final metrics, the per-epoch history and the
    step log (``steps_log``: loss and learning rate every 20 steps, as in ``metrics.jsonl``), both from the start
    of the run, resumed or not."""
    recipe = config.resolved_recipe()
    distributed, device = init_distributed()
    recipe, precision = settle_numerics(config, recipe, device, distributed)

    task = task_for(config)
    recipe = task.adopt_weights_preprocessing(recipe)
    train_set, val_set = task.datasets(recipe)
    accumulation = config.grad_accumulation
    recipe = fit_batch(recipe, len(train_set), explicit=config.batch_size is not None, accumulation=accumulation,
                       world_size=distributed.world_size)
    train_sampler, val_sampler = samplers(len(train_set), len(val_set), config, recipe, distributed)
    batch_size = recipe.batch_size
    micro_per_epoch = len(train_sampler) // batch_size // accumulation * accumulation
    steps_per_epoch = micro_per_epoch // accumulation
    recipe, length = fit_epochs(recipe, steps_per_epoch, explicit=config.epochs is not None)
    global_batch = batch_size * accumulation * distributed.world_size
    num_classes = len(train_set.classes)
    weights = task.class_weights(train_set, recipe)
    trainer = build_trainer(config, recipe, task.build_model(recipe, num_classes, train_set.in_chans), device,
                            distributed)
    model, ema = trainer.model, trainer.ema
    run = resume_run(trainer, config, num_classes) if config.resume else RunState()
    record_config = functools.partial(write_run_config, config, recipe, precision, train_set, task, length)
    if distributed.is_main:
        record_config(run.plan)
    logger = MetricsLogger(config.output, enabled=distributed.is_main)
    started = time.monotonic()
    schedule = Schedule(recipe, steps_per_epoch, config.max_steps, run.plan,
                        BudgetPlanner.for_run(recipe, config.max_minutes, started, steps_per_epoch, run.step, run.plan),
                        on_plan=functools.partial(adopt_plan, run, record_config, distributed))
    val_loader = make_loader(val_set, val_sampler, batch_size, config.workers, collate_fn=task.collate())
    batch_options = {"mixer": batch_mixer(recipe, num_classes), "accumulation": accumulation,
                     "class_weights": None if weights is None else weights.to(device),
                     "ignore_index": task.ignore_index, "lovasz_weight": recipe.lovasz_weight,
                     "label_stride": recipe.label_stride}
    # A resumed run may have nothing left to do.
    stop_reason = "finished" if run.epoch >= schedule.epochs or run.step >= schedule.total_steps else None

    while stop_reason is None:
        train_sampler.set_epoch(run.epoch)
        train_sampler.set_start(run.position)
        loader = make_loader(train_set, train_sampler, batch_size, config.workers, drop_last=True,
                             collate_fn=task.collate())
        wrapped, forward = start_phase(trainer, run, config, recipe, distributed)
        micro = run.position // batch_size  # micro-batches of this epoch already done
        bar = tqdm(total=steps_per_epoch, initial=micro // accumulation, unit="step",
                   desc=f"epoch {run.epoch + 1}/{schedule.epochs}",
                   disable=not (config.progress and distributed.is_main), dynamic_ncols=True)
        batches = iter(loader)
        while micro < micro_per_epoch and stop_reason is None:
            images, labels, num_skipped = next(batches)
            micro += 1
            run.position += batch_size
            run.totals["skipped"] += num_skipped
            last_micro_step = micro % accumulation == 0
            # Gradients are all-reduced once per optimizer step, on its last micro-batch.
            sync = contextlib.nullcontext() if last_micro_step or distributed.world_size == 1 else wrapped.no_sync()
            if len(labels):
                with sync:
                    micro_step(forward, images, labels, run, trainer, config, recipe, device, batch_options)
            if not last_micro_step:
                continue
            lr = recipe.learning_rate(run.step, steps_per_epoch, global_batch, schedule.total_steps)
            optimizer_step(model, trainer.optimizer, trainer.scaler, lr=lr, clip_grad_norm=recipe.clip_grad_norm)
            run.step += 1
            if run.step == recipe.head_steps:  # the classifier-alone phase ends: everything trains from here
                wrapped, forward = start_phase(trainer, run, config, recipe, distributed)
            if ema is not None:
                ema.update(model, run.step)
            if schedule.after_step(run.step, run.epoch, lambda: time_evaluation(
                    task, ema.module if ema is not None else model, val_set, len(val_loader), batch_size, device,
                    recipe.precision, config.channels_last)):
                bar.set_description(f"epoch {run.epoch + 1}/{schedule.epochs}")
            bar.update(1)
            bar.set_postfix(loss=f"{run.train_loss():.3f}", lr=f"{lr:.4g}")
            if run.step % 20 == 0:
                record = {"step": run.step, "epoch": run.epoch + micro / micro_per_epoch,
                          "train_loss": run.train_loss(), "lr": lr}
                run.steps_log.append(record)
                logger.log(record)
            stop_reason = stop_check(config, run, schedule.total_steps, started, mid_epoch=micro < micro_per_epoch)
            if stop_reason is None and run.step % config.checkpoint_every == 0 and distributed.is_main:
                save_run("last", run, trainer, config)
        bar.close()
        if micro == micro_per_epoch:  # the epoch is complete: evaluate, record, checkpoint
            end_epoch(run, trainer, task, config, recipe, val_loader, num_classes, device, distributed, logger,
                      started)
            schedule.after_epoch(run.epoch, run.step)
            if stop_reason is None and (run.epoch >= schedule.epochs or run.step >= schedule.total_steps):
                stop_reason = "finished"
        if distributed.is_main:
            save_run("last", run, trainer, config)

    logger.close()
    if distributed.is_main and run.history:
        plot_history(run.history, config.output / "curves.png", accuracy=task.accuracy)
    if distributed.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"output": str(config.output), "epochs": run.epoch, "steps": run.step, f"best_{task.score}": run.best_score,
            "history": run.history, "steps_log": run.steps_log, "stopped": stop_reason}


def adopt_plan(run: RunState, record_config: Callable[[SchedulePlan], None], distributed: Distributed,
               plan: SchedulePlan) -> None:
    """Keep the schedule planned for a time budget in the run's state (its checkpoints), say so, record it."""
    run.plan = plan
    if distributed.is_main:
        log.info("schedule planned: %s", plan.describe())
        record_config(plan)


def write_run_config(config: TrainConfig, recipe: Recipe, precision: PrecisionChoice, train_set: Any, task: Any,
                     length: RunLength, plan: SchedulePlan | None) -> None:
    """config.json: the options, the resolved recipe and the steps it makes of the data, the classes, the precision
    chosen and why, the machine it was chosen on, and the schedule planned for a time budget."""
    write_text_atomic(config.output / "config.json", json.dumps(
        {"train": config.to_json(), "recipe": asdict(recipe), "steps": length.to_json(), "classes": train_set.classes,
         "in_chans": train_set.in_chans, **task.run_info(), "precision": precision.to_json(),
         "machine": probe().line(), "schedule_plan": plan.to_json() if plan else None}, indent=2))


def micro_step(forward: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: RunState, trainer: Trainer,
               config: TrainConfig, recipe: Recipe, device: torch.device, options: dict[str, Any]) -> None:
    """Forward and backward of one micro-batch (mixed by MixUp/CutMix where on); stops on a non-finite loss."""
    images, labels = to_device(images, labels, device, config.channels_last)
    output_size = None
    if options["label_stride"] > 1:
        labels = sample_labels(labels, options["label_stride"])
        output_size = tuple(labels.shape[-2:])
    images, targets = (images, labels) if options["mixer"] is None else options["mixer"](images, labels)
    loss, logits = forward_backward(forward, images, targets, precision=recipe.precision, scaler=trainer.scaler,
                                    label_smoothing=recipe.label_smoothing, accumulation=options["accumulation"],
                                    class_weights=options["class_weights"], ignore_index=options["ignore_index"],
                                    lovasz_weight=options["lovasz_weight"], output_size=output_size)
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss.item()}) at step {run.step + 1} (epoch {run.epoch + 1}); the "
                            f"last good checkpoint in {config.output} is kept: lower the learning rate or use "
                            "--clip-grad-norm")
    run.count_batch(loss, logits, labels, options["ignore_index"])


def stop_check(config: TrainConfig, run: RunState, total_steps: int, started: float, mid_epoch: bool) -> str | None:
    """Why the run stops after this step, or None. The last step of the run, when it ends an epoch, is a normal
    finish (after that epoch's evaluation), not a stop."""
    if config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes:
        return f"time limit of {config.max_minutes} minutes"
    if run.step >= total_steps and mid_epoch:
        return f"max_steps={config.max_steps}"
    return None


def end_epoch(run: RunState, trainer: Trainer, task: Any, config: TrainConfig, recipe: Recipe, val_loader: Any,
              num_classes: int, device: torch.device, distributed: Distributed, logger: MetricsLogger,
              started: float) -> None:
    """Evaluate (the EMA weights where there are some), record the epoch, keep the best weights (by the task's
    score: top-1, or mIoU)."""
    evaluated = trainer.ema.module if trainer.ema is not None else trainer.model
    metrics = task.evaluate(evaluated, val_loader, num_classes, device, recipe.precision, config.channels_last,
                            distributed.world_size)
    record = {"epoch": run.epoch + 1, "step": run.step, "train_loss": run.train_loss(),
              f"train_{task.accuracy}": run.totals["correct"] / max(run.totals["seen"], 1), **task.record(metrics),
              "skipped_images": run.totals["skipped"] + metrics["skipped"],
              "minutes": (time.monotonic() - started) / 60}
    run.history.append(record)
    logger.log(record)
    if distributed.is_main:
        log.info("epoch %d: %s", run.epoch + 1, task.describe(metrics))
    run.new_epoch()
    score = metrics[task.score]
    if run.best_score is None or score > run.best_score:
        run.best_score = score
        if distributed.is_main:
            save_run("best", run, trainer, config, evaluated.state_dict() if trainer.ema is not None else None)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device)

