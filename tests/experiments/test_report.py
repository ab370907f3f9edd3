"""``xception.experiments.report``: each experiment's outputs and the report, from results made up without
training."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
from experiment_samples import FASHION, variant

from xception import experiments
from xception.experiments import ExperimentResult, ExperimentSettings, Verdict


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
    assert "| [Residual connections](#residual-connections-figure-9) | Figure 9 | held |" in text
    for name in ("order", "residual"):
        assert f"](figures/{name}.png)" in text and (tmp_path / "docs" / "figures" / f"{name}.png").is_file()
    assert "**Verdict: held.** Numbers." in text
    assert "2 distinct variants x 3 seeds x 3 epochs of 468 steps = about 0.2 hours of training" in text


def test_full_size_table_sets_the_measurement_beside_the_paper(tmp_path):
    full_size = {"batch_size": 8, "paper": experiments.PAPER_TABLE3,
                 "rows": [{"network": "xception", "params": 22_855_952, "steps_per_s": 0.4, "skipped": None},
                          {"network": "torchvision inception_v3", "params": None, "steps_per_s": None,
                           "skipped": "torchvision is not installed"}]}
    experiments.write_outputs(replace(synthetic_result("inception"), full_size=full_size), tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| Xception (this library) | 22,855,952 | 0.400 | 22,855,952 | 28 |" in table
    assert "| - | skipped: torchvision is not installed | 23,626,728 | 31 |" in table


def test_report_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no experiment results"):
        experiments.write_report(tmp_path, tmp_path / "docs")
