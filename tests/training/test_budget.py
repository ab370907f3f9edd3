"""A --max-minutes budget plans the schedule's epochs from measured speed, remakes the plan after the first epoch,
and keeps it across --resume. The arithmetic runs on a fake clock; the loop end to end on a small run."""

from __future__ import annotations

import json

import pytest
from loop_samples import TINY

from xception.training import TrainConfig, train
from xception.training import budget as budget_module
from xception.training.budget import BUDGET_SHARE, BudgetPlanner, Schedule, SchedulePlan
from xception.training.checkpoint import load_checkpoint
from xception.training.recipes import get_recipe


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(budget_module.time, "monotonic", fake)
    return fake


def run_steps(planner: BudgetPlanner, clock: FakeClock, count: int, seconds: float) -> list[bool]:
    due = []
    for _ in range(count):
        clock.now += seconds
        due.append(planner.due())
    return due


def test_first_plan_from_the_timed_steps_and_an_evaluation(clock: FakeClock) -> None:
    """100 steps an epoch at 1 s (the first two at 5 s: allocation and kernel selection, left out of the speed), 10 s
    an evaluation, 10 minutes: after 12 steps (20 s spent), k epochs take 20 + (100k - 12) + 10k seconds, and the
    most that fit 97% of 600 s is 5 (562 s; 6 would be 672)."""
    planner = BudgetPlanner(budget_minutes=10, started=0.0, steps_per_epoch=100, first_step=0)
    due = run_steps(planner, clock, 2, 5.0) + run_steps(planner, clock, 10, 1.0)
    assert due == [False] * 11 + [True]  # once, after the twelfth step
    plan = planner.plan(step=12, epoch=0, recipe_epochs=48, evaluation_seconds=10.0)
    assert (plan.epochs, plan.total_steps, plan.planned_at_step) == (5, 500, 12)
    assert plan.step_seconds == pytest.approx(1.0)
    assert 20 + (100 * 5 - 12) + 10 * 5 <= BUDGET_SHARE * 600 < 20 + (100 * 6 - 12) + 10 * 6
    assert not run_steps(planner, clock, 5, 1.0)[-1]  # never due again


def test_the_plan_never_exceeds_the_recipe_and_always_finishes_the_epoch_it_is_in(clock: FakeClock) -> None:
    planner = BudgetPlanner(budget_minutes=1000, started=0.0, steps_per_epoch=10, first_step=0)
    run_steps(planner, clock, 10, 0.01)
    assert planner.plan(step=10, epoch=0, recipe_epochs=9, evaluation_seconds=1.0).epochs == 9
    slow = BudgetPlanner(budget_minutes=1, started=0.0, steps_per_epoch=10, first_step=0)
    run_steps(slow, clock, 10, 100.0)
    assert slow.plan(step=10, epoch=3, recipe_epochs=9, evaluation_seconds=1.0).epochs == 4  # over budget: 1 more


def test_the_plan_is_remade_from_the_first_epoch_by_a_process_that_ran_it_all(clock: FakeClock) -> None:
    planner = BudgetPlanner(budget_minutes=10, started=0.0, steps_per_epoch=100, first_step=0)
    run_steps(planner, clock, 12, 2.0)  # the first steps ran slow: the first plan is cautious
    first = planner.plan(step=12, epoch=0, recipe_epochs=48, evaluation_seconds=10.0)
    clock.now = 50.0  # the whole first epoch, evaluation included, took 50 s: 11 epochs fit 582 s
    remade = planner.remake(first, epochs_done=1, step=100, recipe_epochs=48)
    assert remade is not None and (remade.epochs, remade.epoch_seconds) == (11, 50.0)
    assert remade.epochs > first.epochs
    resumed = BudgetPlanner(budget_minutes=10, started=0.0, steps_per_epoch=100, first_step=40)
    assert resumed.remake(first, epochs_done=1, step=100, recipe_epochs=48) is None  # it saw part of the epoch


