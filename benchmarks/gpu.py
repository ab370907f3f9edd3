"""The prepared GPU run: ours against timm's legacy_xception on one CUDA device, stopping cleanly within a budget.

    python benchmarks/gpu.py [--budget-s 420] [--output benchmarks/results] [--benchmarks-md BENCHMARKS.md]
    python benchmarks/gpu.py --dry-run    # the same code paths on the CPU, tiny sizes, into a temporary folder
    python benchmarks/gpu.py --from-results gpu.json   # the BENCHMARKS.md section of a run made elsewhere

Measures, in this order (the most informative first, so that a short budget loses the least):

1. inference at batch 1, 32 and 256 in fp32, bf16 and fp16 (autocast), eager: ours (``create_model("xception")``)
   and timm's ``legacy_xception``, each in both memory layouts, timed interleaved on the very same input batch;
2. a training step at batch 64 with bf16 autocast: :func:`xception.training.step.train_step` on each model (the
   step ``xception train`` runs, SGD), both layouts;
3. DeepLabV3+ (``deeplabv3plus_xception65``, 21 classes, output stride 16) frames per second at 513x513;
4. inference compiled with ``torch.compile`` (static shapes, channels_last), ours and timm's, one (precision,
   batch) pair after the other in priority order, each only if the budget still fits two compilations.

Timing is :func:`xception.benchmark.run_interleaved` (warm-up, then every candidate once per repeat, a device
synchronisation after each iteration; images/s is the median over repeats). Results are written after every group
of candidates to ``gpu.json`` (with the GPU, driver, CUDA, cuDNN and torch versions), so a run stopped from outside
keeps what it measured; at the end the "## GPU" section of BENCHMARKS.md is replaced with the tables. Whatever
does not fit the budget, or cannot run here, is recorded as skipped with the reason. A hard deadline (SIGALRM)
stops a group that overruns it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from gpu_report import BUDGET_S, SECTIONS, replace_section, section_lines

import xception
from xception.benchmark import BenchmarkConfig, Candidate, Result, machine_limits, run_interleaved
from xception.benchmark.timing import count_params_and_macs, module_candidate
from xception.files import write_text_atomic
from xception.hardware import probe
from xception.precision import autocast

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OURS, TIMM = "xception", "timm legacy_xception"
DEEPLAB = "deeplabv3plus_xception65"


@dataclass(frozen=True)
class Plan:
    """Everything the run measures and how long it may take."""

    device: str
    img_size: int
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    train_batch: int
    deeplab_size: int
    deeplab_batches: tuple[int, ...]
    layouts: tuple[str, ...]  # memory layouts of the eager candidates (compiled ones are channels_last)
    compiled: tuple[tuple[str, int], ...]  # (precision, batch), in priority order
    compile_backend: str
    first_compile_guess_s: float  # the cost assumed for a compilation before one has been timed
    timing_allowance_s: float  # the time a compiled pair needs besides its compilations
    warmup: int
    repeats: int
    iterations: int
    min_run_time: float
    budget_s: float



GPU_PLAN = Plan(device="cuda", img_size=299, batches=(1, 32, 256), precisions=("fp32", "bf16", "fp16"),
                train_batch=64, deeplab_size=513, deeplab_batches=(1, 8), layouts=("contiguous", "channels_last"),
                compiled=(("bf16", 32), ("bf16", 256), ("fp16", 32), ("fp16", 256), ("fp32", 32), ("fp32", 256),
                          ("bf16", 1), ("fp16", 1), ("fp32", 1)),
                compile_backend="inductor", first_compile_guess_s=60.0, timing_allowance_s=15.0, warmup=3,
                repeats=5, iterations=3, min_run_time=0.2, budget_s=BUDGET_S)
# Every code path at the smallest sizes: one configuration per group (fp16 is skipped with the precision table's
# reason: the CPU cannot run it), one layout, and dynamo tracing the compiled pair (the "eager" backend) without
# Inductor's code generation, which takes minutes on the CPU.
DRY_PLAN = dataclasses.replace(GPU_PLAN, device="cpu", img_size=80, batches=(2,), precisions=("fp32", "fp16"),
                               train_batch=2, deeplab_size=64, deeplab_batches=(1,), layouts=("channels_last",),
                               compiled=(("fp32", 2),), compile_backend="eager",
                               first_compile_guess_s=0.0, timing_allowance_s=0.0, warmup=1, repeats=1,
                               iterations=1, min_run_time=0.0, budget_s=300.0)


class DeadlineReached(BaseException):
    """Raised by the budget's alarm inside a group of candidates that overran the deadline. Not an Exception, as
    KeyboardInterrupt is not: handlers of ``except Exception`` in the code it interrupts must not swallow it."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextmanager
    def hard_stop(self) -> Iterator[None]:
        """Raise :class:`DeadlineReached` in the block if it runs past the deadline."""
        if self.left() <= 0:
            raise DeadlineReached

        def alarm(_signum: int, _frame: object) -> None:
            raise DeadlineReached

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, self.left())
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def device_description(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"host": probe().line(), "python": platform.python_version(), "torch": torch.__version__,
                            "xception": xception.__version__}
    with suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    if device != "cuda":
        return {**info, "device": "cpu (dry run)"}
    properties = torch.cuda.get_device_properties(0)
    driver = None
    with suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    return {**info, "device": torch.cuda.get_device_name(0), "gpu_memory_gib": round(properties.total_memory / 2**30),
            "compute_capability": f"{properties.major}.{properties.minor}", "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32_convolutions": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def label(name: str, *, batch: int, precision: str, size: int, device: str, mode: str = "inference") -> Result:
    """A row to record a group that did not run, with its reason set by :meth:`Run.group`."""
    return Result(candidate=name, layout="-", mode=mode, precision=precision, device=device, batch_size=batch,
                  img_size=(size, size))


class Run:
    """The plan, the budget, and the measurements so far, written out after every group of candidates."""

    def __init__(self, plan: Plan, output: Path, dry_run: bool) -> None:
        self.plan, self.output = plan, output
        self.started = time.monotonic()
        self.budget = Budget(plan.budget_s)
        self.sections: dict[str, list[Result]] = {name: [] for name in SECTIONS}
        self.stopped: str | None = None
        self.compile_s: list[float] = []
        self.payload: dict[str, Any] = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "dry_run": dry_run,
            "machine": device_description(plan.device), "plan": dataclasses.asdict(plan)}

    def config(self, *, batch: int, precision: str, mode: str = "inference", size: int | None = None
               ) -> BenchmarkConfig:
        """The benchmark configuration; a precision the device cannot run is refused here, with the reason."""
        plan = self.plan
        return BenchmarkConfig(batch_size=batch, img_size=size or plan.img_size, precision=precision, mode=mode,
                               device=plan.device, warmup=plan.warmup, repeats=plan.repeats,
                               iterations=plan.iterations, min_run_time=plan.min_run_time)

    def group(self, section: str, placeholder: Result, measure: Callable[[], list[Result]]) -> list[Result]:
        """Measure one group of candidates under the hard deadline. A group that cannot run here, fails or is
        stopped is recorded as ``placeholder`` with the reason; after a stop every later group is too."""
        if self.stopped:
            results = [dataclasses.replace(placeholder, skipped=self.stopped)]
        else:
            try:
                with self.budget.hard_stop():
                    results = measure()
            except DeadlineReached:
                self.stopped = f"not measured: the run reached its {self.plan.budget_s:.0f} s budget"
                results = [dataclasses.replace(placeholder, skipped=self.stopped)]
            except xception.XceptionError as error:  # cannot run here (fp16 on the CPU, a model not registered)
                results = [dataclasses.replace(placeholder, skipped=str(error))]
            except Exception as error:  # recorded, not raised: one failing group must not lose the others
                results = [dataclasses.replace(placeholder, skipped=f"failed: {type(error).__name__}: {error}")]
                if self.plan.device == "cuda":
                    torch.cuda.empty_cache()  # after an out-of-memory error, the next group starts clean
        return self.record(section, results)

    def skip(self, section: str, placeholder: Result, reason: str) -> None:
        self.record(section, [dataclasses.replace(placeholder, skipped=reason)])

    def record(self, section: str, results: list[Result]) -> list[Result]:
        self.sections[section] += results
        for r in results:
            outcome = f"skipped: {r.skipped}" if r.skipped else f"{r.images_per_s:.1f} img/s"
            print(f"  {section}: {r.candidate}, {r.layout}, {r.precision}, batch {r.batch_size}: {outcome}", flush=True)
        self.write()
        return results

    def write(self) -> None:
        self.payload.update(elapsed_s=round(time.monotonic() - self.started, 1), stopped=self.stopped,
                            sections={name: [dataclasses.asdict(r) for r in rows]
                                      for name, rows in self.sections.items()})
        write_text_atomic(self.output / "gpu.json", json.dumps(self.payload, indent=2) + "\n")


