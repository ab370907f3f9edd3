"""Shared fixtures. Keras is only a reference to match: it runs on the PyTorch backend."""

import contextlib
import os
import socket
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("KERAS_HOME", "/tmp/xception-tests-keras")

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Run by pytest-xdist (the README's command runs two workers on two cores): one thread per worker, and for the
    # commands it starts, so that the workers share the cores instead of spinning against each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--simulate-hardware", metavar="FIELD=VALUE,...", default="",
                     help="run the tests as if the hardware probe said this, e.g. "
                          "avx512=1,avx512_bf16=1,onednn_bf16=1,cpu_bf16=1,vnni=1 for an AVX-512 BF16 CPU on an AVX2 "
                          "one: the choices of another machine (auto precision, int8 range), with this machine's "
                          "kernels. In this process only: the commands tests start probe the real machine.")


def pytest_configure(config: pytest.Config) -> None:
    option = config.getoption("--simulate-hardware")
    if option:  # from before collection: module-level configurations see it too
        from xception.hardware import simulate

        fields = dict(item.split("=", 1) for item in option.split(","))
        simulated = contextlib.ExitStack()
        simulated.enter_context(simulate(**{name: value.lower() in ("1", "true", "yes") for name, value in
                                            fields.items()}))
        config.add_cleanup(simulated.close)


def skip_if_int8_kernels_simulated() -> None:
    """int8's accuracy is the real kernels': 8-bit activations saturate on a CPU without VNNI, whatever the probe
    is told. Under ``--simulate-hardware vnni=...`` the int8 accuracy checks of 'this machine' are skipped."""
    from xception.hardware import probe

    if "vnni" in probe().simulated:
        pytest.skip("--simulate-hardware sets vnni: int8's accuracy depends on this machine's real kernels")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def free_port() -> str:
    """A TCP port nobody listens on now, for torchrun's rendezvous: tests run in parallel workers."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return str(probe_socket.getsockname()[1])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the tolerance measure the parity tests use."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors gain nothing from extra threads, and spinning threads slow a busy shared CPU badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, size: int, classifier: nn.Linear) -> nn.Module:
    """Random BN scales and shifts, running statistics measured on one random batch and then perturbed, and a
    random classifier bias. With statistics that do not match the activations, a deep network's output barely
    depends on its input and a parity check proves little."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        bn.momentum = None  # cumulative average: one pass gives exactly the batch statistics
    model.train()(torch.rand(4, 3, size, size) * 2 - 1)
    for bn in norms:
        bn.momentum = 0.1
        bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean)
        bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.7, 1.4)
    classifier.bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private torch hub cache (the real one is never touched), reached without any proxy; returns the
    folder downloaded checkpoints go to."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    return tmp_path / "torch_home" / "hub" / "checkpoints"
