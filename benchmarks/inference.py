"""BENCHMARKS.md: Xception's inference and training speed against the peers on this machine, and the accuracy of
the deployed model at each precision.

    python benchmarks/inference.py [--checkpoint runs/bench-fashion-mnist] [--quick] [--results DIR] [--page FILE]

Every table is what one `xception benchmark --compare --limits` command measures (the command is printed above it):
:func:`xception.benchmark.compare` in a process of its own, run one after the other (never two at once: they share
the CPU), so each ratio comes from candidates timed interleaved in the same process. The accuracy section needs the
default trained Fashion-MNIST checkpoint (`python benchmarks/fashion_mnist.py` writes it); without one it is left
out. Writes each table to RESULTS/NAME.md (as the command's --output would) and NAME.json (as its --format json
would), the accuracy to RESULTS/deploy_accuracy.json, and the page (default BENCHMARKS.md at the repository root).

Only the precisions this machine runs natively are measured (:meth:`xception.hardware.Hardware.native_precisions`):
bf16 where the CPU has AVX512_BF16 or AMX. Elsewhere bf16 falls to reference kernels about ten times slower than
fp32, and its tables would take hours to say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from gpu_report import section_from_results
from profile_inference import report as int8_profile
from profile_training import report as training_profile

from xception.benchmark import (
    BenchmarkConfig,
    Result,
    compare,
    machine_limits,
    peak_fraction,
    results_to_json,
    results_to_markdown,
)
from xception.hardware import probe

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DEPLOY = ("fp32", "fp32+compile", "bf16", "bf16+compile", "int8")
# The fast-inference issue's targets: throughput over timm legacy_xception's best fp32 eager configuration.
TARGETS = {"fp32": 1.2, "bf16": 2.5, "int8": 3.5}
TRAINING_TARGET = 1.3  # a bf16 training step over timm's best configuration
RUNTIMES_POINTER = ["## Other runtimes", "",
                    "ONNX Runtime and OpenVINO beside ours at each precision, and what `xception deploy` chooses on "
                    "real images: [RUNTIMES.md](RUNTIMES.md), from `python benchmarks/runtimes.py` (a separate "
                    "command: it takes about 15 minutes on its own).", ""]
# The `xception benchmark` options a run may set, in the order the printed command gives them.
OPTIONS = (("--mode", "mode"), ("--deploy", "deploy"), ("--batch-size", "batch_size"),
           ("--channels-last", "channels_last"), ("--precision", "precision"), ("--warmup", "warmup"),
           ("--repeats", "repeats"), ("--iterations", "iterations"))


@dataclasses.dataclass(frozen=True)
class Run:
    """One table: the configuration and peers of one `xception benchmark --compare --limits` command."""

    name: str  # FOLDER/NAME.md and NAME.json
    title: str
    config: BenchmarkConfig
    peers: tuple[str, ...]
    folder: Path = RESULTS

    def command(self) -> str:
        """The `xception benchmark` command that measures the same table and writes it to results/NAME.md."""
        default = BenchmarkConfig()
        options = {name for _, name in OPTIONS}
        unshown = [f.name for f in dataclasses.fields(BenchmarkConfig) if f.init  # precision_reason is derived
                   and f.name not in options and getattr(self.config, f.name) != getattr(default, f.name)]
        if unshown:
            raise ValueError(f"{self.name}: the printed command would not show {unshown}")
        words = ["xception", "benchmark", "--compare", "--peers", ",".join(self.peers)]
        for flag, name in OPTIONS:
            value = getattr(self.config, name)
            if value == getattr(default, name) and name != "precision":  # auto's choice depends on the machine
                continue
            if isinstance(value, bool):
                words.append(flag)
            else:
                words += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
        words += ["--limits", "--output", str((self.folder / f"{self.name}.md").resolve().relative_to(ROOT.parent))]
        return shlex.join(words)


def native(precision: str) -> bool:
    return precision in probe().native_precisions("cpu")


def inference_runs(quick: bool, folder: Path) -> list[Run]:
    warmup, repeats, iterations = (1, 3, 2) if quick else (3, 5, 5)
    deploy = tuple(candidate for candidate in DEPLOY if native(candidate.partition("+")[0]))
    return [Run(f"inference-b{batch}", f"Inference, batch {batch}, 299x299",
                BenchmarkConfig(deploy=deploy, batch_size=batch, channels_last=True, precision="fp32", warmup=warmup,
                                repeats=repeats, iterations=iterations), ("timm", "keras"), folder)
            for batch in (1, 8)]


def training_runs(quick: bool, folder: Path) -> list[Run]:
    titles = {"fp32": "fp32", "bf16": "bf16 autocast"}
    return [Run(f"train-{precision}", f"Training step, batch 32, 299x299, {titles[precision]}",
                BenchmarkConfig(mode="train", batch_size=32, channels_last=True, precision=precision, warmup=1,
                                repeats=2 if quick else 3, iterations=1),
                ("timm", "inception_v3"), folder)
            for precision in ("fp32", "bf16") if native(precision)]


def measure_run(run: Run) -> tuple[dict[str, Any], list[Result]]:
    """What `xception benchmark --compare --limits` measures: the machine's matmul limits, then the comparison."""
    limits = machine_limits(device=run.config.device, num_threads=run.config.num_threads)
    return limits, compare(run.config, run.peers, limits=limits)


