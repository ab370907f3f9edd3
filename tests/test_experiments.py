"""``xception experiment``: variants and parameter budgets, data checks, verdicts computed from numbers, outputs and
the report, the command line, tiny end-to-end runs, and (slow) the quick run of every experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xception
from xception import experiments, recipes
from xception.cli import build_parser, main
from xception.experiments import (
    DataInfo,
    ExperimentResult,
    ExperimentSettings,
    RunResult,
    VariantResult,
    Verdict,
)
from xception.predict import load_trained
from xception.recipes import get_recipe

FASHION = DataInfo("fashion-mnist", 10, 1, 60_000, 10_000, 60_000, 10_000)
COLOUR = DataInfo("folder", 5, 3, 500, 100, 500, 100)


def colour_folder(root: Path, train: int = 48, val: int = 24) -> Path:
    """Two classes of colour images of mixed sizes: reddish and bluish noise, easy to tell apart."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % 2
            pixels = rng.integers(0, 120, (30 + i % 5, 34, 3), dtype=np.uint8)
            pixels[..., 0 if label == 0 else 2] += 120
            folder = root / split / ("red" if label == 0 else "blue")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# --- names, settings, data ---------------------------------------------------------------------------

def test_unknown_experiment_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown experiment 'dropout'") as info:
        experiments.resolve_names("dropout")
    for name in ("activation", "residual", "spectrum", "order", "inception", "all"):
        assert name in str(info.value)
    assert main(["experiment", "dropout", "--output", str(tmp_path)]) == 2
    assert "valid experiments: activation, residual, spectrum, order, inception, all" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_all_names_every_experiment():
    assert experiments.resolve_names("all") == ["activation", "residual", "spectrum", "order", "inception"]
    assert experiments.list_experiments()[-1] == "all"


