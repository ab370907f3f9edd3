"""The benchmark's bookkeeping: fields, modes, peers, interleaving and output formats. No timed assertions:
the timing arithmetic is checked with a fake clock, real runs only for positive, well-formed numbers."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import sys
import types

import pytest
import torch

import xception
from xception import benchmark
from xception.benchmark import (
    BenchmarkConfig,
    Candidate,
    Result,
    compare,
    machine_limits,
    measure,
    peak_fraction,
    results_from_csv,
    results_from_json,
    results_to_csv,
    results_to_json,
    results_to_markdown,
    run_interleaved,
)
from xception.summary import summarize

TINY = {"middle_repeats": 0}  # 71x71 is the smallest input; without the middle flow a forward takes milliseconds
CONFIG = BenchmarkConfig(model_options=TINY, img_size=71, batch_size=2, warmup=1, repeats=2, iterations=2)


def tiny_model() -> xception.Xception:
    return xception.create_model("xception", **TINY)


def check_measured(result: Result) -> None:
    assert result.skipped is None
    for name in ("images_per_s", "p50_ms", "p90_ms", "params"):
        assert getattr(result, name) > 0, name
    assert result.p90_ms >= result.p50_ms
    assert result.peak_memory_mb is None or result.peak_memory_mb >= 0


# --- configuration ----------------------------------------------------------------------------------


def test_config_normalizes_the_image_size() -> None:
    assert BenchmarkConfig(img_size=299).img_size == (299, 299)
    assert BenchmarkConfig(img_size=[240, 320]).img_size == (240, 320)


@pytest.mark.parametrize("options", [{"precision": "fp8"}, {"mode": "eval"}, {"device": "tpu"}, {"batch_size": 0},
                                     {"repeats": 0}, {"img_size": (299,)}, {"warmup": -1}, {"num_threads": 0}])
def test_config_rejects_bad_values(options: dict) -> None:
    with pytest.raises(ValueError):
        BenchmarkConfig(**options)


@pytest.mark.parametrize(("options", "message"), [
    ({"deploy": ("fp16",)}, "deploy candidates"), ({"deploy": ("int8+compile",)}, "deploy candidates"),
    ({"deploy": ("bf16",), "mode": "train"}, "inference mode only"),
    ({"deploy": ("int8",), "device": "cuda"}, "int8 deploy runs on the CPU")])
def test_config_rejects_bad_deploy_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig(**options)


def test_fp16_on_cpu_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"fp16.*cuda.*bf16"):
        BenchmarkConfig(precision="fp16", device="cpu")


# --- measure ----------------------------------------------------------------------------------------


LIMITS = {"device": "cpu", "size": 128, "fp32_gflops": 1000.0, "bf16_gflops": 2000.0}


@pytest.fixture(scope="module")
def measured() -> Result:
    """One real measurement of the configured model, shared by the tests that only read it."""
    return measure(None, CONFIG, limits=LIMITS)


def test_measure_builds_the_configured_model(measured: Result) -> None:
    check_measured(measured)
    summary = summarize(tiny_model(), 71)
    assert (measured.candidate, measured.layout, measured.mode, measured.precision) == ("xception", "contiguous",
                                                                                     "inference", "fp32")
    assert (measured.batch_size, measured.img_size, measured.compiled, measured.compile_s) == (2, (71, 71), False,
                                                                                              None)
    assert (measured.params, measured.macs) == (summary.total_params, summary.total_macs)
    assert measured.peak_memory_mb is not None  # Linux or any Unix: RSS


def test_measure_fills_the_fraction_of_peak(measured: Result) -> None:
    assert measured.fraction_of_peak == pytest.approx(peak_fraction(measured, LIMITS))
    assert measured.fraction_of_peak > 0


def test_csv_and_json_round_trip_a_real_result(measured: Result) -> None:
    assert results_from_csv(results_to_csv([measured])) == [measured]
    assert results_from_json(results_to_json([measured])) == [measured]


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


def test_train_mode_updates_the_weights() -> None:
    original = tiny_model()
    trained = copy.deepcopy(original)
    result = measure(trained, dataclasses.replace(CONFIG, mode="train"))
    check_measured(result)
    assert result.mode == "train"
    assert trained.training
    before, after = original.state_dict(), trained.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert "blocks.block1.conv1.weight" in changed  # the SGD step
    assert "head.predictions.weight" in changed
    assert "blocks.block1.conv1_bn.running_mean" in changed  # BatchNorm in training mode


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
    monkeypatch.setattr(benchmark, "perf_counter", clock)
    candidates = [fake_candidate(name, clock, [1.0] * 7, calls) for name in "abc"]
    config = BenchmarkConfig(warmup=1, repeats=3, iterations=2)
    run_interleaved(candidates, config)
    rounds = ["a", "a", "b", "b", "c", "c"] * 3
    assert calls == ["a", "b", "c", *rounds]  # warm-ups one after another, then each repeat visits all


def test_throughput_and_latency_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = FakeClock(), []
    monkeypatch.setattr(benchmark, "perf_counter", clock)
    # warm-up 5 s (ignored); run 1: 1 + 1 s; run 2: 1 + 3 s; run 3: 2 + 2 s
    candidate = fake_candidate("a", clock, [5, 1, 1, 1, 3, 2, 2], calls)
    (result,) = run_interleaved([candidate], BenchmarkConfig(batch_size=4, warmup=1, repeats=3, iterations=2))
    assert result.images_per_s == 2.0  # median of 8/2, 8/4, 8/4 img/s
    assert result.p50_ms == 1500.0  # iterations 1, 1, 1, 3, 2, 2 s
    assert result.p90_ms == pytest.approx(2500.0)
    assert result.compile_s is None


def test_min_run_time_extends_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = FakeClock(), []
    monkeypatch.setattr(benchmark, "perf_counter", clock)
    candidate = fake_candidate("a", clock, [1.0] * 8, calls)
    run_interleaved([candidate], BenchmarkConfig(warmup=0, repeats=2, iterations=1, min_run_time=3.5))
    assert len(calls) == 8  # 4 iterations of 1 s reach 3.5 s, in each of 2 runs


# --- compare and its peers --------------------------------------------------------------------------


def test_compare_with_timm_and_keras() -> None:
    config = dataclasses.replace(CONFIG, batch_size=1, repeats=1, iterations=1)
    results = compare(config, peers=("timm", "keras"))
    assert [result.candidate for result in results][:2] == ["xception", "timm legacy_xception"]
    ours, timm, keras = results
    check_measured(ours)
    check_measured(timm)
    assert timm.layout in ("contiguous", "channels_last")
    other = "channels_last" if timm.layout == "contiguous" else "contiguous"
    assert timm.note.startswith(f"{other}: ")  # the slower layout, named
    assert timm.ratio_vs_timm == 1.0
    assert ours.ratio_vs_timm == pytest.approx(ours.images_per_s / timm.images_per_s)
    assert ours.ratio_vs_ours == 1.0
    assert timm.params == 22_855_952  # the same network as ours at full depth
    if importlib.util.find_spec("keras") is None:
        assert keras.skipped
    else:
        check_measured(keras)
        assert (keras.candidate, keras.layout, keras.macs) == ("keras Xception", "NHWC", None)
        assert keras.ratio_vs_timm == pytest.approx(keras.images_per_s / timm.images_per_s)


def test_compare_times_the_deployed_model_beside_the_eager_one() -> None:
    config = dataclasses.replace(CONFIG, batch_size=1, warmup=1, repeats=1, iterations=1,
                                 deploy=("fp32", "bf16+compile"))
    eager, fp32, bf16 = compare(config, peers=())
    for result in (eager, fp32, bf16):
        check_measured(result)
    assert (eager.candidate, eager.precision) == ("xception", "fp32")
    assert [(r.candidate, r.precision) for r in (fp32, bf16)] == [("xception deploy", "fp32"),
                                                                  ("xception deploy compiled", "bf16")]
    assert fp32.compile_s is None and bf16.compile_s > 0  # compiled before timing, and the cost reported
    assert fp32.params == eager.params and fp32.macs == eager.macs  # counted on the model before folding
    assert fp32.ratio_vs_ours == pytest.approx(fp32.images_per_s / eager.images_per_s)
    with pytest.raises(ValueError, match="compare"):
        measure(None, config)


def test_compare_inception_v3_for_table_3() -> None:
    # Table 3 compares training speed; inference exercises the same plumbing at a third of the cost.
    config = dataclasses.replace(CONFIG, batch_size=1, warmup=0, repeats=1, iterations=1)
    ours, inception = compare(config, peers=("inception_v3",))
    check_measured(inception)
    assert (inception.candidate, inception.img_size) == ("torchvision inception_v3", (299, 299))
    assert inception.params == 23_834_568  # without the auxiliary classifier
    assert inception.ratio_vs_ours == pytest.approx(inception.images_per_s / ours.images_per_s)
    assert inception.ratio_vs_timm is None


def test_a_missing_peer_is_skipped_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    ours, timm = compare(dataclasses.replace(CONFIG, warmup=0, repeats=1, iterations=1), peers=("timm",))
    check_measured(ours)
    assert timm.candidate == "timm"
    assert "timm is not installed" in timm.skipped
    assert timm.images_per_s is None
    assert ours.ratio_vs_timm is None


@pytest.mark.parametrize(("keras_module", "backend", "mode", "reason"), [
    (None, "jax", "inference", "KERAS_BACKEND=jax"),
    (types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax")), "torch", "inference",
     "already imported with the jax backend"),
    (None, "torch", "train", "inference mode only"),
])
def test_keras_peer_skips_with_a_reason(monkeypatch: pytest.MonkeyPatch, keras_module, backend: str, mode: str,
                                        reason: str) -> None:
    monkeypatch.setitem(sys.modules, "keras", keras_module)
    monkeypatch.setenv("KERAS_BACKEND", backend)
    with pytest.raises(benchmark.PeerUnavailable, match=reason):
        benchmark.PEERS["keras"](dataclasses.replace(CONFIG, mode=mode))


def test_unknown_peer_raises() -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        compare(CONFIG, peers=("onnx",))


# --- machine limits and the fraction of peak --------------------------------------------------------


def test_machine_limits_with_a_small_matrix() -> None:
    limits = machine_limits(repeats=2, size=128)
    assert (limits["device"], limits["size"]) == ("cpu", 128)
    assert limits["fp32_gflops"] > 0
    assert limits["bf16_gflops"] > 0
    assert limits["int8_gflops"] > 0


def result(**fields) -> Result:
    base = dict(candidate="xception", layout="contiguous", mode="inference", precision="fp32", device="cpu",
                batch_size=1, img_size=(299, 299), images_per_s=10.0, p50_ms=100.0, p90_ms=120.0,
                params=22_855_952, macs=8_367_000_000, peak_memory_mb=120.5)
    return Result(**{**base, **fields})


def test_peak_fraction_counts_two_flops_per_mac_and_three_passes_in_training() -> None:
    limits = LIMITS
    assert peak_fraction(result(macs=10**9), limits) == pytest.approx(0.02)  # 20 GFLOP/s of 1000
    assert peak_fraction(result(macs=10**9, mode="train"), limits) == pytest.approx(0.06)
    assert peak_fraction(result(macs=10**9, precision="bf16"), limits) == pytest.approx(0.01)
    assert peak_fraction(result(macs=None), limits) is None
    assert peak_fraction(result(device="cuda"), limits) is None


# --- output -----------------------------------------------------------------------------------------


RESULTS = [
    result(ratio_vs_timm=1.25, ratio_vs_ours=1.0, fraction_of_peak=0.125),
    result(candidate="timm legacy_xception", layout="channels_last", compiled=True, compile_s=31.5,
           ratio_vs_timm=1.0, ratio_vs_ours=0.8, note="contiguous: 7.5 img/s"),
    Result(candidate="keras", layout="-", mode="inference", precision="fp32", device="cpu", batch_size=1,
           img_size=(299, 299), skipped="keras cannot be imported (No module named 'keras')"),
]


def test_json_round_trip() -> None:
    text = results_to_json(RESULTS)
    assert json.loads(text)[0]["img_size"] == [299, 299]
    assert results_from_json(text) == RESULTS


def test_csv_round_trip() -> None:
    text = results_to_csv(RESULTS)
    assert text.splitlines()[0].split(",")[:3] == ["candidate", "layout", "mode"]
    assert results_from_csv(text) == RESULTS


def test_markdown_table() -> None:
    limits = {**LIMITS, "size": 4096}
    lines = results_to_markdown(RESULTS, limits).splitlines()
    assert lines[0] == "Machine limit (cpu, 4096x4096 matmul, GFLOP/s): fp32 1,000, bf16 2,000"
    header, rule, *rows = lines[2:]
    assert header.startswith("| candidate | layout |") and "| img/s | p50 ms | p90 ms | vs timm |" in header
    assert rule.count("---") == header.count("|") - 1
    assert len(rows) == 3
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[:9] == ["xception", "contiguous", "inference", "fp32", "1", "299x299", "10.00", "100.00", "120.00"]
    assert cells[9:] == ["1.25", "1.00", "12.5", "22.86M", "8.37", "120", "-", ""]
    assert "| 16.7 |" in rows[1]  # % of peak computed from the limits: 2 * 8.367 GMACs * 10 img/s / 1000 GFLOP/s
    assert "| 31.5 | contiguous: 7.5 img/s |" in rows[1]
    assert rows[2].endswith("| skipped: keras cannot be imported (No module named 'keras') |")
    assert "Machine limit" not in results_to_markdown(RESULTS)


# --- slow: torch.compile ----------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_reports_compile_time() -> None:
    result = measure(None, dataclasses.replace(CONFIG, compile=True, warmup=0, repeats=1, iterations=1))
    check_measured(result)
    assert result.compiled
    assert result.compile_s > 0