def run_benchmark(run: Run) -> tuple[dict[str, Any], list[Result]]:
    """One table, measured in a fresh process and written to results/NAME.md and NAME.json."""
    print("$", run.command(), flush=True)
    started = time.monotonic()
    # A process per table, as each `xception benchmark` command has, so that no table inherits the compiled graphs,
    # caches or allocator state of the one before it: torch.compile treats code it has seen at other shapes
    # differently, and a compiled graph of one table could be reused by the next.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        limits, results = pool.submit(measure_run, run).result()
    print(f"  {time.monotonic() - started:.0f} s", flush=True)
    (run.folder / f"{run.name}.md").write_text(results_to_markdown(results, limits) + "\n")
    (run.folder / f"{run.name}.json").write_text(results_to_json(results) + "\n")
    return limits, results


def target_lines(tables: dict[str, tuple[dict[str, Any], list[Result]]]) -> list[str]:
    """A table of each target against the best measured candidate at that precision, from the tables below, with
    what the target asks of the machine: its throughput as a share of the same run's matmul limit."""
    lines = ["| target | best measured | met | the target as a share of the matmul limit | "
             "best as a share of it |", "|---|---:|---|---:|---:|"]
    for batch in (1, 8):
        limits, results = tables.get(f"inference-b{batch}", ({}, []))
        timm = next((r.images_per_s for r in results if r.candidate == "timm legacy_xception"), None)
        if timm is None:  # not measured, or timm is not installed: no ratios to compare with the targets
            continue
        for precision, target in TARGETS.items():
            best = max((r for r in results if r.candidate.startswith("xception deploy") and r.precision == precision
                        and r.ratio_vs_timm is not None), key=lambda r: r.ratio_vs_timm or 0.0, default=None)
            if best is None or best.ratio_vs_timm is None:
                continue
            at_target = dataclasses.replace(best, images_per_s=target * timm)
            lines.append(f"| {precision} deploy, batch {batch}: >= {target}x timm | {best.ratio_vs_timm:.2f}x | "
                         f"{'yes' if best.ratio_vs_timm >= target else 'no'} | "
                         f"{share(peak_fraction(at_target, limits))} | {share(peak_fraction(best, limits))} |")
    if "train-bf16" in tables:
        ratio = tables["train-bf16"][1][0].ratio_vs_timm  # ours is the first result
        if ratio is not None:
            lines.append(f"| bf16 training step, batch 32: >= {TRAINING_TARGET}x timm's best | {ratio:.2f}x | "
                         f"{'yes' if ratio >= TRAINING_TARGET else 'no'} | - | - |")
    return lines


