"""Exactness against timm's ``legacy_xception`` (the PyTorch port of the Keras weights) with ``numerics="timm"``.

The reference has random weights and BatchNorm statistics calibrated on a real batch, then perturbed: with
statistics that do not match the activations the output hardly depends on the input, and a parity check on such
a network would prove little.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import calibrate_batch_norm, relative_error
from torch import nn

import xception

TOLERANCE = 1e-5
SIZES = [(299, 299), (256, 320)]


def calibrated_timm_xception(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("legacy_xception", pretrained=False)
    return calibrate_batch_norm(model, 299, model.fc)


def images(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, *size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return calibrated_timm_xception()


@pytest.fixture(scope="module")
def expected(reference: nn.Module) -> dict[tuple[int, int], torch.Tensor]:
    with torch.no_grad():
        return {size: reference(images(size)) for size in SIZES}


@pytest.fixture(scope="module")
def timm_state(reference: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.state_dict().items()}


def cadene_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cadene's pretrainedmodels names the classifier last_linear and stores 1x1 kernels as (out, in)."""
    converted = {}
    for key, value in state.items():
        if key.startswith("fc."):
            key = "last_linear." + key[len("fc."):]
        elif key.endswith("pointwise.weight"):
            value = value[:, :, 0, 0].clone()
        converted[key] = value
    return converted


def assert_matches_timm(model: nn.Module, expected: dict[tuple[int, int], torch.Tensor]) -> None:
    model.eval()
    for size, logits in expected.items():
        with torch.no_grad():
            actual = model(images(size))
        assert actual.shape == logits.shape == (2, 1000)
        assert relative_error(actual, logits) <= TOLERANCE, size


def test_reference_output_depends_on_input(expected) -> None:
    for logits in expected.values():
        assert relative_error(logits[0], logits[1]) > 100 * TOLERANCE


def test_timm_pth_matches_timm(timm_state, expected, tmp_path: Path) -> None:
    path = tmp_path / "legacy_xception.pth"
    torch.save(timm_state, path)
    model = xception.create_model("xception", numerics="timm", weights=path)
    assert_matches_timm(model, expected)


def test_cadene_layout_matches_timm(timm_state, expected, tmp_path: Path) -> None:
    state = cadene_layout(timm_state)
    assert "last_linear.weight" in state and "fc.weight" not in state
    assert state["block1.rep.0.pointwise.weight"].dim() == 2
    path = tmp_path / "cadene_xception.pth"
    torch.save(state, path)
    model = xception.create_model("xception", numerics="timm")
    assert xception.load_weights(model, path).startswith("Cadene")
    assert_matches_timm(model, expected)


def test_wrapped_checkpoint_with_module_prefix_loads(timm_state, expected, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in timm_state.items()}}, path)
    model = xception.create_model("xception", numerics="timm", weights=path)
    assert_matches_timm(model, {(256, 320): expected[(256, 320)]})


def test_keras_numerics_do_not_match_timm(timm_state, expected, tmp_path: Path) -> None:
    """The check has teeth: BN eps 1e-3 and TF-same pooling, with the very same weights, are far off timm."""
    path = tmp_path / "legacy_xception.pth"
    torch.save(timm_state, path)
    model = xception.create_model("xception", numerics="keras", weights=path).eval()
    with torch.no_grad():
        actual = model(images((256, 320)))
    assert relative_error(actual, expected[(256, 320)]) > 100 * TOLERANCE
