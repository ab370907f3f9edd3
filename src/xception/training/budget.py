"""A schedule that ends inside ``--max-minutes`` on whatever machine runs it.

A cosine or poly schedule decays to zero at its last step; a run cut off by the clock before then never reaches
the low rates where most of its accuracy is made, and the same recipe would give another result on a slower machine.
So with a time budget the run times its first steps and one small evaluation, and plans how many epochs fit: the
schedule is then laid over those epochs, and ends (evaluated and checkpointed) inside the budget. At the end of the
first epoch the plan is made once more from that epoch's measured time, evaluation and checkpoint included (the first
steps run slower than the rest, so the first plan is cautious); after each later epoch it loses epochs if the mean
epoch so far says it would overrun (a shared machine slows down). The plan is stored with the run's state, so
``--resume`` continues the same schedule; the time limit itself still stops the run if all else fails.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..data import ResumableSampler
from .data import make_loader
from .recipes import Recipe

# Steps timed before planning. The first two are left out of the speed: they pay for allocation and kernel selection.
TIMED_STEPS = 10
SKIPPED_STEPS = 2
# The plan fills this share of the budget: the rest absorbs checkpoint writes and the machine's drift.
BUDGET_SHARE = 0.97
EVALUATION_BATCHES = 3  # timed after one warm-up batch; the whole evaluation is extrapolated from them
PLANNED_SCHEDULES = ("cosine", "poly")  # the schedules that decay to zero at the run's last step


@dataclass(frozen=True)
class SchedulePlan:
    """The epochs the schedule is laid over, and the measurements they were planned from."""

    epochs: int
    total_steps: int
    planned_at_step: int  # the schedule uses ``total_steps`` from this step on (earlier steps were warm-up)
    step_seconds: float
    evaluation_seconds: float  # one whole evaluation, extrapolated
    budget_minutes: float
    epoch_seconds: float | None = None  # the mean epoch so far, once the plan is remade from it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        measured = (f"{self.epoch_seconds:.1f} s an epoch so far" if self.epoch_seconds is not None else
                    f"{self.step_seconds:.3f} s a step, {self.evaluation_seconds:.1f} s an evaluation")
        return f"{self.epochs} epochs ({self.total_steps} steps) fit --max-minutes {self.budget_minutes:g}: {measured}"


class Schedule:
    """How long the run is: the recipe's epochs, or those a time budget holds (planned by a :class:`BudgetPlanner`
    after the first steps, again after the first epoch, and cut after a later one if the run falls behind), the steps
    cut at ``max_steps``. ``on_plan`` is called with each plan, to record it."""

    def __init__(self, recipe: Recipe, steps_per_epoch: int, max_steps: int | None, plan: SchedulePlan | None,
                 planner: BudgetPlanner | None, on_plan: Callable[[SchedulePlan], None]) -> None:
        self.recipe_epochs, self.steps_per_epoch, self.max_steps = recipe.epochs, steps_per_epoch, max_steps
        self.planner, self.on_plan = planner, on_plan
        self.epochs = plan.epochs if plan is not None else recipe.epochs  # a resumed run keeps its plan
        self.plan = plan

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps or total)

    def after_step(self, step: int, epoch: int, evaluation_seconds: Callable[[], float]) -> bool:
        """Count a step; plan once enough are timed (``evaluation_seconds`` times an evaluation). True if planned."""
        if self.planner is None or not self.planner.due():
            return False
        self._adopt(self.planner.plan(step, epoch, self.recipe_epochs, evaluation_seconds()))
        return True

    def after_epoch(self, epochs_done: int, step: int) -> None:
        """Plan again from the epochs' measured time (:meth:`BudgetPlanner.remake`)."""
        if self.planner is None or self.plan is None:
            return
        remade = self.planner.remake(self.plan, epochs_done, step, self.recipe_epochs)
        if remade is not None:
            self._adopt(remade)

    def _adopt(self, plan: SchedulePlan) -> None:
        self.plan, self.epochs = plan, plan.epochs
        self.on_plan(plan)


