"""The hardware probe and the one choice of precision made from it. The probe is checked against torch's own
checks on this machine; every choice is checked on both kinds of CPU (and a GPU) through ``simulate``, so that the
tests hold, and cover both branches, on an AVX2-only and an AVX-512 BF16 machine alike."""

import json
import logging

import pytest
import torch

from xception.cli import main
from xception.errors import InvalidArgumentError
from xception.hardware import CudaDevice, probe, simulate, versions
from xception.precision import DEPLOY_PRECISIONS, TRAINING_PRECISIONS, choose_precision

# What the two CPUs this project has met look like to the probe (torch's checks and oneDNN's bf16 check).
ZEN3 = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False, "vnni": False, "onednn_bf16": False,
        "cpu_bf16": False, "architecture": "x86_64"}
ZEN4 = {"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False, "vnni": True, "onednn_bf16": True,
        "cpu_bf16": True, "architecture": "x86_64"}
AMPERE = CudaDevice("NVIDIA A100", (8, 0), 40.0, bf16=True)
TURING = CudaDevice("Tesla T4", (7, 5), 15.0, bf16=False)


def test_probe_reads_what_torch_reads() -> None:
    hardware = probe()
    if hardware.simulated:
        pytest.skip("run with --simulate-hardware: the probe answers as told, not as torch reads this machine")
    assert hardware.avx2 == torch.cpu._is_avx2_supported()
    assert hardware.avx512 == torch.cpu._is_avx512_supported()
    assert hardware.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert hardware.vnni == torch.cpu._is_vnni_supported()
    assert hardware.onednn_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert hardware.cpu_bf16 <= hardware.onednn_bf16  # native bf16 is a subset of oneDNN having bf16 at all
    assert hardware.threads == torch.get_num_threads() and hardware.torch_version == torch.__version__
    assert not hardware.simulated
    line = hardware.line()
    assert hardware.cpu_model in line and f"torch {torch.__version__}" in line and "SIMULATED" not in line


def test_machine_line_names_the_instruction_sets_the_choices_depend_on() -> None:
    with simulate(**ZEN3) as zen3:
        assert "AVX2; no AVX-512, no native bf16, no VNNI" in zen3.cpu_line()
    with simulate(**ZEN4) as zen4:
        assert "AVX2, AVX-512, AVX512_BF16, VNNI" in zen4.cpu_line() and "no " not in zen4.cpu_line()
        assert "SIMULATED" in zen4.line()  # a simulated machine never passes for the real one in a record


def test_simulate_restores_the_real_probe() -> None:
    real = probe()
    with simulate(vnni=not real.vnni):
        assert probe().vnni != real.vnni
    assert probe() == real
    with pytest.raises(TypeError, match="no field"), simulate(gpus=2):
        pass


@pytest.mark.parametrize(("machine", "training", "deployment"), [
    (ZEN3, "fp32", "fp32"),
    (ZEN4, "bf16", "bf16"),
])
def test_auto_on_each_kind_of_cpu(machine: dict, training: str, deployment: str) -> None:
    with simulate(**machine):
        assert choose_precision("auto", "cpu", TRAINING_PRECISIONS).name == training
        choice = choose_precision("auto", "cpu", DEPLOY_PRECISIONS)
        assert choice.name == deployment and choice.requested == "auto"
        assert ("no native bf16" in choice.reason) == (deployment == "fp32")


@pytest.mark.parametrize(("gpu", "training", "deployment"), [(AMPERE, "bf16", "bf16"), (TURING, "fp16", "fp32")])
def test_auto_on_gpus(gpu: CudaDevice, training: str, deployment: str) -> None:
    """fp16 autocast on a GPU without bf16; deployment has no fp16 path, so fp32 there."""
    with simulate(cuda=(gpu,)):
        assert choose_precision("auto", "cuda", TRAINING_PRECISIONS).name == training
        assert choose_precision("auto", "cuda", DEPLOY_PRECISIONS).name == deployment


def test_auto_never_picks_int8() -> None:
    """int8 needs calibration images; it is asked for, never chosen."""
    for machine in (ZEN3, ZEN4):
        with simulate(**machine):
            assert "int8" in probe().native_precisions("cpu")
            assert choose_precision("auto", "cpu", ("int8", "fp32")).name == "fp32"


def test_slow_precision_asked_for_runs_after_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with simulate(**ZEN3), caplog.at_level(logging.WARNING, logger="xception"):
        choice = choose_precision("bf16", "cpu")
    assert choice.name == "bf16" and "slow here" in choice.reason
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "no native bf16" in message and "auto (fp32 on this machine)" in message
    caplog.clear()
    with simulate(**ZEN4), caplog.at_level(logging.WARNING, logger="xception"):
        assert choose_precision("bf16", "cpu").reason == "as asked"
    assert not caplog.records


def test_avx512_without_bf16_instructions_is_told_apart() -> None:
    """oneDNN emulates bf16 on AVX-512 without BF16 instructions (Skylake, Cascade Lake): not native either."""
    with simulate(**{**ZEN4, "avx512_bf16": False, "cpu_bf16": False}):
        assert "emulates bf16" in probe().slow_precision("bf16")
        assert choose_precision("auto").name == "fp32"


def test_unknown_or_impossible_precisions_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="auto or one of fp32, bf16, fp16"):
        choose_precision("fp8")
    with pytest.raises(InvalidArgumentError, match="needs device cuda"):
        choose_precision("fp16", "cpu")


def test_int8_activation_range_follows_vnni() -> None:
    with simulate(**ZEN3):
        assert probe().int8_reduce_range
    with simulate(**ZEN4):
        assert not probe().int8_reduce_range
    with simulate(architecture="aarch64", vnni=False):
        assert not probe().int8_reduce_range  # the saturating multiply-add is x86's


def test_versions_name_the_library_and_its_peers() -> None:
    found = versions()
    assert found["torch"] == torch.__version__.split("+")[0] and found["xception"]
    assert {"python", "timm", "onnxruntime", "openvino"} <= set(found)


def test_env_command_prints_the_machine_and_the_choices(capsys: pytest.CaptureFixture) -> None:
    assert main(["env", "--no-limits"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"machine: {probe().line()}")
    assert "precision auto (cpu): training" in out
    assert main(["env", "--json", "--limit-seconds", "0.05"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"] == probe().line()
    assert report["auto"]["cpu"]["training"]["name"] == choose_precision("auto").name
    (limits,) = report["matmul_limits"]
    assert limits["device"] == "cpu" and limits["fp32_gflops"] > 0 and limits["bf16_size"] >= 256