def with_ratios(results: list[Result]) -> list[Result]:
    """Each result's throughput over the best of timm's and over the best of ours in its group."""

    def best(prefix: str) -> float | None:
        return max((r.images_per_s for r in results if r.candidate.startswith(prefix) and r.images_per_s),
                   default=None)

    timm_best, ours_best = best(TIMM), best(OURS)
    return [dataclasses.replace(r, ratio_vs_timm=r.images_per_s / timm_best if timm_best else None,
                                ratio_vs_ours=r.images_per_s / ours_best if ours_best else None) for r in results]


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def shared_batch(batch: int, size: int, device: str) -> torch.Tensor:
    """One random batch per configuration: the same values for every candidate (seeded on the CPU, then moved)."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)


def inference_candidate(name: str, layout: str, module: torch.nn.Module, x: torch.Tensor, precision: str,
                        counts: tuple[int, int | None], compile_backend: str | None = None) -> Candidate:
    """A forward pass under inference mode and autocast, on the shared batch ``x`` put in ``layout``."""
    x = x.contiguous(memory_format=memory_format(layout))
    # Static shapes: one graph per batch size, as a deployment would compile it.
    runner = module if compile_backend is None else torch.compile(module, backend=compile_backend, dynamic=False)

    def step() -> object:
        with torch.inference_mode(), autocast(x.device, precision):
            return runner(x)

    return Candidate(name, layout, step, (x.shape[-2], x.shape[-1]), params=counts[0], macs=counts[1],
                     compiled=compile_backend is not None)


class Models:
    """Ours and timm's network in eval mode, a copy per memory layout, built at first use and reused by every
    inference group."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.counts: dict[str, tuple[int, int | None]] = {}
        self.copies: dict[tuple[str, str], torch.nn.Module] = {}

    def candidates(self, x: torch.Tensor, precision: str, layouts: tuple[str, ...],
                   compile_backend: str | None = None) -> list[Candidate]:
        if not self.copies:
            import timm

            plan = self.plan
            built = {OURS: xception.create_model("xception"), TIMM: timm.create_model("legacy_xception")}
            self.counts = {name: count_params_and_macs(model, (plan.img_size, plan.img_size), 3)
                           for name, model in built.items()}
            self.copies = {(name, layout): copy.deepcopy(model).to(plan.device, memory_format=memory_format(layout))
                           .eval() for name, model in built.items() for layout in plan.layouts}
        suffix = " compiled" if compile_backend else ""
        return [inference_candidate(name + suffix, layout, self.copies[name, layout], x, precision, self.counts[name],
                                    compile_backend)
                for layout in layouts for name in (OURS, TIMM)]


