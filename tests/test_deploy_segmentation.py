"""Deploying segmentation models: BatchNorm folding and optimize_for_inference match eager, torch.export with a
dynamic batch, height and width matches eager at sizes other than the example's, ``xception export`` of a
segmentation checkpoint writes an ONNX file whose batch, height and width are dynamic and that onnxruntime runs
like PyTorch, and ``xception benchmark`` times a segmentation model.

The models are narrow versions of the paper's layout with its Keras numerics, whose TF-'same' max-pools keep
different windows for even and odd sizes: an export that froze the example's size would differ at odd sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import calibrate_batch_norm, relative_error
from torch import nn

import xception
from xception.cli import main
from xception.deploy import DeployedModel, fold_batchnorm, optimize_for_inference
from xception.errors import InvalidArgumentError
from xception.layers import MaxPool2dSame
from xception.training.checkpoint import TrainingState, capture_rng_state, save_checkpoint

# The paper's stem (stride 2, 'same' padding), three entry modules, no middle flow: strides 2..32 as in the paper.
TINY = {"stem_widths": (8, 16), "entry_widths": (16, 24, 32), "middle_repeats": 0, "exit_widths": (32, 48),
        "tail_widths": (48, 64), "stem_padding": "same", "aspp_channels": 16, "decoder_channels": 16,
        "low_level_channels": 8}
SIZE = 66  # even: every TF-'same' max-pool of the example pads asymmetrically


def tiny_model(**options) -> nn.Module:
    torch.manual_seed(0)
    model = xception.create_model("deeplabv3plus_xception", num_classes=4, **{**TINY, **options})
    return calibrate_batch_norm(model, sized(SIZE, model), model.classifier)


def sized(side: int, model: nn.Module) -> int:
    """A side the network sees as ``side`` (odd stays odd there): ``input_scale`` 0.5 runs it at half size."""
    factor = round(1 / model.input_scale)
    return side * factor + factor - 1 if side % 2 else side * factor


def test_folding_and_fp32_deploy_match_eager(one_thread) -> None:
    model = tiny_model()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # the head's too
    deployed = optimize_for_inference(model, "fp32", example_input=torch.randn(1, 3, SIZE, SIZE))
    for shape in ((1, 3, SIZE, SIZE), (2, 3, 71, 93)):
        x = torch.rand(*shape) * 2 - 1
        with torch.no_grad():
            expected = model(x)
        assert relative_error(folded(x), expected) <= 1e-5
        output = deployed(x)
        assert output.shape == (shape[0], 4, *shape[2:]) and relative_error(output, expected) <= 1e-5


@pytest.mark.slow
def test_int8_deploy_of_a_segmentation_model(one_thread) -> None:
    """int8 is exported for the example's height and width (about 30 s of compilation here). The model keeps its
    initial BatchNorm statistics: with tiny_model's deliberately mismatched ones, per-tensor int8 activations of a
    random network are off by 0.3 of the largest logit, which says nothing about trained models."""
    torch.manual_seed(0)
    model = xception.create_model("deeplabv3plus_xception", num_classes=4, **TINY).eval()
    images = torch.rand(8, 3, SIZE, SIZE) * 2 - 1
    deployed = optimize_for_inference(model, "int8", images, example_input=images[:2])
    with torch.no_grad():
        assert relative_error(deployed(images[:3]), model(images[:3])) <= 0.15
    with pytest.raises(InvalidArgumentError, match="made for 66x66 images, got 65x97"):
        deployed(torch.rand(1, 3, 65, 97))


def test_a_fixed_size_deployed_model_refuses_other_sizes_clearly() -> None:
    deployed = DeployedModel(nn.Identity(), precision="fp32", channels_last=False, num_classes=None, in_chans=3,
                             report={}, input_size=(SIZE, SIZE))
    assert deployed(torch.ones(1, 3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)
    with pytest.raises(InvalidArgumentError, match="made for 66x66 images, got 65x97: deploy it again"):
        deployed(torch.ones(1, 3, 65, 97))


@pytest.mark.parametrize("input_scale", [1.0, 0.5])
def test_torch_export_with_dynamic_batch_and_size_matches_eager(one_thread, input_scale: float) -> None:
    """One exported program serves every batch and size. The TF-'same' max-pools are switched to their
    shape-agnostic form first, as export_onnx does (their usual paths branch on the parity of each size, which
    torch.export refuses to leave dynamic). ``input_scale`` 0.5: the resize to half size stays dynamic too."""
    model = tiny_model(input_scale=input_scale)
    example = torch.randn(2, 3, sized(SIZE, model), sized(SIZE, model))
    minimum = model.min_input_size
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("height", min=minimum, max=2048),
            3: torch.export.Dim("width", min=minimum, max=2048)}
    for pool in model.modules():
        if isinstance(pool, MaxPool2dSame):
            pool.shape_agnostic = True
    program = torch.export.export(model, (example,), dynamic_shapes=(dims,)).module()
    for pool in model.modules():
        if isinstance(pool, MaxPool2dSame):
            pool.shape_agnostic = False  # the eager reference takes the usual paths
    for batch, height, width in ((1, 65, 97), (3, SIZE, 80), (2, 99, 67)):
        x = torch.rand(batch, 3, sized(height, model), sized(width, model)) * 2 - 1
        with torch.no_grad():
            assert relative_error(program(x), model(x)) <= 1e-5, x.shape


def test_onnxruntime_int8_of_a_model_that_resizes_its_input(one_thread, tmp_path, monkeypatch) -> None:
    """A model with input_scale 0.5 (the camvid recipe's) resizes its input: onnxruntime's symbolic shape inference
    gives up on that graph with a dynamic height and width ("Incomplete symbolic shape inference", seen on the
    recorded CamVid run), so quantization uses ONNX's own. The int8 model keeps the dynamic size and follows eager
    fp32, and nothing is written to the working folder."""
    from xception.deploy import get_candidate

    monkeypatch.chdir(tmp_path)
    model = tiny_model(input_scale=0.5)
    size = sized(SIZE, model)
    calibration = [torch.rand(2, 3, size, size) * 2 - 1 for _ in range(2)]
    deployed = get_candidate("onnxruntime int8").build(model, calibration[0], calibration)
    assert deployed.input_size is None
    for height, width in ((size, size), (size + 16, size + 8)):
        x = torch.rand(1, 3, height, width) * 2 - 1
        with torch.no_grad():
            expected = model(x)
        output = deployed(x)
        assert output.shape == expected.shape
        # Loose: random weights, two random calibration batches, and 7-bit weights on a CPU without VNNI (0.26 and
        # 90% of pixels here); the trained CamVid model keeps its mIoU (benchmarks/results/zen3/RUNTIMES.md).
        assert relative_error(output, expected) < 0.4
        assert (output.argmax(1) == expected.argmax(1)).double().mean() > 0.8
    assert list(tmp_path.iterdir()) == []


def segmentation_run(directory: Path, **options) -> nn.Module:
    """A run folder as training writes it: best.safetensors from the checkpoint writer, and config.json."""
    model = tiny_model(**options)
    state = TrainingState(0, 1, 0, None, model.state_dict(), None, {}, None, None, capture_rng_state(), {})
    save_checkpoint(directory, "best", state, architecture=model.architecture(), model_name=model.model_name)
    (directory / "config.json").write_text(json.dumps({"recipe": {"img_size": sized(SIZE, model)},
                                                       "classes": list("abcd")}))
    return model


@pytest.mark.parametrize("input_scale", [1.0, 0.5])
def test_export_command_for_a_segmentation_checkpoint(tmp_path: Path, one_thread, capsys, input_scale: float) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = segmentation_run(tmp_path / "run", input_scale=input_scale)
    output = tmp_path / "seg.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "batch, height and width dynamic" in printed and "any size" in printed
    assert "onnxruntime vs PyTorch: max relative error" in printed  # at 66x66 and 83x75, batches 1 and 3
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.shape[1] == 3 and not any(isinstance(side, int) for side in (images.shape[0], *images.shape[2:]))
    model.eval()
    for batch, height, width in ((1, 65, 97), (2, 100, 70)):
        x = torch.rand(batch, 3, sized(height, model), sized(width, model)) * 2 - 1
        (result,) = session.run(None, {images.name: x.numpy()})
        with torch.no_grad():
            assert relative_error(torch.from_numpy(result), model(x)) <= 1e-4, x.shape
    metadata = {entry.key: entry.value for entry in __import__("onnx").load(str(output)).metadata_props}
    preprocessing = json.loads(metadata["xception.preprocessing"])
    assert preprocessing["crop_size"] is None and preprocessing["mean"] == [0.5] * 3


def test_benchmark_command_times_a_segmentation_model(tmp_path: Path, one_thread, capsys) -> None:
    options = [item for key, value in TINY.items() for item in ("--set", f"{key}={value!r}")]
    for mode in ("inference", "train"):
        code = main(["benchmark", "--model", "deeplabv3plus_xception", *options, "--img-size", "65",
                     "--batch-size", "2", "--mode", mode, "--warmup", "1", "--repeats", "1", "--iterations", "1",
                     "--format", "json"])
        assert code == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["candidate"] == "deeplabv3plus_xception" and result["images_per_s"] > 0
        assert result["mode"] == mode and result["macs"] > 0
