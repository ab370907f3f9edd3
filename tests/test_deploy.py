"""Inference deployment: BatchNorm folding is exact, every optimized path predicts what the eager model does, and
the ONNX export matches PyTorch in onnxruntime.

Tolerances (relative to the largest logit, see conftest.relative_error): fp32 paths 1e-5; bf16 5e-2 (8 bits of
mantissa through some thirty layers); int8 0.15 (per-tensor activations on random weights, which spread values
more than trained ones; the accuracy of a trained model is measured in BENCHMARKS.md).
"""

import pytest
import torch
from conftest import calibrate_batch_norm, relative_error, skip_if_int8_kernels_simulated
from torch import nn

from xception import SeparableConv2d, create_model
from xception.cli import main
from xception.deploy import DeployedModel, check_onnx, export_onnx, fold_batchnorm, optimize_for_inference
from xception.weights import save_weights

SMALL = {"entry_widths": (16, 32), "middle_repeats": 1, "exit_widths": (32, 48), "tail_widths": (48, 64),
         "stem_widths": (8, 16)}


def small_xception(size: int = 71, **options) -> nn.Module:
    model = create_model("xception", num_classes=10, **{**SMALL, **options})
    return calibrate_batch_norm(model, size, model.head.predictions)


def batch_norms(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


@pytest.mark.parametrize("options", [{}, {"mid_activation": "bn_relu"}, {"order": "pointwise_first"},
                                     {"mid_activation": "bn", "order": "pointwise_first", "segments": 4}])
def test_folding_is_exact_and_removes_every_batchnorm(options, one_thread):
    model = small_xception(**options)
    x = torch.rand(2, 3, 71, 71) * 2 - 1
    folded = fold_batchnorm(model)
    assert batch_norms(folded) == []
    assert folded.folded_batchnorms == len(batch_norms(model))
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) <= 1e-5


def test_folding_leaves_the_original_untouched(one_thread):
    model = small_xception().train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fold_batchnorm(model)
    assert model.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("name", ["xception41", "xception41p"])
def test_folding_the_aligned_family(name, one_thread):
    model = create_model(name, num_classes=10)
    calibrate_batch_norm(model, 64, model.head.predictions)
    folded = fold_batchnorm(model)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) <= 1e-5
    remaining = batch_norms(folded)
    if name == "xception41":
        assert remaining == []
    else:  # pre-activation: only the BN at each block's entry follows a sum, not a convolution
        assert remaining and all(name.endswith(".entry.bn") for name in remaining)


def test_folding_a_feature_extractor(one_thread):
    model = create_model("xception", features_only=True, out_indices=(1, 3), **SMALL)
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.normal_(0, 0.1)
            norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(1, 3, 71, 71)
    with torch.no_grad():
        expected = model(x)
    actual = optimize_for_inference(model, "fp32", example_input=x)(x)
    assert isinstance(actual, list) and len(actual) == 2
    for a, e in zip(actual, expected, strict=True):
        assert relative_error(a, e) <= 1e-5


def test_fp32_deploy_matches_eager_and_reports_what_it_did(one_thread):
    model = small_xception()
    x = torch.rand(3, 3, 71, 71) * 2 - 1
    deployed = optimize_for_inference(model, "fp32", example_input=x)  # auto is bf16 where that is native
    assert isinstance(deployed, DeployedModel)
    assert set(deployed.report["layout_ms"]) == {"contiguous", "channels_last"}
    assert deployed.report["folded_batchnorms"] == len(batch_norms(model))
    output = deployed(x)  # a contiguous NCHW batch, as for the original model
    assert output.dtype == torch.float32 and output.shape == (3, 10)
    with torch.no_grad():
        assert relative_error(output, model(x)) <= 1e-5


def test_bf16_deploy_is_close_to_fp32(one_thread):
    model = small_xception()
    x = torch.rand(4, 3, 71, 71) * 2 - 1
    deployed = optimize_for_inference(model, "bf16", example_input=x, channels_last=True)
    assert next(deployed.module.parameters()).dtype == torch.bfloat16
    output = deployed(x)
    assert output.dtype == torch.float32
    with torch.no_grad():
        assert relative_error(output, model(x)) <= 5e-2


# Two fp32 compilations (70 s on a 2-core machine); the int8 test below checks the same two graphs in the default
# suite.
@pytest.mark.slow
def test_compiled_deploy_serves_any_batch_size_without_padding(one_thread):
    model = small_xception()
    x = torch.rand(5, 3, 71, 71) * 2 - 1
    deployed = optimize_for_inference(model, "fp32", example_input=x[:2], channels_last=True, compile=True)
    assert list(deployed.report["compiled_graphs"]) == ["Nx3x71x71"]  # one graph for every batch of two or more
    assert deployed.report["compile_s"] > 0
    with torch.no_grad():
        expected = model(x)
    assert relative_error(deployed(x), expected) <= 1e-5
    assert list(deployed.report["compiled_graphs"]) == ["Nx3x71x71"]  # batch 5 ran in it, not cut into 2 + 2 + 1
    assert relative_error(deployed(x[:1]), expected[:1]) <= 1e-5
    assert list(deployed.report["compiled_graphs"]) == ["Nx3x71x71", "1x3x71x71"]  # batch 1 in its own graph


