"""compare(): ours, ours deployed and the peers timed interleaved; peers that cannot run are skipped with a
reason."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types

import pytest
from benchmark_samples import CONFIG, check_measured

from xception import benchmark
from xception.benchmark import compare, measure


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
    # fp32 compiled, not bf16: on a CPU without native bf16 its reference kernels made this test take a minute,
    # and the bf16 deployment is tested in test_deploy.py.
    config = dataclasses.replace(CONFIG, batch_size=1, warmup=1, repeats=1, iterations=1,
                                 deploy=("fp32", "fp32+compile"))
    eager, fp32, compiled = compare(config, peers=())
    for result in (eager, fp32, compiled):
        check_measured(result)
    assert (eager.candidate, eager.precision) == ("xception", CONFIG.precision)  # auto's choice, under autocast
    assert [(r.candidate, r.precision) for r in (fp32, compiled)] == [("xception deploy", "fp32"),
                                                                      ("xception deploy compiled", "fp32")]
    assert fp32.compile_s is None and compiled.compile_s > 0  # compiled before timing, and the cost reported
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


def test_compare_other_runtimes_a_row_per_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime and OpenVINO, as xception deploy builds them, each precision a row of its own; a runtime that
    is not installed is one skipped row that says why."""
    from xception.deploy import runtimes

    real_find_spec = runtimes.importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda name: None if name == "openvino" else real_find_spec(name))
    config = dataclasses.replace(CONFIG, batch_size=2, warmup=1, repeats=1, iterations=1)
    ours, fp32, int8, openvino = compare(config, peers=("onnxruntime", "openvino"))
    assert [(r.candidate, r.precision) for r in (fp32, int8)] == [("onnxruntime fp32", "fp32"),
                                                                  ("onnxruntime int8", "int8")]
    for result in (ours, fp32, int8):
        check_measured(result)
    assert fp32.params == ours.params and fp32.ratio_vs_ours == pytest.approx(fp32.images_per_s / ours.images_per_s)
    assert openvino.candidate == "openvino" and "openvino not installed" in openvino.skipped


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
        benchmark.PEERS["keras"](dataclasses.replace(CONFIG, mode=mode), None)


def test_unknown_peer_raises() -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        compare(CONFIG, peers=("onnx",))
