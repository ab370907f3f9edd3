"""The benchmark's configuration, timing and limits. No timed assertions: the timing arithmetic is checked with a
fake clock, real runs only for positive, well-formed numbers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from benchmark_samples import CONFIG, LIMITS, TINY, check_measured, result, tiny_model

from xception.benchmark import (
    BenchmarkConfig,
    Candidate,
    PeakMemory,
    Result,
    machine_limits,
    measure,
    peak_fraction,
    run_interleaved,
)
from xception.benchmark import timing as timing_module
from xception.hardware import probe
from xception.summary import summarize
from xception.training import step as step_module

# --- configuration ----------------------------------------------------------------------------------


def test_config_normalizes_the_image_size() -> None:
    assert BenchmarkConfig(img_size=299).img_size == (299, 299)
    assert BenchmarkConfig(img_size=[240, 320]).img_size == (240, 320)


@pytest.mark.parametrize("options", [{"precision": "fp8"}, {"precision": "int8"}, {"mode": "eval"},
                                     {"device": "tpu"}, {"batch_size": 0}, {"repeats": 0}, {"img_size": (299,)},
                                     {"warmup": -1}, {"num_threads": 0}])
def test_config_rejects_bad_values(options: dict) -> None:
    with pytest.raises(ValueError):
        BenchmarkConfig(**options)


@pytest.mark.parametrize(("options", "message"), [
    ({"deploy": ("fp16",)}, "deploy candidates"), ({"deploy": ("int8+compile",)}, "deploy candidates"),
    ({"deploy": ("bf16",), "mode": "train"}, "inference mode only"),
    ({"deploy": ("int8",), "device": "cuda"}, "deploy candidate 'int8' runs on cpu only")])
def test_config_rejects_bad_deploy_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig(**options)


def test_fp16_on_cpu_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"fp16.*cuda.*bf16"):
        BenchmarkConfig(precision="fp16", device="cpu")


# --- measure ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured() -> Result:
    """One real measurement of the configured model, shared by the tests that only read it."""
    return measure(None, CONFIG, limits=LIMITS)


def test_measure_builds_the_configured_model(measured: Result) -> None:
    check_measured(measured)
    summary = summarize(tiny_model(), 71)
    assert (measured.candidate, measured.layout, measured.mode) == ("xception", "contiguous", "inference")
    # auto's choice for this machine, and where and why, in every row
    assert (measured.precision, measured.precision_reason) == (CONFIG.precision, CONFIG.precision_reason)
    assert CONFIG.precision_reason.startswith("auto: ") and measured.machine == probe().line()
    assert (measured.batch_size, measured.img_size, measured.compiled, measured.compile_s) == (2, (71, 71), False,
                                                                                              None)
    assert (measured.params, measured.macs) == (summary.total_params, summary.total_macs)
    assert measured.peak_memory_mb is not None  # Linux or any Unix: RSS


def test_measure_fills_the_fraction_of_peak(measured: Result) -> None:
    assert measured.fraction_of_peak == pytest.approx(peak_fraction(measured, LIMITS))
    assert measured.fraction_of_peak > 0


def test_measure_takes_a_factory_channels_last_bf16_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    config = dataclasses.replace(CONFIG, channels_last=True, precision="bf16", batch_size=1, num_threads=1)
    result = measure(tiny_model, config, name="mine")
    check_measured(result)
    assert (result.candidate, result.layout, result.precision) == ("mine", "channels_last", "bf16")
    assert torch.get_num_threads() == threads


def test_measure_counts_a_foreign_module() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10))
    result = measure(model, CONFIG)
    check_measured(result)
    assert result.candidate == "Sequential"
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.macs == 69 * 69 * 8 * 27 + 80


def counting_train_step(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Has the benchmark call the library's training step through a wrapper that records each call's labels and
    keywords."""
    calls: list[dict] = []

    def train_step(model, optimizer, scaler, images, labels, **options):
        calls.append({"labels": labels, "optimizer": optimizer, **options})
        return step_module.train_step(model, optimizer, scaler, images, labels, **options)

    monkeypatch.setattr(timing_module, "train_step", train_step)
    return calls


def test_train_mode_times_the_library_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_train_step(monkeypatch)
    original = tiny_model()
    trained = copy.deepcopy(original)
    result = measure(trained, dataclasses.replace(CONFIG, mode="train", precision="bf16"))
    check_measured(result)
    assert (result.mode, result.precision) == ("train", "bf16")
    assert len(calls) == CONFIG.warmup + CONFIG.repeats * CONFIG.iterations
    assert all(call["precision"] == "bf16" for call in calls)
    assert all(call["labels"] is calls[0]["labels"] for call in calls)  # drawn once: the step alone is timed
    (group,) = calls[0]["optimizer"].param_groups
    assert (type(calls[0]["optimizer"]), group["lr"], group["momentum"]) == (torch.optim.SGD, 0.045, 0.9)
    assert trained.training
    before, after = original.state_dict(), trained.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert "blocks.block1.conv1.weight" in changed  # the SGD step
    assert "head.predictions.weight" in changed
    assert "blocks.block1.conv1_bn.running_mean" in changed  # BatchNorm in training mode


def test_train_mode_draws_labels_from_a_foreign_module_s_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_train_step(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 3))
    config = dataclasses.replace(CONFIG, mode="train", batch_size=64, warmup=0, repeats=1, iterations=1)
    check_measured(measure(model, config))
    (call,) = calls
    assert call["labels"].shape == (64,)
    assert set(call["labels"].tolist()) == {0, 1, 2}  # the classes the module's output has, all of them