class BudgetPlanner:
    """Times the run's first steps; :meth:`due` says when to plan, :meth:`plan` plans."""

    def __init__(self, budget_minutes: float, started: float, steps_per_epoch: int, first_step: int) -> None:
        self.budget_s = 60 * budget_minutes
        self.started = started
        self.steps_per_epoch = steps_per_epoch
        self.ran_from_start = first_step == 0  # only a process that ran every epoch knows their time
        self.timed_steps = min(SKIPPED_STEPS + TIMED_STEPS, steps_per_epoch)
        self.skipped = min(SKIPPED_STEPS, self.timed_steps - 1)
        self.steps_seen = 0
        self.clock: float | None = None

    @classmethod
    def for_run(cls, recipe: Recipe, budget_minutes: float | None, started: float, steps_per_epoch: int,
                step: int, plan: SchedulePlan | None) -> BudgetPlanner | None:
        """A planner where the run has a budget, a schedule that ends at the run's end, and no plan yet."""
        if budget_minutes is None or recipe.schedule not in PLANNED_SCHEDULES or plan is not None:
            return None
        return cls(budget_minutes, started, steps_per_epoch, step)

    def due(self) -> bool:
        """Count an optimizer step just done; True once, when enough steps are timed for the first plan."""
        self.steps_seen += 1
        if self.steps_seen == self.skipped:
            self.clock = time.monotonic()
        return self.steps_seen == self.timed_steps

    def plan(self, step: int, epoch: int, recipe_epochs: int, evaluation_seconds: float) -> SchedulePlan:
        """The most epochs (at least this one, at most the recipe's) whose steps and evaluations end inside the
        budget's share, from the time spent so far."""
        now = time.monotonic()
        start = self.clock if self.clock is not None else self.started
        step_seconds = (now - start) / max(self.steps_seen - self.skipped, 1)
        step_seconds, evaluation_seconds = agree_across_ranks(step_seconds, evaluation_seconds)
        spent = now - self.started

        def fits(epochs: int) -> bool:
            remaining = (epochs * self.steps_per_epoch - step) * step_seconds + (epochs - epoch) * evaluation_seconds
            return spent + remaining <= BUDGET_SHARE * self.budget_s

        return self._plan(fits, epoch + 1, recipe_epochs, step, step_seconds, evaluation_seconds)

    def remake(self, plan: SchedulePlan, epochs_done: int, step: int, recipe_epochs: int) -> SchedulePlan | None:
        """After the first epoch, the plan remade from that epoch's measured time; after a later one, fewer epochs
        where the mean epoch so far says the plan would overrun the budget's share. None: the plan stands (always, in
        a process that did not run the run from its start and so has no first epoch to measure). The steps already
        taken keep their rates; the rest follow the new plan."""
        if not self.ran_from_start:
            return None
        (spent,) = agree_across_ranks(time.monotonic() - self.started)
        epoch_seconds = spent / epochs_done

        def fits(epochs: int) -> bool:
            return spent + (epochs - epochs_done) * epoch_seconds <= BUDGET_SHARE * self.budget_s

        if epochs_done == 1:
            most = recipe_epochs
        elif fits(plan.epochs) or plan.epochs <= epochs_done + 1:
            return None
        else:
            most = plan.epochs - 1  # only ever fewer: a schedule that grows back and forth would jolt the rate
        remade = self._plan(fits, epochs_done + 1, most, step, plan.step_seconds, plan.evaluation_seconds)
        return replace(remade, epoch_seconds=round(epoch_seconds, 2))

    def _plan(self, fits: Callable[[int], bool], least: int, most: int, step: int, step_seconds: float,
              evaluation_seconds: float) -> SchedulePlan:
        """The most epochs from ``least`` up to ``most`` that ``fits``."""
        epochs = min(least, most)
        while epochs < most and fits(epochs + 1):
            epochs += 1
        return SchedulePlan(epochs, epochs * self.steps_per_epoch, step, round(step_seconds, 4),
                            round(evaluation_seconds, 2), self.budget_s / 60)


def agree_across_ranks(*seconds: float) -> list[float]:
    """Under DDP every rank must lay the same schedule: each measurement becomes the slowest rank's."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(seconds)
    measured = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    return measured.tolist()


def time_evaluation(task: Any, model: nn.Module, val_set: Any, batches_in_evaluation: int, batch_size: int,
                    device: torch.device, precision: str, channels_last: bool) -> float:
    """Seconds one whole evaluation takes, extrapolated from timing :data:`EVALUATION_BATCHES` batches after a
    warm-up one. Evaluation draws no random numbers and changes no weights, so the run is not disturbed."""
    count = min(len(val_set), (1 + EVALUATION_BATCHES) * batch_size)
    warm_count = min(batch_size, count)
    if count == warm_count:
        return 0.0

    def loader(first: int, end: int) -> DataLoader:
        sampler = ResumableSampler(end, shuffle=False)
        sampler.set_start(first)
        return make_loader(val_set, sampler, batch_size, 0, collate_fn=task.collate())

    task.evaluate(model, loader(0, warm_count), len(val_set.classes), device, precision, channels_last, 1)
    start = time.monotonic()
    task.evaluate(model, loader(warm_count, count), len(val_set.classes), device, precision, channels_last, 1)
    return (time.monotonic() - start) / math.ceil((count - warm_count) / batch_size) * batches_in_evaluation
