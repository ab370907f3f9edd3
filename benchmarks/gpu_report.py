"""BENCHMARKS.md's GPU section, from a run of benchmarks/gpu.py: how to run it and, once it has run, its tables.

benchmarks/gpu.py replaces the section after a run; benchmarks/inference.py, which regenerates the whole page, puts
the section of the recorded run (benchmarks/results/gpu.json) at its end, or the text saying it has not run yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xception.benchmark import Result, results_to_markdown
from xception.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
HEADING = "## GPU"
BUDGET_S = 420.0  # the default budget: with the process's start, the run ends within 8 minutes
# The run's sections, in the order they are measured and shown.
SECTIONS = {"inference": "Inference, eager", "train": "Training step, bf16 autocast",
            "deeplab": "DeepLabV3+ (deeplabv3plus_xception65, 21 classes, output stride 16)",
            "compiled": "Inference, torch.compile"}


def section_lines(payload: dict[str, Any] | None) -> list[str]:
    """BENCHMARKS.md's GPU section: how to run the benchmark and, once it has run, its tables."""
    lines = [f"{HEADING}" + ("" if payload else " (prepared, not run yet)"), "",
             f"`python benchmarks/gpu.py` measures, on one CUDA GPU within a budget of {BUDGET_S:.0f} s "
             "(`--budget-s`; with the process's start, under 8 minutes): inference "
             "at batch 1, 32 and 256 in fp32, bf16 and fp16 autocast, ours (`create_model(\"xception\")`) against "
             "timm's `legacy_xception`, both memory layouts, timed interleaved on the same input batch; a training "
             "step with bf16 autocast at batch 64 (`xception.training.step.train_step` on each model, SGD); "
             "DeepLabV3+ (`deeplabv3plus_xception65`, 21 classes, output stride 16) frames per second at 513x513; "
             "then inference compiled with `torch.compile` (Inductor, static shapes, channels_last), pair by pair in "
             "priority order while the budget fits two more compilations. It writes `benchmarks/results/gpu.json` "
             "(GPU, driver, CUDA, cuDNN and torch versions, every measurement) and replaces this section with the "
             "tables; what did not fit or could not run is listed with the reason. `python benchmarks/gpu.py "
             "--dry-run` runs the same code on the CPU with tiny sizes into a temporary folder (the default test "
             "suite does).", ""]
    if not payload:
        return [*lines, "It has not run on a GPU yet: there are no numbers here until it does.", ""]
    described = payload["machine"]
    shown = ("gpu_memory_gib", "compute_capability", "driver", "cuda", "cudnn", "timm", "host")
    lines += [f"{'Dry run on the CPU' if payload['dry_run'] else described['device']}: "
              + ", ".join(f"{key} {described[key]}" for key in shown if described.get(key) is not None)
              + f". Date: {payload['date']}; the run took {payload['elapsed_s']:.0f} s"
              + (f" and stopped early ({payload['stopped']})." if payload.get("stopped") else "."), ""]
    if described.get("tf32_convolutions"):
        lines += ["fp32 convolutions run in TF32 (PyTorch's default for cuDNN) while the fp32 matmul limit is measured "
                  "without it, so fp32's `% of peak` can pass 100.", ""]
    limits = payload.get("limits")
    for name, title in SECTIONS.items():
        rows = [Result(**{**row, "img_size": tuple(row["img_size"])}) for row in payload["sections"].get(name, [])]
        if rows:
            lines += [f"### {title}", "", results_to_markdown(rows, limits), ""]
    return lines


def replace_section(path: Path, lines: list[str]) -> None:
    """Replace the "## GPU" section of the Markdown file ``path`` (up to the next "## " heading), or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    page = text.splitlines()
    start = next((i for i, line in enumerate(page) if line.startswith(HEADING)), None)
    if start is None:
        page = [*page, "", *lines]
    else:
        end = next((i for i in range(start + 1, len(page)) if page[i].startswith("## ")), len(page))
        page = [*page[:start], *lines, *page[end:]]
    write_text_atomic(path, "\n".join(page).rstrip("\n") + "\n")


def section_from_results(path: Path = RESULTS / "gpu.json") -> list[str]:
    """The GPU section from a recorded run (benchmarks/inference.py puts it on the page it regenerates)."""
    payload = json.loads(path.read_text()) if path.exists() else None
    return section_lines(None if payload is None or payload.get("dry_run") else payload)


