"""``xception.experiments.runner`` and ``xception experiment``: names and data checked before anything trains, the
run cache's keys, tiny end-to-end runs, and (slow) the quick run of every experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from experiment_samples import FASHION, colour_folder

import xception
from xception import experiments
from xception.cli import build_parser, main
from xception.experiments import ExperimentSettings, runner
from xception.inference import load_trained
from xception.training import recipes

TINY = ExperimentSettings(seeds=2, epochs=2, batch_size=16, benchmark=False)


def test_unknown_experiment_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown experiment 'dropout'") as info:
        experiments.run_experiments("dropout", TINY, tmp_path)
    for name in ("activation", "residual", "spectrum", "order", "inception", "all"):
        assert name in str(info.value)
    assert main(["experiment", "dropout", "--output", str(tmp_path)]) == 2
    assert "valid experiments: activation, residual, spectrum, order, inception, all" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_all_runs_every_experiment_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_run_experiment", lambda name, *args: name)
    settings = replace(TINY, data=str(colour_folder(tmp_path / "data")))
    assert experiments.run_experiments("all", settings, tmp_path / "out") == \
        ["activation", "residual", "spectrum", "order", "inception"]
    # all: the Xception paper's experiments; the segmentation one runs by name only
    assert list(experiments.EXPERIMENTS) == [*experiments.EXPERIMENT_NAMES, *experiments.SEGMENTATION_EXPERIMENTS]


def test_too_small_data_is_refused_before_training(tmp_path):
    root = colour_folder(tmp_path / "data", train=10, val=4)
    with pytest.raises(ValueError, match=r"too small .* 10 images, fewer than one batch of 128"):
        experiments.run_experiments("order", ExperimentSettings(data=str(root)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_parses_the_experiment_command():
    args = build_parser().parse_args(["experiment", "all", "--quick", "--seeds", "2", "--data", "/data/x",
                                      "--epochs", "4", "--output", "out", "--docs", "docs"])
    assert (args.name, args.quick, args.seeds, args.data, args.epochs) == ("all", True, 2, "/data/x", 4)
    assert (args.output, args.docs) == (Path("out"), Path("docs"))
    defaults = build_parser().parse_args(["experiment", "spectrum"])
    assert (defaults.data, defaults.seeds, defaults.quick, defaults.output, defaults.docs) == \
        (None, None, False, Path("runs/experiments"), None)  # None: the experiment's data (Fashion-MNIST, CamVid)


def test_shared_variants_share_their_runs_until_anything_changes(tmp_path, monkeypatch):
    # The cache key is not visible from the public API short of training, so this reads the folder directly.
    settings = ExperimentSettings()
    activation, order = (experiments.EXPERIMENTS[name].variants(FASHION) for name in ("activation", "order"))
    a = runner._run_folder(activation[0], 0, settings, tmp_path)
    b = runner._run_folder(order[0], 0, settings, tmp_path)
    c = runner._run_folder(order[1], 0, settings, tmp_path)
    d = runner._run_folder(order[0], 0, replace(settings, epochs=5), tmp_path)
    monkeypatch.setitem(recipes.RECIPES, "compact", replace(recipes.RECIPES["compact"], lr=0.2))
    e = runner._run_folder(order[0], 0, settings, tmp_path)
    assert a == b and len({a, c, d, e}) == 4


def test_order_on_a_colour_folder_end_to_end(tmp_path, one_thread, monkeypatch):
    root = colour_folder(tmp_path / "data")
    lines: list[str] = []
    [result] = experiments.run_experiments("order", replace(TINY, data=str(root)), tmp_path / "out",
                                           report=lines.append)
    assert [v.key for v in result.variants] == ["xception", "pointwise-first"]
    assert len(lines) == 4 and all("val top-1" in line for line in lines)
    for v in result.variants:
        assert len(v.runs) == 2 and all(len(run.curve) == 2 and run.steps == 6 for run in v.runs)
        assert all(run.curve[-1][0] == 6 and 0 <= run.final_top1 <= 1 and run.steps_per_s for run in v.runs)
    assert result.verdict.outcome in ("held", "not held") and "48 training" in result.verdict.caveats
    for name in ("curves.png", "results.md", "results.json"):
        assert (tmp_path / "out" / "order" / name).is_file()

    # Finished runs are read back, not trained again.
    monkeypatch.setattr(runner, "train", lambda config: pytest.fail("trained a finished run again"))
    [again] = experiments.run_experiments("order", replace(TINY, data=str(root)), tmp_path / "out")
    assert [v.finals for v in again.variants] == [v.finals for v in result.variants]


def test_inception_experiment_trains_the_baseline_through_train(tmp_path, one_thread):
    settings = replace(TINY, seeds=1, train_subset=64, val_subset=64)
    [result] = experiments.run_experiments("inception", settings, tmp_path)
    inception = result.variants[1]
    assert inception.model == "inception_v3_compact" and inception.runs[0].steps == 8
    loaded = load_trained(inception.runs[0].output)  # the checkpoint rebuilds the baseline from its metadata
    assert loaded.model.model_name == "inception_v3_compact" and loaded.classes[0] == "T-shirt/top"
    assert result.full_size is None
    assert result.verdict.outcome in ("inconclusive", "held (one seed: tentative)", "not held (one seed: tentative)")


@pytest.mark.slow
def test_quick_run_of_every_experiment(tmp_path):
    """The documented smoke test: `xception experiment all --quick` end to end, with the report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(xception.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, "-m", "xception", "experiment", "all", "--quick", "--output",
                                str(tmp_path / "out"), "--docs", str(tmp_path / "docs")],
                               capture_output=True, text=True, timeout=1800, env=env, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    text = (tmp_path / "docs" / "paper-reproduction.md").read_text()
    for name in experiments.EXPERIMENT_NAMES:
        result = json.loads((tmp_path / "out" / name / "results.json").read_text())
        assert result["verdict"]["outcome"].removesuffix(" (one seed: tentative)") in (
            "held", "not held", "inconclusive", "finding")
        assert f"figures/{name}.png" in text
    assert "quick run" in text
