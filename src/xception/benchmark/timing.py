"""What one benchmark run is, and how it is timed.

- A *candidate* is one model in one memory layout. Its ``step`` runs one iteration: a forward pass under
  ``torch.inference_mode`` (inference) or :func:`xception.training.step.train_step`, the step ``xception train``
  runs (train: forward, cross-entropy on random labels, backward, SGD step). Every iteration is timed with
  ``time.perf_counter`` after a device synchronisation, so p50/p90 are per-batch latencies (per-image latencies
  at batch 1).
- Throughput is the median over ``repeats`` timed runs of ``images / run time``. The median, not the mean,
  so that one run disturbed by another process does not move the result.
- :func:`run_interleaved` times several candidates in the same process and *interleaves* them: each repeat runs
  every candidate once, in turn, so thermal or frequency drift and noisy neighbours hit all of them alike.
- Parameters and MACs come from :func:`xception.summary.summarize` (convolutions and linear layers, one
  image); a model it cannot run gets its parameter count only. FLOPs are ``2 * MACs`` per image for
  inference and ``6 * MACs`` for training (the backward pass costs about twice the forward), which
  :func:`machine_limits` turns into a fraction of the machine's matmul throughput.
- Peak memory is taken over each candidate's warm-up, which runs it alone from its first call. On CUDA it is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (everything allocated, weights
  included). On the CPU it is the growth of the resident set over its size at the start: Linux lets a
  process reset its RSS high-water mark, so each candidate gets its own peak; elsewhere ``ru_maxrss`` is a
  high-water mark for the whole process, so a candidate that stays below an earlier peak reports no growth
  (an underestimate for every candidate but the first).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..hardware import probe
from ..models import create_model
from ..precision import AUTO, PRECISIONS, TRAINING_PRECISIONS, autocast, choose_precision
from ..summary import summarize
from ..training.step import train_step

Mode = Literal["inference", "train"]
Device = Literal["cpu", "cuda"]

# Deployed candidates: a precision, "+compile" for torch.compile with frozen weights (int8 always compiles).
DEPLOY_CANDIDATES = ("fp32", "fp32+compile", "bf16", "bf16+compile", "int8")
MODES = ("inference", "train")
DEVICES = ("cpu", "cuda")
# SGD as in the paper's ImageNet runs; the values only need to make the step a real update.
LEARNING_RATE, MOMENTUM = 0.045, 0.9


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run and how long to time it. Every field maps to one command-line option.

    Each timed run makes at least ``iterations`` iterations and keeps going until ``min_run_time``
    seconds have passed, so a fast model gets enough samples without a slow one taking forever.
    """

    model: str = "xception"
    model_options: dict[str, Any] = field(default_factory=dict)  # create_model keywords, e.g. middle_repeats=0
    batch_size: int = 1
    img_size: int | tuple[int, int] = 299  # stored as (height, width)
    # "auto" (resolved here: the machine's fastest native precision) or one of TRAINING_PRECISIONS; bf16 and fp16
    # run under torch.autocast on the device
    precision: str = AUTO
    channels_last: bool = False
    compile: bool = False  # torch.compile with its default mode; the first call is reported as compile time
    mode: Mode = "inference"
    warmup: int = 3  # untimed iterations per candidate before the timed runs
    repeats: int = 5  # timed runs per candidate
    iterations: int = 10  # minimum iterations per timed run
    min_run_time: float = 0.0  # minimum seconds per timed run
    device: Device = "cpu"
    num_threads: int | None = None  # torch intra-op threads during the benchmark; None keeps the current setting
    # compare() also times ours as xception.optimize_for_inference makes it, for each of these DEPLOY_CANDIDATES
    # (inference only), beside the eager candidates: BN folded, layout by measurement, bf16 weights or int8
    # (calibrated on random images: speed does not depend on the calibration), compiled where "+compile" says so.
    deploy: tuple[str, ...] = ()
    precision_reason: str = field(default="", init=False)  # set from the resolved precision

    def __post_init__(self) -> None:
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
            raise InvalidArgumentError(f"img_size must be a positive int or (height, width), got {self.img_size!r}")
        object.__setattr__(self, "img_size", size)
        for name, choices in (("mode", MODES), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise InvalidArgumentError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        choice = choose_precision(self.precision, self.device, allowed=TRAINING_PRECISIONS)  # fp16 needs CUDA
        object.__setattr__(self, "precision", choice.name)
        object.__setattr__(self, "precision_reason", choice.reason)
        object.__setattr__(self, "deploy", tuple(self.deploy))
        if any(candidate not in DEPLOY_CANDIDATES for candidate in self.deploy):
            raise InvalidArgumentError(f"deploy candidates must be among {DEPLOY_CANDIDATES}, got {self.deploy}")
        if self.deploy and self.mode != "inference":
            raise InvalidArgumentError("deploy candidates are timed in inference mode only")
        for candidate in self.deploy:
            precision = PRECISIONS[candidate.partition("+")[0]]
            if self.device not in precision.devices:
                raise InvalidArgumentError(f"deploy candidate {candidate!r} runs on {' or '.join(precision.devices)} "
                                           f"only: {precision.why_not_elsewhere}")
        for name in ("batch_size", "repeats", "iterations"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.min_run_time < 0:
            raise InvalidArgumentError(f"warmup and min_run_time must be >= 0, got {self.warmup} and "
                                       f"{self.min_run_time}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidArgumentError(f"num_threads must be >= 1, got {self.num_threads}")


@dataclass(frozen=True)
class Result:
    """One candidate's numbers. In train mode the timed iteration is a training step, so ``images_per_s`` is
    training throughput and ``p50_ms`` the median step time. Metrics are None where they do not apply or
    the candidate was ``skipped`` (the reason)."""

    candidate: str  # "xception", "timm legacy_xception", "keras Xception", "torchvision inception_v3"
    layout: str  # "contiguous", "channels_last", or "NHWC" for Keras
    mode: str
    precision: str
    device: str
    batch_size: int
    img_size: tuple[int, int]
    compiled: bool = False
    images_per_s: float | None = None  # median over the timed runs
    p50_ms: float | None = None  # per batch, over every timed iteration
    p90_ms: float | None = None
    params: int | None = None
    macs: int | None = None  # multiply-accumulates per image (forward pass)
    peak_memory_mb: float | None = None  # over the warm-up; device memory on CUDA, RSS growth on the CPU
    compile_s: float | None = None  # the first call when compiled: compilation plus one iteration
    ratio_vs_timm: float | None = None  # images_per_s / the better timm layout's images_per_s
    ratio_vs_ours: float | None = None  # images_per_s / our model's (Table 3: relative training speed)
    fraction_of_peak: float | None = None  # achieved FLOP/s / matmul FLOP/s from machine_limits
    agreement: float | None = None  # share of held-out real images (labelled pixels) whose class is eager fp32's
    note: str = ""  # e.g. the throughput of timm's other layout
    skipped: str | None = None  # why the candidate did not run
    machine: str = ""  # xception.hardware.probe().line(): where the figure was measured
    precision_reason: str = ""  # why the config's precision (auto resolved, or as asked)


@dataclass
class Candidate:
    """One thing to time: ``step`` runs one iteration (forward pass or training step) without synchronising."""

    name: str
    layout: str
    step: Callable[[], object]
    img_size: tuple[int, int]
    params: int | None = None
    macs: int | None = None
    compiled: bool = False
    precision: str | None = None  # None: the config's
    compile_s: float | None = None  # when compiled before the benchmark (deploy); else timed at the first call
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None  # outputs of other inputs, to check agreement


def measure(model: nn.Module | Callable[[], nn.Module] | None, config: BenchmarkConfig, *, name: str | None = None,
            limits: dict[str, Any] | None = None) -> Result:
    """Time one model. ``model`` is a module, a function that builds one, or None for ``config.model``.

    The module is used as given: it is moved to the device, converted to channels-last when asked, and in
    train mode its weights are updated, so pass a copy to keep the original.
    """
    check_device(config.device)
    if config.deploy:
        raise InvalidArgumentError("measure() times one eager model; compare() times the deploy candidates beside it")
    with intra_op_threads(config.num_threads):
        if model is None:
            module = create_model(config.model, **config.model_options)
        elif isinstance(model, nn.Module):
            module = model
        else:
            module = model()
        label = name or getattr(module, "model_name", None) or type(module).__name__
        candidate = module_candidate(label, module, config)
        result = run_interleaved([candidate], config)[0]
    return with_peak_fraction(result, limits, config)


def run_interleaved(candidates: Sequence[Candidate], config: BenchmarkConfig) -> list[Result]:
    """Warm each candidate up in turn, then run ``config.repeats`` rounds, each timing every candidate once.

    Peak memory is taken over each candidate's warm-up, the only window in which one candidate runs alone
    from its first call, and which the timed runs never pay for (None without warm-up).
    """
    sync = _synchronizer(config.device)
    compile_s: dict[int, float] = {}
    peak_memory: dict[int, float | None] = {}
    for index, candidate in enumerate(candidates):
        warmups = max(config.warmup, int(candidate.compiled))  # a compiled model needs its first call
        probe = PeakMemory(config.device)
        for i in range(warmups):
            start = perf_counter()
            candidate.step()
            sync()
            if i == 0 and candidate.compiled:
                compile_s[index] = perf_counter() - start if candidate.compile_s is None else candidate.compile_s
        peak_memory[index] = probe.stop() if warmups else None

    throughputs: list[list[float]] = [[] for _ in candidates]
    latencies: list[list[float]] = [[] for _ in candidates]
    for _ in range(config.repeats):
        for index, candidate in enumerate(candidates):
            times = _timed_run(candidate, config, sync)
            throughputs[index].append(config.batch_size * len(times) / sum(times))
            latencies[index].extend(times)

    return [
        Result(
            candidate=candidate.name, layout=candidate.layout, mode=config.mode,
            precision=candidate.precision or config.precision,
            device=config.device, batch_size=config.batch_size, img_size=candidate.img_size,
            compiled=candidate.compiled, images_per_s=statistics.median(throughputs[index]),
            p50_ms=1000 * _percentile(latencies[index], 50), p90_ms=1000 * _percentile(latencies[index], 90),
            params=candidate.params, macs=candidate.macs, peak_memory_mb=peak_memory[index],
            compile_s=compile_s.get(index))
        for index, candidate in enumerate(candidates)
    ]


def _timed_run(candidate: Candidate, config: BenchmarkConfig, sync: Callable[[], None]) -> list[float]:
    """Seconds of each iteration of one run; their sum is the run time (the loop's bookkeeping aside)."""
    times: list[float] = []
    elapsed = 0.0
    while len(times) < config.iterations or elapsed < config.min_run_time:
        start = perf_counter()
        candidate.step()
        sync()
        times.append(perf_counter() - start)
        elapsed += times[-1]
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), without numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _synchronizer(device: str) -> Callable[[], None]:
    """Waits for queued device work, so that a timer measures the work and not its launch."""
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def check_device(device: str) -> None:
    """Fail with a clear message before building models for a device that is not there."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' requested, but torch.cuda.is_available() is False")


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside, restored after (None: left alone)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class PeakMemory:
    """Peak memory in MB between construction and :meth:`stop` (see the module docstring).

    On Linux the RSS high-water mark is reset at the start, after handing memory that the C allocator holds
    but does not use back to the system: otherwise a candidate would reuse what the previous one freed and
    show no growth.
    """

    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def __init__(self, device: str) -> None:
        self.method: str | None = None
        self.baseline = 0
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda"
        elif self._reset_rss_peak():
            self.method, self.baseline = "hwm", self._status_bytes("VmRSS")
        elif (maxrss := self._maxrss_bytes()) is not None:
            self.method, self.baseline = "maxrss", maxrss

    def stop(self) -> float | None:
        if self.method == "cuda":
            peak = torch.cuda.max_memory_allocated()
        elif self.method == "hwm":
            peak = self._status_bytes("VmHWM") - self.baseline
        elif self.method == "maxrss":
            peak = (self._maxrss_bytes() or 0) - self.baseline
        else:
            return None
        return max(peak, 0) / 2**20

    @classmethod
    def _reset_rss_peak(cls) -> bool:
        """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
        with suppress(OSError, AttributeError):  # glibc only
            ctypes.CDLL(None).malloc_trim(0)
        try:
            cls.CLEAR_REFS.write_text("5")
            cls._status_bytes("VmHWM")
        except (OSError, ValueError):
            return False
        return True

    @classmethod
    def _status_bytes(cls, key: str) -> int:
        for line in cls.STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # reported in kB
        raise InvalidArgumentError(f"{key} is not in {cls.STATUS}")

    @staticmethod
    def _maxrss_bytes() -> int | None:
        try:
            import resource
        except ImportError:  # Windows
            return None
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def module_candidate(name: str, module: nn.Module, config: BenchmarkConfig, *, channels_last: bool | None = None,
                     img_size: tuple[int, int] | None = None, example: torch.Tensor | None = None) -> Candidate:
    """A PyTorch image classifier or segmentation model (NCHW input, logits output) prepared as ``config`` says.

    ``channels_last`` and ``img_size`` override the config, for peers timed in both layouts or at their own size;
    ``example`` is the timed batch (default: random images).
    """
    channels_last = config.channels_last if channels_last is None else channels_last
    height, width = img_size or config.img_size
    in_chans = getattr(module, "in_chans", 3)
    module.to(config.device)
    params, macs = count_params_and_macs(module, (height, width), in_chans)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module.to(memory_format=memory_format)
    if example is None:
        example = torch.randn(config.batch_size, in_chans, height, width, device=config.device)
    x = example.contiguous(memory_format=memory_format)
    runner = torch.compile(module) if config.compile else module
    predict = None
    if config.mode == "train":
        step = _train_step(module, runner, x, config)
    else:
        module.eval()
        step = _inference_step(runner, x, config)
        predict = _forward(runner, config)
    return Candidate(name, "channels_last" if channels_last else "contiguous", step, (height, width),
                     params=params, macs=macs, compiled=config.compile, predict=predict)


def count_params_and_macs(module: nn.Module, size: tuple[int, int], in_chans: int) -> tuple[int, int | None]:
    """Parameters, and MACs per image when the summary's forward pass can run the module."""
    try:
        summary = summarize(module, size, in_chans=in_chans)
    except Exception:  # a foreign module may not take this input; its parameter count is still known
        return sum(p.numel() for p in module.parameters()), None
    return summary.total_params, summary.total_macs


def _inference_step(model: Callable[[torch.Tensor], Any], x: torch.Tensor,
                    config: BenchmarkConfig) -> Callable[[], object]:
    forward = _forward(model, config)

    def step() -> object:
        return forward(x)

    return step


def _forward(model: Callable[[torch.Tensor], Any], config: BenchmarkConfig) -> Callable[[torch.Tensor], Any]:
    """The model's inference at the config's precision."""
    def forward(x: torch.Tensor) -> Any:
        with torch.inference_mode(), autocast(config.device, config.precision):
            return model(x)

    return forward


def _train_step(module: nn.Module, runner: nn.Module, x: torch.Tensor,
                config: BenchmarkConfig) -> Callable[[], object]:
    """``xception train``'s step on ``runner`` (the module, or its compiled wrapper) with random labels."""
    # The uncompiled module counts the classes, so that the compiled one first sees the timed batch size.
    module.eval()
    with torch.no_grad():
        logits = module(x[:1])
    module.train()
    # A class per image (logits N x classes), or per pixel for segmentation (N x classes x H x W).
    labels = torch.randint(logits.shape[1], (x.shape[0], *logits.shape[2:]), device=x.device)
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler(config.device, enabled=config.precision == "fp16")

    def step() -> object:
        return train_step(runner, optimizer, scaler, x, labels, precision=config.precision)

    return step


def machine_limits(repeats: int = 5, size: int = 4096, device: str = "cpu", num_threads: int | None = None,
                   seconds: float = 3.0) -> dict[str, Any]:
    """Best-of-``repeats`` GFLOP/s of a square matmul per precision: the compute a network could reach on this
    device. Keys: ``device``, ``size`` (the largest side measured), and ``<precision>_gflops`` and
    ``<precision>_size`` for each precision of :data:`xception.precision.PRECISIONS` that runs on ``device`` (fp32,
    bf16; fp16 on CUDA; int8 on the CPU, as ``torch._int_mm``'s int8 x int8 -> int32 operations per second).

    Each precision gets about ``seconds``: the side doubles from 256 up to ``size`` while the next size still fits a
    quarter of that time, so a precision the machine runs slowly (bf16 on an AVX2 CPU: about 1 GFLOP/s, where a
    4096 matmul would take minutes) is measured on a smaller matrix, and says so in its ``_size``.

    Dense matmul is the most efficient kernel there is; a depthwise separable network moves far more bytes per
    FLOP, so a fraction well below 1 is expected, and the fraction is for comparing runs, not a target.
    Best-of-N assumes at least one quiet repeat: measure the limits in the same conditions as the models (a
    fraction above 1 means the limit was measured while something else used the machine).
    """
    check_device(device)
    limits: dict[str, Any] = {"device": device, "size": 0}
    with intra_op_threads(num_threads):
        for precision in (p for p in PRECISIONS.values() if device in p.devices):
            side, gflops = _matmul_limit(precision, device, size, repeats, seconds)
            limits[f"{precision.name}_gflops"], limits[f"{precision.name}_size"] = gflops, side
            limits["size"] = max(limits["size"], side)
    return limits


def _matmul_limit(precision: Any, device: str, largest: int, repeats: int, seconds: float) -> tuple[int, float]:
    """(side, best GFLOP/s) of ``precision``'s matmul within about ``seconds``."""
    sync = _synchronizer(device)

    def operands(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        if precision.name == "int8":
            return tuple(torch.randint(-128, 128, (side, side), device=device, dtype=torch.int8) for _ in range(2))
        return tuple(torch.randn(side, side, device=device, dtype=precision.dtype) for _ in range(2))

    # oneDNN's int8 GEMM, the kernel family int8 convolutions use
    multiply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch._int_mm if precision.name == "int8" \
        else torch.mm

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        start = perf_counter()
        multiply(a, b)
        sync()
        return perf_counter() - start

    side = min(256, largest)
    a, b = operands(side)
    multiply(a, b)  # warm-up: library initialisation and kernel selection
    sync()
    elapsed = timed(a, b)
    while side * 2 <= largest and 8 * elapsed < seconds / 4:  # twice the side: eight times the work
        side *= 2
        a, b = operands(side)
        elapsed = timed(a, b)
    best, deadline = elapsed, perf_counter() + seconds / 2
    for _ in range(repeats - 1):
        if perf_counter() > deadline:
            break
        best = min(best, timed(a, b))
    return side, 2 * side**3 / best / 1e9


def peak_fraction(result: Result, limits: dict[str, Any]) -> float | None:
    """Achieved FLOP/s over the matmul limit of the same device and precision.

    FLOPs per image: 2 * MACs for inference, 6 * MACs for a training step (backward = 2 forward passes).
    """
    limit = limits.get(f"{result.precision}_gflops")
    if limit is None or limits.get("device") != result.device or result.macs is None or result.images_per_s is None:
        return None
    flops_per_image = 2 * result.macs * (3 if result.mode == "train" else 1)
    return flops_per_image * result.images_per_s / 1e9 / limit


def with_peak_fraction(result: Result, limits: dict[str, Any] | None, config: BenchmarkConfig) -> Result:
    """``result`` with ``fraction_of_peak`` filled in from ``limits`` (where given), the machine line and the reason
    for the config's precision: every result says where and why it was measured."""
    stamped = dataclasses.replace(result, machine=probe().line(), precision_reason=config.precision_reason)
    if limits is None:
        return stamped
    return dataclasses.replace(stamped, fraction_of_peak=peak_fraction(stamped, limits))