def measure_inference(run: Run, models: Models) -> None:
    """Eager inference: every precision and batch, ours and timm's in both layouts, interleaved."""
    plan = run.plan
    for precision in plan.precisions:
        for batch in plan.batches:
            def measure(batch: int = batch, precision: str = precision) -> list[Result]:
                config = run.config(batch=batch, precision=precision)
                x = shared_batch(batch, plan.img_size, plan.device)
                return with_ratios(run_interleaved(models.candidates(x, precision, plan.layouts), config))

            run.group("inference", label(f"{OURS}, {TIMM}", batch=batch, precision=precision, size=plan.img_size,
                                         device=plan.device), measure)


def measure_training(run: Run) -> None:
    """A training step with bf16 autocast: the library's train_step on each model, both layouts, interleaved."""
    plan = run.plan

    def measure() -> list[Result]:
        import timm

        config = run.config(batch=plan.train_batch, precision="bf16", mode="train")
        candidates = []
        for layout in plan.layouts:  # fresh models: a training step changes the weights
            for name, model in ((OURS, xception.create_model("xception")),
                                (TIMM, timm.create_model("legacy_xception"))):
                candidates.append(module_candidate(name, model, config, channels_last=layout == "channels_last"))
        return with_ratios(run_interleaved(candidates, config))

    run.group("train", label(f"{OURS}, {TIMM}", batch=plan.train_batch, precision="bf16", size=plan.img_size,
                             device=plan.device, mode="train"), measure)