def test_int8_deploy_runs_quantized_at_any_batch_size(one_thread):
    """Without ``example_input``: compiled at once for the calibration batch's size (16), and a batch of one runs
    in a graph of its own, not padded to 16."""
    pytest.importorskip("torchao")
    skip_if_int8_kernels_simulated()
    # 32x32 without a strided stem: even feature maps, whose TF-same pooling window runs off the edge
    model = small_xception(32, stem_stride=1)
    calibration = torch.rand(16, 3, 32, 32) * 2 - 1
    deployed = optimize_for_inference(model, "int8", calibration, channels_last=True)
    assert deployed.report["calibration_images"] == 16
    assert list(deployed.report["compiled_graphs"]) == ["Nx3x32x32"]
    graph = deployed.module._orig_mod.graph  # the compiled PT2E module: real int8 quantize ops, not fake-quant
    quantize_ops = [node for node in graph.nodes if "quantize_per_tensor" in str(node.target)]
    assert quantize_ops
    # Every convolution runs on int8 weights, the depthwise ones included (the quantizer recognises convolutions
    # by exact type, so a Conv2dSame would stay in float32).
    convolutions = [node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default]
    depthwise = [node for node in convolutions if len(node.args) > 6 and node.args[6] != 1]
    assert len(depthwise) == sum(isinstance(m, SeparableConv2d) for m in model.modules()) > 0
    assert all("dequantize_per_channel" in str(node.args[1].target) for node in convolutions)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model(x)
    assert relative_error(deployed(x[:1]), expected[:1]) <= 0.15
    assert relative_error(deployed(x), expected) <= 0.15
    assert list(deployed.report["compiled_graphs"]) == ["Nx3x32x32", "1x3x32x32"]
    assert deployed.report["compile_s"] == pytest.approx(sum(deployed.report["compiled_graphs"].values()), abs=0.02)


@pytest.mark.parametrize(("precision", "channels_last"), [("int8", True), ("int8", False), ("fp32", True)])
def test_symbolic_batch_graph_of_a_grayscale_model(precision: str, channels_last: bool):
    """Fashion-MNIST's compact model in small: one input channel, 28x28, a stem without stride. Its symbolic-batch
    graph used to fail its own stride check at the first call (``expected size 8==8, stride 1==784``, Inductor's
    oneDNN convolution lowering taking the one-channel stem input for NCHW): int8 in both layouts, fp32 and bf16
    compiled in channels_last. The stem convolution is now given a zero channel.

    The other batch is 20, not 5: on one thread PyTorch picks the fp32 1x1 convolution's kernel by batch size (oneDNN
    from 16 images), and a batch under 16 would compile a second graph (20 s more, nothing more tested)."""
    if precision == "int8":
        pytest.importorskip("torchao")
    model = create_model("xception", num_classes=10, in_chans=1, stem_stride=1, stem_padding="same", **SMALL).eval()
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    deployed = optimize_for_inference(model, precision, x[:32], example_input=x[:32], channels_last=channels_last,
                                      compile=True)
    assert len(deployed.report["padded_single_channel_convs"]) == 1  # the stem's first convolution
    with torch.no_grad():
        expected = model(x)
    tolerance = 0.15 if precision == "int8" else 1e-5
    assert relative_error(deployed(x), expected) <= tolerance
    assert relative_error(deployed(x[:20]), expected[:20]) <= tolerance
    assert list(deployed.report["compiled_graphs"]) == ["Nx1x28x28"]


@pytest.mark.parametrize(("name", "options"), [("xception41", {}), ("xception", {"output_stride": 16})])
def test_int8_quantizes_every_convolution_of_the_family(name: str, options: dict, one_thread):
    """The quantized graph (before compilation) of an aligned model and of a dilated Xception: every convolution
    takes int8 weights."""
    pytest.importorskip("torchao")
    from xception.deploy.torch_path import _quantize_int8

    model = fold_batchnorm(create_model(name, **options).eval())
    x = torch.rand(1, 3, 72, 72) * 2 - 1  # Xception's smallest input is 71x71; an even size for the pools
    graph = _quantize_int8(model, x, [x], torch.contiguous_format).graph
    convolutions = [node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default]
    assert len(convolutions) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert all("dequantize_per_channel" in str(node.args[1].target) for node in convolutions)


def test_bad_arguments_are_refused_clearly():
    model = small_xception()
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        optimize_for_inference(model, "fp16")
    with pytest.raises(ValueError, match="needs calibration_data"):
        optimize_for_inference(model, "int8")
    with pytest.raises(ValueError, match="NCHW"):
        optimize_for_inference(model, "int8", torch.rand(3, 71, 71))


def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, one_thread):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = small_xception()
    path = export_onnx(model, tmp_path / "model.onnx", img_size=71)
    assert path.exists() and not (tmp_path / "model.onnx.partial").exists()
    (images,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert not isinstance(images.shape[0], int) and images.shape[1:] == [3, 71, 71]  # the batch is dynamic
    assert check_onnx(model, path, img_size=71, batch_sizes=(1, 3)) <= 1e-4


def test_export_command(tmp_path, one_thread, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "weights.safetensors"
    save_weights(small_xception(), path)
    assert main(["export", "--checkpoint", str(path), "--img-size", "71", "--output", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs PyTorch: max relative error" in capsys.readouterr().out