def share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


@torch.no_grad()
def deployed_accuracy(checkpoint: Path) -> list[dict]:
    """Top-1 of the checkpoint on the Fashion-MNIST test set: eager fp32, then deployed at each precision, with the
    share of test images on which the deployed model's top-1 class is the eager model's."""
    from xception.data import load_fashion_mnist
    from xception.inference import calibration_images, deploy_loaded, load_trained

    loaded = load_trained(checkpoint)
    images, labels = load_fashion_mnist("test")
    transform = loaded.transform()
    batch_size = 250
    test = torch.stack([transform(image[None]) for image in images])
    calibration = calibration_images(loaded, "fashion-mnist", 512)  # training images, never the test images

    def predictions(model) -> torch.Tensor:
        return torch.cat([model(test[i: i + batch_size]).argmax(1) for i in range(0, len(test), batch_size)])

    reference = predictions(loaded.model.eval())
    rows = [{"model": "eager fp32", "top1": (reference == labels).float().mean().item(), "agreement": 1.0}]
    for precision in [name for name in ("fp32", "bf16", "int8") if native(name)]:
        deployed = deploy_loaded(loaded, precision, calibration if precision == "int8" else None,
                                 batch_size=batch_size)
        predicted = predictions(deployed.model)
        rows.append({"model": f"deploy {precision}", "top1": (predicted == labels).float().mean().item(),
                     "agreement": (predicted == reference).float().mean().item()})
    return rows


