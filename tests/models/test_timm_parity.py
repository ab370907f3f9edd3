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


class RunRecord:
    """A class of the test's own: unpickling it would import and run code from this module."""


def cadene_first_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of Cadene's first file, xception-b5690688.pth: timm's names (classifier ``fc``), but the 1x1
    pointwise kernels stored as (out, in) matrices. Evidence: the code that loads the real file, e.g.
    FaceForensics++'s ``xception`` builder, unsqueezes every ``pointwise`` tensor twice and then loads the state
    dict strictly into a model whose classifier is ``fc``."""
    return {key: value[:, :, 0, 0].clone() if key.endswith("pointwise.weight") else value
            for key, value in state.items()}


def cadene_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved from Cadene's pretrainedmodels model: its ``xception()`` loads xception-43020ad28.pth
    (names as timm's) and then renames ``fc`` to ``last_linear``."""
    return {key.replace("fc.", "last_linear.", 1) if key.startswith("fc.") else key: value
            for key, value in state.items()}


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
    """timm's legacy_xception state dict: the layout of xception-43020ad28.pth, which timm's model loads."""
    path = tmp_path / "legacy_xception.pth"
    torch.save(timm_state, path)
    model = xception.create_model("xception", numerics="timm")
    assert xception.load_weights(model, path) == "timm legacy_xception / Cadene xception-43020ad28 (.pth)"
    assert_matches_timm(model, expected)


@pytest.mark.parametrize(("layout", "label"), [
    (cadene_first_release, "Cadene xception-b5690688 (first release, 2-D pointwise kernels) (.pth)"),
    (cadene_model_state, "Cadene pretrainedmodels xception (last_linear) (.pth)"),
])
def test_cadene_files_match_timm(timm_state, expected, tmp_path: Path, layout, label: str) -> None:
    path = tmp_path / "cadene_xception.pth"
    torch.save(layout(timm_state), path)
    model = xception.create_model("xception", numerics="timm")
    assert xception.load_weights(model, path) == label
    assert_matches_timm(model, expected)


def test_timm_training_checkpoint_loads(reference: nn.Module, expected, tmp_path: Path) -> None:
    """model_best.pth.tar and checkpoint-N.pth.tar as timm's train.py writes them, by timm's own CheckpointSaver:
    the run's arguments ride along as an argparse.Namespace, which is allowed; nothing else unpickles."""
    import argparse

    from timm.utils import CheckpointSaver

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model="legacy_xception", lr=0.1, epochs=3, mean=(0.5, 0.5, 0.5), smoothing=0.1)
    saver = CheckpointSaver(reference, optimizer, args=args, checkpoint_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(epoch=0, metric=71.5)
    for filename in ("model_best.pth.tar", "checkpoint-0.pth.tar"):
        model = xception.create_model("xception", numerics="timm", weights=tmp_path / filename)
        assert_matches_timm(model, {(256, 320): expected[(256, 320)]})


def test_checkpoint_with_other_pickled_objects_is_refused(timm_state, tmp_path: Path) -> None:
    """Only argparse.Namespace is let through: any other class in a checkpoint still means code, and is refused."""
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": timm_state, "extra": RunRecord()}, path)
    with pytest.raises(xception.WeightFileError, match="contain code rather than tensors"):
        xception.create_model("xception", numerics="timm", weights=path)


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
