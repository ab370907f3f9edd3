"""benchmarks/gpu.py, the prepared GPU run: its dry run takes every code path on the CPU at tiny sizes, and its
budget guard stops cleanly with what it measured. No GPU is needed (none is on the test machine)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling fashion_mnist.py, as when run
    try:
        yield importlib.import_module("gpu")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def report(gpu):
    """benchmarks/gpu_report.py: the BENCHMARKS.md section (gpu.py imports it, as does inference.py)."""
    return importlib.import_module("gpu_report")


@pytest.fixture
def page(tmp_path: Path) -> Path:
    """A copy of BENCHMARKS.md for the run to rewrite."""
    return Path(shutil.copyfile(ROOT / "BENCHMARKS.md", tmp_path / "BENCHMARKS.md"))


def rows(payload: dict, section: str) -> list[dict]:
    return payload["sections"][section]


@pytest.mark.usefixtures("one_thread")  # tiny inputs: a second thread only slows a shared CPU
def test_dry_run_takes_every_code_path(gpu, page: Path, tmp_path: Path) -> None:
    real_results = BENCHMARKS / "results" / "gpu.json"
    before = real_results.read_bytes() if real_results.exists() else None
    output = tmp_path / "out"
    assert gpu.main(["--dry-run", "--output", str(output), "--benchmarks-md", str(page)]) == 0
    payload = json.loads((output / "gpu.json").read_text())
    assert payload["dry_run"] and payload["stopped"] is None and payload["machine"]["device"] == "cpu (dry run)"
    fp16_reason = "precision 'fp16' needs device cuda"
    for section in ("inference", "train", "deeplab", "compiled"):
        for row in rows(payload, section):  # nothing failed: every row ran, or is fp16 on the CPU
            assert row["images_per_s"] or fp16_reason in row["skipped"], (section, row)

    inference = [r for r in rows(payload, "inference") if not r["skipped"]]
    assert [r["candidate"] for r in inference] == ["xception", "timm legacy_xception"]
    assert all(r["precision"] == "fp32" and r["batch_size"] == 2 and r["images_per_s"] > 0 for r in inference)
    assert inference[1]["ratio_vs_timm"] == 1.0 and inference[0]["ratio_vs_ours"] == 1.0
    assert inference[0]["macs"] and inference[0]["params"] == 22_855_952
    assert [r["precision"] for r in rows(payload, "inference") if r["skipped"]] == ["fp16"]
    train = rows(payload, "train")
    assert [(r["candidate"], r["mode"], r["precision"]) for r in train] == [
        ("xception", "train", "bf16"), ("timm legacy_xception", "train", "bf16")]
    deeplab = rows(payload, "deeplab")
    assert deeplab[0]["candidate"] == "deeplabv3plus_xception65" and deeplab[0]["images_per_s"] > 0
    compiled = rows(payload, "compiled")
    assert [r["candidate"] for r in compiled] == ["xception compiled", "timm legacy_xception compiled"]
    assert all(r["compiled"] and r["compile_s"] > 0 for r in compiled)

    text = page.read_text()
    assert text.startswith("# Benchmarks") and "## Targets" in text  # the rest of the page is kept
    section = text[text.index("## GPU"):]
    assert "Dry run on the CPU" in section and "not run yet" not in section
    for title in gpu.SECTIONS.values():
        assert f"### {title}" in section
    assert "| xception compiled | channels_last | inference | fp32 | 2 | 80x80 |" in section
    # a run brought back from another machine gives the same section
    elsewhere = Path(shutil.copyfile(ROOT / "BENCHMARKS.md", tmp_path / "elsewhere.md"))
    assert gpu.main(["--from-results", str(output / "gpu.json"), "--benchmarks-md", str(elsewhere)]) == 0
    assert elsewhere.read_text() == text
    # the real results are not touched by a dry run
    assert (real_results.read_bytes() if real_results.exists() else None) == before


def test_zero_budget_stops_cleanly_and_records_why(gpu, page: Path, tmp_path: Path) -> None:
    assert gpu.main(["--dry-run", "--budget-s", "0", "--output", str(tmp_path), "--benchmarks-md", str(page)]) == 0
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert "budget" in payload["stopped"]
    for section in gpu.SECTIONS:
        assert rows(payload, section) and all(r["skipped"] for r in rows(payload, section)), section
    assert "stopped early" in page.read_text()


def test_a_group_past_the_deadline_is_stopped(gpu, tmp_path: Path) -> None:
    run = gpu.Run(dataclasses.replace(gpu.DRY_PLAN, budget_s=0.3), tmp_path, dry_run=True)
    placeholder = gpu.label("slow", batch=1, precision="fp32", size=80, device="cpu")
    started = time.monotonic()
    [result] = run.group("inference", placeholder, lambda: time.sleep(5) or [])
    assert time.monotonic() - started < 2
    assert "budget" in result.skipped and run.stopped
    [later] = run.group("train", placeholder, lambda: pytest.fail("a group after the deadline must not run"))
    assert later.skipped == run.stopped
    assert json.loads((tmp_path / "gpu.json").read_text())["stopped"] == run.stopped


def test_compiled_pairs_are_left_out_when_the_budget_cannot_fit_them(gpu, tmp_path: Path) -> None:
    run = gpu.Run(dataclasses.replace(gpu.DRY_PLAN, first_compile_guess_s=1e6), tmp_path, dry_run=True)
    models = gpu.Models(run.plan)
    gpu.measure_compiled(run, models)
    [result] = run.sections["compiled"]
    assert result.skipped.startswith("left out:") and "two compilations" in result.skipped
    assert not models.copies  # the guard comes before anything is built
    assert run.stopped is None  # the other sections would still run


def test_a_failing_group_is_recorded_and_the_run_goes_on(gpu, tmp_path: Path) -> None:
    run = gpu.Run(gpu.DRY_PLAN, tmp_path, dry_run=True)
    placeholder = gpu.label("broken", batch=1, precision="fp32", size=80, device="cpu")

    def broken() -> list:
        raise RuntimeError("CUDA out of memory")

    [result] = run.group("deeplab", placeholder, broken)
    assert result.skipped == "failed: RuntimeError: CUDA out of memory" and run.stopped is None


def test_the_page_has_the_prepared_section(report) -> None:
    """BENCHMARKS.md's GPU section is gpu_report's own text: until a GPU run is recorded, how to run it and no
    numbers (benchmarks/inference.py, which regenerates the page, puts the same section at its end)."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    expected = "\n".join(report.section_from_results()).strip()
    section = text[text.index(report.HEADING):].strip()
    assert section == expected
    if not (BENCHMARKS / "results" / "gpu.json").exists():
        assert "has not run on a GPU yet" in section and "img/s" not in section


def test_replace_section_keeps_the_rest_of_the_page(report, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Benchmarks\n\n## A\n\na\n\n## GPU (old)\n\nold\n\n### sub\n\nold too\n\n## B\n\nb\n")
    report.replace_section(page, ["## GPU", "", "new", ""])
    assert page.read_text() == "# Benchmarks\n\n## A\n\na\n\n## GPU\n\nnew\n\n## B\n\nb\n"
    bare = tmp_path / "bare.md"
    bare.write_text("# Benchmarks\n\n## A\n")
    report.replace_section(bare, ["## GPU", "", "new"])
    assert bare.read_text() == "# Benchmarks\n\n## A\n\n## GPU\n\nnew\n"
