"""``xception convert`` for every model of ``list_models()``: the converted file reproduces the source's outputs.

Sources are random networks (nothing is downloaded) with random BatchNorm statistics, so that a statistic loaded
into the wrong place, or a wrong epsilon, shows in the outputs. The aligned models' sources are timm's own
``xception_aligned`` networks, the paper's network's a timm ``legacy_xception`` and a safetensors of this library.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import xception
from xception.cli import main
from xception.weights.formats import read_safetensors_metadata

ALIGNED = [name for name in xception.list_models("classification") if name != "xception"]
# A few sources differ from timm's defaults, to check that the class count and input channels come from the file.
OPTIONS = {"xception41": {"num_classes": 10}, "xception41p": {"in_chans": 1}}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = 1 + 0.2 * torch.randn(n, generator=generator)
            module.bias.data = 0.2 * torch.randn(n, generator=generator)
            module.running_mean = 0.2 * torch.randn(n, generator=generator)
            module.running_var = 0.5 + torch.rand(n, generator=generator)
    return model.eval()


@torch.no_grad()
def assert_reproduces(converted: nn.Module, source: nn.Module, in_chans: int = 3) -> None:
    # One image at the model's smallest size: every weight still takes part, and these models are 23-42M parameters.
    size = converted.min_input_size
    x = torch.rand(1, in_chans, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected, actual = source.eval()(x), converted.eval()(x)
    assert actual.shape == expected.shape
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, error


def convert(capsys: pytest.CaptureFixture[str], name: str, source: Path, destination: Path) -> tuple[nn.Module, str]:
    """Run the command, then load its output with the architecture it recorded."""
    code = main(["convert", "--model", name, str(source), str(destination)])
    out, err = capsys.readouterr()
    assert code == 0, err
    architecture = json.loads(read_safetensors_metadata(destination)["architecture"])
    return xception.create_model(name, weights=destination, **architecture), out


@pytest.mark.parametrize("name", ALIGNED)
def test_convert_a_timm_xception_aligned_checkpoint(name: str, tmp_path: Path, capsys) -> None:
    options = OPTIONS.get(name, {})
    torch.manual_seed(0)  # timm initialises from the global generator
    source = randomize_batchnorm(timm.create_model(name, pretrained=False, **options))
    src = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), src)
    converted, out = convert(capsys, name, src, tmp_path / "converted.safetensors")
    assert "timm xception_aligned (.pth)" in out and "numerics" not in out
    assert f"num_classes={options.get('num_classes', 1000)}" in out
    assert converted.in_chans == options.get("in_chans", 3)
    assert_reproduces(converted, source, converted.in_chans)
    # With the default architecture, the plain call loads it too.
    if not options:
        assert_reproduces(xception.create_model(name, weights=tmp_path / "converted.safetensors"), source)


def test_convert_timm_xception_aligned_safetensors(tmp_path: Path, capsys) -> None:
    """The Hugging Face Hub's timm files are safetensors with timm's names (model.safetensors)."""
    torch.manual_seed(0)
    source = randomize_batchnorm(timm.create_model("xception65p", pretrained=False))
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(src))
    converted, out = convert(capsys, "xception65p", src, tmp_path / "converted.safetensors")
    assert "timm xception_aligned (safetensors)" in out
    assert_reproduces(converted, source)


def test_convert_a_timm_legacy_xception_checkpoint(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    source = randomize_batchnorm(timm.create_model("legacy_xception", pretrained=False, num_classes=10))
    src = tmp_path / "legacy_xception.pth"
    torch.save(source.state_dict(), src)
    converted, out = convert(capsys, "xception", src, tmp_path / "converted.safetensors")
    assert "timm legacy_xception" in out and "num_classes=10" in out and "numerics=timm" in out
    assert converted.config.numerics == "timm"
    assert_reproduces(converted, source)


def test_convert_a_safetensors_file_of_this_library(tmp_path: Path, capsys) -> None:
    source = randomize_batchnorm(xception.create_model("xception", num_classes=7, numerics="timm"))
    src = xception.save_weights(source, tmp_path / "saved.safetensors")
    converted, out = convert(capsys, "xception", src, tmp_path / "converted.safetensors")
    assert "xception safetensors" in out and "num_classes=7" in out and "numerics=timm" in out
    assert_reproduces(converted, source)


def test_convert_a_safetensors_file_of_an_aligned_model(tmp_path: Path, capsys) -> None:
    source = randomize_batchnorm(xception.create_model("xception71", num_classes=3, output_stride=16))
    src = xception.save_weights(source, tmp_path / "saved.safetensors")
    converted, out = convert(capsys, "xception71", src, tmp_path / "converted.safetensors")
    assert "xception safetensors" in out and "num_classes=3" in out
    assert converted.output_stride == 16
    assert_reproduces(converted, source)