def measure_deeplab(run: Run) -> None:
    """DeepLabV3+ frames per second at every precision and DeepLab batch, both layouts (skipped, with the reason,
    where the model is not registered)."""
    plan = run.plan
    state: dict[str, Any] = {}
    for precision in plan.precisions:
        for batch in plan.deeplab_batches:
            def measure(batch: int = batch, precision: str = precision) -> list[Result]:
                config = run.config(batch=batch, precision=precision, size=plan.deeplab_size)
                if "copies" not in state:
                    model = xception.create_model(DEEPLAB, num_classes=21, output_stride=16)
                    state["counts"] = count_params_and_macs(model, (plan.deeplab_size, plan.deeplab_size), 3)
                    state["copies"] = {layout: copy.deepcopy(model).to(plan.device, memory_format=memory_format(
                        layout)).eval() for layout in plan.layouts}
                x = shared_batch(batch, plan.deeplab_size, plan.device)
                return run_interleaved([inference_candidate(DEEPLAB, layout, state["copies"][layout], x, precision,
                                                            state["counts"]) for layout in plan.layouts], config)

            run.group("deeplab", label(DEEPLAB, batch=batch, precision=precision, size=plan.deeplab_size,
                                       device=plan.device), measure)


def measure_compiled(run: Run, models: Models) -> None:
    """Compiled inference, channels_last, one (precision, batch) pair after the other while the budget fits two
    more compilations (ours and timm's) and their timing."""
    plan = run.plan
    for precision, batch in plan.compiled:
        placeholder = label(f"{OURS} compiled, {TIMM} compiled", batch=batch, precision=precision,
                            size=plan.img_size, device=plan.device)
        estimate = max(run.compile_s, default=plan.first_compile_guess_s)
        needed = 2 * estimate + plan.timing_allowance_s
        if not run.stopped and run.budget.left() < needed:
            run.skip("compiled", placeholder, f"left out: {run.budget.left():.0f} s of the budget left, two "
                     f"compilations take about {2 * estimate:.0f} s")
            continue

        def measure(batch: int = batch, precision: str = precision) -> list[Result]:
            config = run.config(batch=batch, precision=precision)
            x = shared_batch(batch, plan.img_size, plan.device)
            candidates = models.candidates(x, precision, ("channels_last",), plan.compile_backend)
            return with_ratios(run_interleaved(candidates, config))

        for result in run.group("compiled", placeholder, measure):
            if result.compile_s is not None:
                run.compile_s.append(result.compile_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU with tiny sizes, "
                        "into a temporary folder unless --output is given")
    parser.add_argument("--budget-s", type=float, help=f"seconds for the whole run (default {GPU_PLAN.budget_s:.0f})")
    parser.add_argument("--output", type=Path, help="folder for gpu.json (default benchmarks/results)")
    parser.add_argument("--benchmarks-md", type=Path, help="the page whose GPU section is replaced "
                        "(default BENCHMARKS.md; in a dry run, a copy in the output folder)")
    parser.add_argument("--from-results", type=Path, metavar="GPU_JSON", help="measure nothing: write the page's "
                        "GPU section from a recorded gpu.json (one brought back from a GPU machine)")
    args = parser.parse_args(argv)
    if args.from_results:
        page = args.benchmarks_md or ROOT.parent / "BENCHMARKS.md"
        replace_section(page, section_lines(json.loads(args.from_results.read_text())))
        print(f"wrote the GPU section of {page} from {args.from_results}")
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    output = args.output or (Path(tempfile.mkdtemp(prefix="xception-gpu-dry-run-")) if args.dry_run else RESULTS)
    page = args.benchmarks_md or (output / "BENCHMARKS.md" if args.dry_run else ROOT.parent / "BENCHMARKS.md")
    if args.dry_run and args.benchmarks_md is None:
        shutil.copyfile(ROOT.parent / "BENCHMARKS.md", page)
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True  # each shape's fastest convolution algorithms, chosen in the warm-up
    # Every (precision, batch) pair compiles the same forward methods again: keep dynamo from falling back to eager.
    limits = ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit")
    for option in limits:
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 256)
    run = Run(plan, output, args.dry_run)
    print(f"{run.payload['machine']['device']}; budget {plan.budget_s:.0f} s; writing {output / 'gpu.json'}",
          flush=True)
    run.payload["limits"] = machine_limits(repeats=3, size=256 if args.dry_run else 8192, device=plan.device)
    models = Models(plan)
    measure_inference(run, models)
    measure_training(run)
    measure_deeplab(run)
    measure_compiled(run, models)
    run.write()
    replace_section(page, section_lines(run.payload))
    print(f"wrote {output / 'gpu.json'} and the GPU section of {page} in {time.monotonic() - run.started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