# --- timing arithmetic and interleaving (fake clock, fake candidates) -------------------------------


class FakeClock:
    """perf_counter that only moves when a fake candidate's step says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_candidate(name: str, clock: FakeClock, durations: list[float], calls: list[str]) -> Candidate:
    """A candidate whose iterations take ``durations`` seconds in turn, recording each call in ``calls``."""
    pending = iter(durations)

    def step() -> None:
        calls.append(name)
        clock.now += next(pending)

    return Candidate(name, "contiguous", step, (71, 71), params=1, macs=10**9)


def test_round_robin_interleaves_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing_module, "perf_counter", clock)
    candidates = [fake_candidate(name, clock, [1.0] * 7, calls) for name in "abc"]
    config = BenchmarkConfig(warmup=1, repeats=3, iterations=2)
    run_interleaved(candidates, config)
    rounds = ["a", "a", "b", "b", "c", "c"] * 3
    assert calls == ["a", "b", "c", *rounds]  # warm-ups one after another, then each repeat visits all


def test_throughput_and_latency_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing_module, "perf_counter", clock)
    # warm-up 5 s (ignored); run 1: 1 + 1 s; run 2: 1 + 3 s; run 3: 2 + 2 s
    candidate = fake_candidate("a", clock, [5, 1, 1, 1, 3, 2, 2], calls)
    (result,) = run_interleaved([candidate], BenchmarkConfig(batch_size=4, warmup=1, repeats=3, iterations=2))
    assert result.images_per_s == 2.0  # median of 8/2, 8/4, 8/4 img/s
    assert result.p50_ms == 1500.0  # iterations 1, 1, 1, 3, 2, 2 s
    assert result.p90_ms == pytest.approx(2500.0)
    assert result.compile_s is None


def test_min_run_time_extends_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing_module, "perf_counter", clock)
    candidate = fake_candidate("a", clock, [1.0] * 8, calls)
    run_interleaved([candidate], BenchmarkConfig(warmup=0, repeats=2, iterations=1, min_run_time=3.5))
    assert len(calls) == 8  # 4 iterations of 1 s reach 3.5 s, in each of 2 runs


# --- peak memory, machine limits and the fraction of peak -------------------------------------------


def test_peak_memory_sees_an_allocation() -> None:
    probe = PeakMemory("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
    peak = probe.stop()
    del block
    assert peak is not None
    if probe.method == "hwm":  # a high-water mark of this window only (Linux); ru_maxrss may hide it
        assert peak >= 60


def test_machine_limits_with_a_small_matrix() -> None:
    limits = machine_limits(repeats=2, size=128)
    assert (limits["device"], limits["size"]) == ("cpu", 128)
    assert limits["fp32_size"] == limits["bf16_size"] == limits["int8_size"] == 128
    assert limits["fp32_gflops"] > 0
    assert limits["bf16_gflops"] > 0
    assert limits["int8_gflops"] > 0
    assert "fp16_gflops" not in limits  # the precision table runs fp16 on CUDA only


def test_peak_fraction_counts_two_flops_per_mac_and_three_passes_in_training() -> None:
    limits = LIMITS
    assert peak_fraction(result(macs=10**9), limits) == pytest.approx(0.02)  # 20 GFLOP/s of 1000
    assert peak_fraction(result(macs=10**9, mode="train"), limits) == pytest.approx(0.06)
    assert peak_fraction(result(macs=10**9, precision="bf16"), limits) == pytest.approx(0.01)
    assert peak_fraction(result(macs=None), limits) is None
    assert peak_fraction(result(device="cuda"), limits) is None


# --- slow: torch.compile ----------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_reports_compile_time() -> None:
    result = measure(None, dataclasses.replace(CONFIG, compile=True, warmup=0, repeats=1, iterations=1))
    check_measured(result)
    assert result.compiled
    assert result.compile_s > 0


@pytest.mark.slow
def test_compiled_train_mode_runs_the_training_step() -> None:
    config = dataclasses.replace(CONFIG, model_options=TINY, mode="train", compile=True, warmup=0, repeats=1,
                                 iterations=1)
    result = measure(None, config)
    check_measured(result)
    assert result.compiled and result.compile_s > 0


def test_machine_limits_measure_a_slow_precision_on_a_smaller_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A precision the machine runs slowly is measured on a matrix that fits its time budget instead of taking
    minutes (bf16 on an AVX2 CPU runs near 1 GFLOP/s: a 4096 matmul would take two minutes). A fake clock and a
    fake 1-GFLOP/s matmul make the choice exact: 256 takes 0.034 s, 512 0.27 s; the next, 1024, would take 2.1 s,
    more than a quarter of the 3-second budget."""
    clock = [0.0]

    def slow_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        clock[0] += 2 * a.shape[0] ** 3 / 1e9
        return a

    monkeypatch.setattr(timing_module, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch, "mm", slow_multiply)
    monkeypatch.setattr(torch, "_int_mm", slow_multiply)
    limits = machine_limits(size=4096, seconds=3.0)
    for name in ("fp32", "bf16", "int8"):
        assert limits[f"{name}_size"] == 512
        assert limits[f"{name}_gflops"] == pytest.approx(1.0)
    assert limits["size"] == 512