def test_later_epochs_only_ever_cut_the_plan_when_the_run_falls_behind(clock: FakeClock) -> None:
    """11 epochs planned at 50 s. On time after 4 epochs (200 s): the plan stands, even with room to grow. Behind
    after 6 (330 s, 55 s an epoch): 11 would end at 605 s, past 582, so 10 (550 s)."""
    planner = BudgetPlanner(budget_minutes=10, started=0.0, steps_per_epoch=100, first_step=0)
    plan = SchedulePlan(11, 1100, 100, 0.5, 1.0, 10.0, epoch_seconds=50.0)
    clock.now = 200.0
    assert planner.remake(plan, epochs_done=4, step=400, recipe_epochs=48) is None
    clock.now = 330.0
    cut = planner.remake(plan, epochs_done=6, step=600, recipe_epochs=48)
    assert cut is not None and (cut.epochs, cut.epoch_seconds) == (10, 55.0)
    clock.now = 1000.0  # hopelessly behind: still at least the next epoch, the time limit does the rest
    assert planner.remake(plan, epochs_done=6, step=600, recipe_epochs=48).epochs == 7


def test_only_schedules_that_end_at_the_run_end_are_planned() -> None:
    for name, planned in (("compact", True), ("camvid", True), ("imagenet-paper", False)):
        planner = BudgetPlanner.for_run(get_recipe(name), 30.0, 0.0, 100, 0, None)
        assert (planner is not None) == planned, name
    assert BudgetPlanner.for_run(get_recipe("compact"), None, 0.0, 100, 0, None) is None  # no budget
    plan = SchedulePlan(3, 300, 12, 1.0, 1.0, 30.0)
    assert BudgetPlanner.for_run(get_recipe("compact"), 30.0, 0.0, 100, 0, plan) is None  # a resumed plan stays


def test_schedule_length_follows_the_plan_and_max_steps() -> None:
    plans = []
    schedule = Schedule(get_recipe("compact", epochs=9), 100, None, None, None, on_plan=plans.append)
    assert (schedule.epochs, schedule.total_steps) == (9, 900)
    assert not schedule.after_step(1, 0, lambda: pytest.fail("no planner, no evaluation timed"))
    resumed = Schedule(get_recipe("compact", epochs=9), 100, 250, SchedulePlan(4, 400, 12, 1.0, 1.0, 30.0), None,
                       on_plan=plans.append)
    assert (resumed.epochs, resumed.total_steps) == (4, 250)
    assert not plans


def two_epoch_plan(self: BudgetPlanner, step: int, epoch: int, recipe_epochs: int,
                   evaluation_seconds: float) -> SchedulePlan:
    return SchedulePlan(2, 2 * self.steps_per_epoch, step, 0.01, evaluation_seconds, self.budget_s / 60)


def test_a_planned_run_ends_its_schedule_at_the_planned_epoch_and_resumes_with_the_same_plan(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner says 2 of the recipe's 6 epochs fit (forced here: the real figure depends on the machine): the
    cosine schedule then ends at epoch 2, not 6. A run stopped mid-way keeps its plan in its checkpoint, and the
    resumed run follows it without planning again."""
    monkeypatch.setattr(BudgetPlanner, "plan", two_epoch_plan)
    monkeypatch.setattr(BudgetPlanner, "remake", lambda *args, **kwargs: None)
    common = {"model_options": TINY, "batch_size": 32, "lr": 0.4, "train_subset": 512, "val_subset": 100,
              "epochs": 6, "progress": False, "max_minutes": 60.0, "checkpoint_every": 5}
    finished = train(TrainConfig(output=tmp_path / "whole", **common))
    assert (finished["epochs"], finished["steps"], finished["stopped"]) == (2, 32, "finished")
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["schedule_plan"]["epochs"] == 2 and config["precision"]["requested"] == "auto"
    # The rate of step 20 (logged after it) is the cosine's over 32 steps (2 epochs of 16), not over 96.
    recipe = get_recipe("compact", lr=0.4, epochs=6, batch_size=32)
    (logged,) = [record["lr"] for record in finished["steps_log"] if record["step"] == 20]
    assert logged == pytest.approx(recipe.learning_rate(19, 16, 32, total_steps=32))
    assert logged < 0.7 * recipe.learning_rate(19, 16, 32, total_steps=96)

    stopped = train(TrainConfig(output=tmp_path / "split", max_steps=20, **common))
    assert stopped["stopped"] == "max_steps=20"
    assert load_checkpoint(tmp_path / "split", "last").extra["plan"]["epochs"] == 2
    monkeypatch.setattr(BudgetPlanner, "plan", lambda *args, **kwargs: pytest.fail("a resumed plan is kept"))
    resumed = train(TrainConfig(output=tmp_path / "split", resume=True, **common))
    assert (resumed["epochs"], resumed["steps"], resumed["stopped"]) == (2, 32, "finished")