def test_too_small_data_is_refused_before_training(tmp_path):
    root = colour_folder(tmp_path / "data", train=10, val=4)
    with pytest.raises(ValueError, match=r"too small .* 10 images, fewer than one batch of 128"):
        experiments.run_experiments("order", ExperimentSettings(data=str(root)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"training split gives 100 images \(a subset of 100 requested\)"):
        experiments.describe_data(ExperimentSettings(train_subset=100))
    only_train = colour_folder(tmp_path / "only-train", train=4, val=0)
    with pytest.raises(FileNotFoundError, match="no split folder 'val'"):
        experiments.describe_data(ExperimentSettings(data=str(only_train)))


def test_describe_data_counts_what_the_runs_use(tmp_path):
    root = colour_folder(tmp_path, train=40, val=12)
    info = experiments.describe_data(ExperimentSettings(data=str(root), batch_size=16, train_subset=32))
    assert (info.num_classes, info.in_chans) == (2, 3)
    assert (info.train_images, info.train_available, info.val_images) == (32, 40, 12)


def test_settings_presets_and_the_command_line():
    assert experiments.make_settings() == experiments.FULL
    quick = experiments.make_settings(quick=True)
    assert quick.seeds == 1 and quick.quick and quick.train_subset and quick.val_subset
    assert experiments.make_settings(quick=True, seeds=2).seeds == 2  # an explicit count wins
    assert experiments.command_line("all", quick) == "xception experiment all --quick"
    assert experiments.command_line("order", replace(experiments.FULL, seeds=5), "out") == \
        "xception experiment order --seeds 5 --output out"
    assert experiments.command_line("order", replace(experiments.FULL, batch_size=8)).endswith("Python API)")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        ExperimentSettings(seeds=0)


def test_cli_parses_the_experiment_command():
    args = build_parser().parse_args(["experiment", "all", "--quick", "--seeds", "2", "--data", "/data/x",
                                      "--epochs", "4", "--output", "out", "--docs", "docs"])
    assert (args.name, args.quick, args.seeds, args.data, args.epochs) == ("all", True, 2, "/data/x", 4)
    assert (args.output, args.docs) == (Path("out"), Path("docs"))
    defaults = build_parser().parse_args(["experiment", "spectrum"])
    assert (defaults.data, defaults.seeds, defaults.quick, defaults.output, defaults.docs) == \
        ("fashion-mnist", None, False, Path("runs/experiments"), None)


# --- variants -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("info", [FASHION, COLOUR], ids=["fashion-mnist", "colour"])
def test_spectrum_variants_keep_the_parameter_budget(info):
    variants = experiments.spectrum_variants(info)
    assert [v.options.get("segments") for v in variants] == [1, 4, 16, None]
    target = experiments.parameter_count(experiments.baseline(""), info)
    for variant in variants:
        params = experiments.parameter_count(variant, info)
        assert abs(params - target) / target < 0.02, (variant.key, params, target)
    dense = variants[0].options
    assert dense["entry_widths"][0] < get_recipe("compact").model_options["entry_widths"][0]  # denser, narrower
    assert "widths" in variants[1].note


def test_variants_differ_only_in_their_knob():
    keys = {name: [v.key for v in experiments.EXPERIMENTS[name].variants(FASHION)]
            for name in ("activation", "residual", "order")}
    assert keys == {"activation": ["xception", "mid-relu", "mid-elu"], "residual": ["xception", "no-residual"],
                    "order": ["xception", "pointwise-first"]}
    relu = experiments.activation_variants(FASHION)[1]
    model, options = experiments.model_options(relu)
    assert model == "xception" and options == {**get_recipe("compact").model_options, "mid_activation": "relu"}


def test_shared_variants_share_their_runs_until_anything_changes(tmp_path, monkeypatch):
    settings = ExperimentSettings()
    a = experiments.run_folder(experiments.activation_variants(FASHION)[0], 0, settings, tmp_path)
    b = experiments.run_folder(experiments.order_variants(FASHION)[0], 0, settings, tmp_path)
    c = experiments.run_folder(experiments.order_variants(FASHION)[1], 0, settings, tmp_path)
    d = experiments.run_folder(experiments.order_variants(FASHION)[0], 0, replace(settings, epochs=5), tmp_path)
    monkeypatch.setitem(recipes.RECIPES, "compact", replace(recipes.RECIPES["compact"], lr=0.2))
    e = experiments.run_folder(experiments.order_variants(FASHION)[0], 0, settings, tmp_path)
    assert a == b and len({a, c, d, e}) == 4


def test_inception_baseline_matches_the_budget_and_round_trips(tmp_path):
    baseline_params, inception_params = (experiments.parameter_count(v, FASHION)
                                         for v in experiments.inception_variants(FASHION))
    assert abs(inception_params - baseline_params) / baseline_params < 0.02
    assert "inception_v3_compact" not in xception.list_models()  # a baseline, not of the family
    model = xception.create_model("inception_v3_compact", num_classes=5, in_chans=3, drop_rate=0.1).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    path = xception.save_weights(model, tmp_path / "inception.safetensors")
    again = xception.create_model("inception_v3_compact", weights=path, **model.architecture()).eval()
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(TypeError, match="unknown inception_v3_compact option"):
        xception.create_model("inception_v3_compact", middle_repeats=2)
    with pytest.raises(ValueError, match="no feature-map API"):
        xception.create_model("inception_v3_compact", features_only=True)


def test_another_model_does_not_take_the_recipes_architecture_options():
    assert get_recipe("compact", model="inception_v3_compact").model_options == {}
    assert get_recipe("compact", model="xception").model_options == get_recipe("compact").model_options


# --- verdicts ------------------------------------------------------------------------------------------

def variant(key: str, finals: list[float], label: str | None = None, params: int = 1000) -> VariantResult:
    runs = [RunResult(seed=i, output=f"runs/{key}/seed{i}", final_top1=top1, best_top1=top1, steps=100, seconds=10.0,
                      steps_per_s=10.0, curve=[[50, top1 - 0.05], [100, top1]], loss=[[20, 1.0], [100, 0.5]])
            for i, top1 in enumerate(finals)]
    return VariantResult(key, label or key, "xception", {}, params, "", runs)


def test_noise_is_the_seed_spread_or_the_sampling_error():
    a, b = variant("a", [0.90, 0.91, 0.92]), variant("b", [0.80, 0.80, 0.80])
    assert experiments.noise_level(a, b, 10_000) == pytest.approx(0.01)
    one_a, one_b = variant("a", [0.90]), variant("b", [0.80])
    expected = np.sqrt((0.9 * 0.1 + 0.8 * 0.2) / 1000)
    assert experiments.noise_level(one_a, one_b, 1000) == pytest.approx(expected)


def test_activation_verdicts_follow_the_numbers():
    def judge(none, relu, elu):
        return experiments.judge_activation([variant("xception", none, "none"), variant("mid-relu", relu, "ReLU"),
                                             variant("mid-elu", elu, "ELU")], 10_000)

    outcome, text = judge([0.91, 0.912, 0.914], [0.88, 0.881, 0.882], [0.89, 0.891, 0.892])
    assert outcome == "held" and text.startswith("None ends best: 91.20% against 89.10% for the next best (ELU)")
    assert "ELU ends above ReLU" in text
    outcome, text = judge([0.88, 0.881, 0.882], [0.91, 0.912, 0.914], [0.89, 0.891, 0.892])
    assert outcome == "not held" and text.startswith("ReLU beats none")
    outcome, text = judge([0.900, 0.910, 0.920], [0.899, 0.909, 0.919], [0.85, 0.85, 0.85])
    assert outcome == "inconclusive" and "within the noise" in text


def test_residual_order_spectrum_and_inception_verdicts():
    outcome, text = experiments.judge_residual([variant("xception", [0.9, 0.9]), variant("no-residual", [0.8, 0.8])],
                                               10_000)
    assert outcome == "held" and "at the first evaluation (step 50)" in text

    order = [variant("xception", [0.900, 0.905, 0.910]), variant("pointwise-first", [0.902, 0.904, 0.906])]
    assert experiments.judge_order(order, 10_000)[0] == "held"
    order = [variant("xception", [0.80, 0.80, 0.80]), variant("pointwise-first", [0.90, 0.90, 0.90])]
    assert experiments.judge_order(order, 10_000)[0] == "not held"

    spectrum = [variant("segments-1", [0.85] * 3, "1 segment"), variant("segments-4", [0.91] * 3, "4 segments"),
                variant("segments-16", [0.909] * 3, "16 segments"), variant("xception", [0.88] * 3, "depthwise")]
    outcome, text = experiments.judge_spectrum(spectrum, 10_000)
    assert outcome == "finding" and text.startswith("Best: 4 segments; within its noise: 16 segments")
    assert "below the best beyond the noise" in text

    full_size = {"batch_size": 8, "speed_ratio": 0.8,
                 "rows": [{"network": "xception", "params": 22_855_952, "steps_per_s": 0.4, "skipped": None},
                          {"network": "torchvision inception_v3", "params": 23_834_568, "steps_per_s": 0.5,
                           "skipped": None}]}
    outcome, text = experiments.judge_inception([variant("xception", [0.85]), variant("inception", [0.90])], 10_000,
                                                full_size)
    assert outcome == "not held" and "Xception trains at 0.80x Inception V3's speed" in text


# --- outputs and the report ------------------------------------------------------------------------------

def synthetic_result(name: str, quick: bool = True) -> ExperimentResult:
    settings = ExperimentSettings(quick=quick, seeds=2)
    variants = [variant("xception", [0.90, 0.91], "depthwise first"), variant("pointwise-first", [0.89, 0.90])]
    return ExperimentResult(
        name=name, title=experiments.EXPERIMENTS[name].title, paper=experiments.EXPERIMENTS[name].paper,
        claim=experiments.EXPERIMENTS[name].claim, settings=asdict(settings),
        data=asdict(FASHION), variants=variants, verdict=Verdict("held", "Numbers.", "Small scale."),
        full_size=None, machine="test machine", date="2026-01-01", command=f"xception experiment {name} --quick")


def test_outputs_and_report_from_synthetic_results(tmp_path):
    for name in ("order", "residual"):
        experiments.write_outputs(synthetic_result(name), tmp_path / "results" / name)
    folder = tmp_path / "results" / "order"
    assert (folder / "curves.png").stat().st_size > 0
    table = (folder / "results.md").read_text()
    assert "| depthwise first | 1,000 | 90.50 ± 0.71% | 10.00 |" in table
    assert ExperimentResult.from_json((folder / "results.json").read_text()) == synthetic_result("order")

    report = experiments.write_report(tmp_path / "results", tmp_path / "docs")
    text = report.read_text()
    assert report == tmp_path / "docs" / "paper-reproduction.md"
    assert "**This is a quick run, not the reproduction:** 2 seeds, 60,000 of 60,000 training images" in text
    assert f"`xception experiment all --docs {tmp_path / 'docs'}`" in text and "test machine" in text
    assert text.index("## Residual connections") < text.index("## Order of the depthwise")
    for name in ("order", "residual"):
        assert f"](figures/{name}.png)" in text and (tmp_path / "docs" / "figures" / f"{name}.png").is_file()
    assert "**Verdict: held.** Numbers." in text
    assert "2 distinct variants x 3 seeds x 3 epochs of 468 steps = about 0.2 hours of training" in text


def test_full_size_table_sets_the_measurement_beside_the_paper():
    full_size = {"batch_size": 8, "paper": experiments.PAPER_TABLE3,
                 "rows": [{"network": "xception", "params": 22_855_952, "steps_per_s": 0.4, "skipped": None},
                          {"network": "torchvision inception_v3", "params": None, "steps_per_s": None,
                           "skipped": "torchvision is not installed"}]}
    table = experiments.full_size_table(full_size)
    assert "| Xception (this library) | 22,855,952 | 0.400 | 22,855,952 | 28 |" in table
    assert "| - | skipped: torchvision is not installed | 23,626,728 | 31 |" in table


def test_report_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no experiment results"):
        experiments.write_report(tmp_path, tmp_path / "docs")


# --- end to end ---------------------------------------------------------------------------------------

TINY = ExperimentSettings(seeds=2, epochs=2, batch_size=16, benchmark=False)


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
    monkeypatch.setattr(experiments, "train", lambda config: pytest.fail("trained a finished run again"))
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