def other_machines(page: Path) -> list[str]:
    """Links to the pages this script wrote on other machines (BENCHMARKS.md and results/*/BENCHMARKS.md), each with
    its machine line: the figures of one machine never stand in for another's."""
    pages = [ROOT.parent / "BENCHMARKS.md", *sorted(RESULTS.glob("*/BENCHMARKS.md"))]
    lines = []
    for other in pages:
        if other.resolve() == page.resolve() or not other.exists():
            continue
        machine_line = next((line.removeprefix("Machine: ").split(". Date: ")[0]
                             for line in other.read_text().splitlines() if line.startswith("Machine: ")), "unknown")
        link = Path(os.path.relpath(other, page.resolve().parent)).as_posix()
        lines.append(f"- [{link}]({link}): {machine_line}")
    return ["Pages recorded on other machines:", "", *lines, ""] if lines else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/bench-fashion-mnist"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier numbers)")
    parser.add_argument("--skip-training", action="store_true", help="leave out the training-step comparison")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the tables (default: "
                                                                      "benchmarks/results)")
    parser.add_argument("--page", type=Path, default=ROOT.parent / "BENCHMARKS.md", help="the page to write")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    runs = inference_runs(args.quick, args.results) + ([] if args.skip_training else
                                                       training_runs(args.quick, args.results))
    training_precision = "bf16" if native("bf16") else "fp32"
    tables = {run.name: run_benchmark(run) for run in runs}

    print("$ python benchmarks/profile_inference.py --batch-size 8", flush=True)
    inference_profile = int8_profile(8)
    profile = None
    if not args.skip_training:
        print(f"$ python benchmarks/profile_training.py --batch-size 32 --precision {training_precision}", flush=True)
        profile = training_profile(32, training_precision)
    accuracy = None
    if (args.checkpoint / "best.safetensors").exists() or args.checkpoint.is_file():
        accuracy = deployed_accuracy(args.checkpoint)
        (args.results / "deploy_accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")

    lines = [
        "# Benchmarks",
        "",
        *other_machines(args.page),
        f"Machine: {probe().line()}. Date: {date}. Regenerate everything on this page with "
        f"`{shlex.join(['python', 'benchmarks/inference.py', *sys.argv[1:]])}` (it runs the commands below one after "
        "the other; the machine should be otherwise idle). Precisions this machine does not run natively are left "
        "out (`xception env` lists the native ones).",
        "",
        "Every table is one `xception benchmark --compare` run: the candidates are timed interleaved in one process, "
        "so the ratios (`vs timm`: throughput over timm `legacy_xception`'s faster layout; `vs ours`: over our eager "
        "model) hold even when absolute times drift. `xception deploy` rows are `xception.optimize_for_inference` at "
        "the precision shown (BatchNorm folded, layout chosen by timing, bf16 weights, int8 PT2E static quantization), "
        "eager or compiled (`compile s`: the compilation time, paid once per process); the peers and `xception` rows "
        "are eager. `% of peak` is the achieved FLOP/s over the best square matmul at that precision measured in "
        "the same run (16.7 GFLOP per 299x299 image; for int8, `torch._int_mm`'s int8 operations per second).",
        "",
        "## Targets",
        "",
        "The fast-inference issue's targets, against the best of our deploy candidates at each precision (eager or "
        "compiled) in the tables below. The last two columns say what each target asks of the machine: the "
        "target's throughput, and the best measured one, in FLOP/s as a share of the best square matmul at "
        "that precision in the same run. The 1x1 convolutions that hold most of Xception's FLOPs are matrix "
        "products, so a target far above 100% cannot be met by a faster implementation of the same network, and "
        "one near it only by running every layer as fast as the best matmul.",
        "",
        *target_lines(tables),
        "",
    ]
    for run in runs:
        limits, results = tables[run.name]
        lines += [f"## {run.title}", "", f"`{run.command()}`", "", results_to_markdown(results, limits), ""]
    text, figures = inference_profile
    lines += ["## Where the int8 model's time goes", "",
              "`python benchmarks/profile_inference.py --batch-size 8`: operator self time per call of the deployed "
              "int8 model under the PyTorch profiler.", "", text, "",
              f"The int8 1x1 convolutions take {figures['pointwise_share']:.0%} of the time and the middle flow's run "
              f"at {figures['pointwise_fraction_of_limit']:.0%} of the int8 matmul limit: what is left to gain is in "
              "the other operators, and the int8 target's share of the limit in the targets table says how much "
              "of it would be needed.", ""]
    if profile is not None:
        text, figures = profile
        lines += ["## Where a training step's time goes", "",
                  f"`python benchmarks/profile_training.py --batch-size 32 --precision {training_precision}`: "
                  "operator self time per step under the PyTorch profiler, for ours and timm's, both channels_last, "
                  f"in {training_precision}.", "",
                  text, "",
                  f"Both networks run the same kernels. The 1x1 convolutions take "
                  f"{100 * figures['pointwise_share']:.0f}% of our step and already run at "
                  f"{100 * figures['pointwise_fraction_of_limit']:.0f}% of the {training_precision} matmul limit, so "
                  "a faster step can only come from the remaining operators (BatchNorm, depthwise convolutions, "
                  "ReLU, the rest): "
                  f"a {TRAINING_TARGET}x step would have to remove about "
                  f"{100 * (1 - 1 / TRAINING_TARGET) / (1 - figures['pointwise_share']):.0f}% of their time without "
                  f"changing what is computed. torch.compile, which could fuse BatchNorm and ReLU, makes the step "
                  f"{figures['compiled_speedup']:.2f}x as fast.", ""]
    if accuracy is not None:
        lines += ["## Accuracy of the deployed model", "",
                  f"The default trained checkpoint ({args.checkpoint}) on the Fashion-MNIST test set (10,000 images); "
                  "int8 calibrated on 512 training images. Agreement: share of test images whose top-1 class is the "
                  "eager fp32 model's.", "", "| model | top-1 | agreement with fp32 |", "|---|---:|---:|"]
        lines += [f"| {row['model']} | {100 * row['top1']:.2f}% | {100 * row['agreement']:.2f}% |" for row in accuracy]
        lines.append("")
    if (args.results / "RUNTIMES.md").is_file():
        lines += RUNTIMES_POINTER
    lines += section_from_results()  # benchmarks/gpu.py's section: its recorded run, or how to run it
    args.page.write_text("\n".join(lines))
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
