"""The PyTorch runtime of a deployment: BatchNorm folding, memory layout, bf16, int8, compilation, and the ``.pt2``
program a deployment folder keeps (:meth:`DeployedModel.save`; ONNX is :mod:`.onnx`).

:func:`optimize_for_inference` turns a trained model into an inference-only one that takes the same NCHW float
batch and returns the same float32 output:

1. **BatchNorm folding.** In evaluation a BatchNorm is a per-channel affine map, so it can be folded into the
   convolution in front of it (``w' = w * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``).
   Xception has one after every separable convolution and, in the aligned family, one after every depthwise
   convolution: folding removes a full pass over each activation. It is exact up to rounding (computed in
   float64). A BatchNorm that follows a ReLU or a residual sum (the pre-activation variants' block entries)
   has no convolution directly in front of it and stays.
2. **Memory layout**, chosen by timing both on an example batch: depthwise convolutions are several times
   faster in channels_last on x86 CPUs, but the choice is measured, not assumed.
3. **Precision.** ``"auto"`` (the default) is bf16 where the machine runs it natively and fp32 elsewhere
   (:func:`xception.precision.choose_precision`). ``"bf16"`` casts weights and activations to bfloat16 (fast on
   CPUs with AVX512_BF16 or AMX, and on GPUs; on other CPUs it falls to slow reference kernels, and says so).
   ``"int8"`` is post-training static quantization with PyTorch 2 export (PT2E) and the x86 Inductor quantizer
   from ``torchao``: int8 weights (per channel) and activations (per tensor), calibrated on real images, executed
   by oneDNN int8 kernels once compiled (so int8 always compiles). On an x86 CPU without VNNI the activations are
   quantized to 7 bits (see :attr:`xception.hardware.Hardware.int8_reduce_range`).
4. **Compilation** (optional for fp32/bf16): ``torch.compile`` with weight freezing, which fuses the ReLUs and
   paddings into the convolutions. Its cost is paid at the first call and reported as ``compile_s``; Inductor's
   on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system temp folder) makes a second process
   compile the same model much faster. For a handful of images it does not pay off: ``predict`` leaves it off.
   Any batch size runs at full speed: a batch of one has its own graph, larger batches share one graph with a
   symbolic batch size (int8 is exported with a symbolic batch for that), so nothing is padded. A convolution
   over a single input channel (a grayscale model's stem) is given a second, all-zero input channel with zero
   weights before compiling: see :func:`_pad_single_channel_convs` for the Inductor bug this avoids.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..hardware import probe
from ..layers import MaxPool2dSame, SeparableConv2d
from ..precision import DEPLOY_PRECISIONS, PRECISIONS, choose_precision
from .base import RuntimeModel, import_runtime

log = logging.getLogger("xception.deploy")

DeployPrecision = Literal["auto", "fp32", "bf16", "int8"]
CALIBRATION_BATCHES = 32  # at most this many batches of calibration_data are used


# --- BatchNorm folding ------------------------------------------------------------------------------

def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in evaluation mode with every BatchNorm that directly follows a convolution folded
    into it (the BatchNorm becomes ``nn.Identity``). The original is left untouched.

    "Directly follows" means: the next module of an ``nn.Sequential`` after a convolution or a separable
    convolution (folded into its last convolution), or the BatchNorm between the two halves of a
    :class:`~xception.layers.SeparableConv2d` (folded into its first).
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if isinstance(module, SeparableConv2d) and isinstance(module.mid_norm, nn.BatchNorm2d):
            first = module.depthwise if module.order == "depthwise_first" else module.pointwise
            _fold_into(first, module.mid_norm)
            module.mid_norm = nn.Identity()
            count += 1
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for previous, name in itertools.pairwise(names):
                norm, conv = module._modules[name], _last_conv(module._modules[previous])
                if isinstance(norm, nn.BatchNorm2d) and conv is not None:
                    _fold_into(conv, norm)
                    module._modules[name] = nn.Identity()
                    count += 1
    folded.folded_batchnorms = count
    return folded


def _last_conv(module: nn.Module | None) -> nn.Conv2d | None:
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, SeparableConv2d):
        return module.pointwise if module.order == "depthwise_first" else module.depthwise
    return None


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    if norm.running_mean is None or norm.running_var is None:
        raise InvalidArgumentError(f"cannot fold {norm}: it keeps no running statistics (track_running_stats=False)")
    if conv.out_channels != norm.num_features:
        raise InvalidArgumentError(f"cannot fold {norm} into {conv}: {conv.out_channels} channels vs "
                                   f"{norm.num_features}")
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype),
                               requires_grad=False)
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False)


# --- the deployed model -----------------------------------------------------------------------------

class DeployedModel(RuntimeModel):
    """An inference-only model run by PyTorch: casts and lays out the NCHW float input as its ``module`` wants, runs it
    without autograd, and returns float32 (a tensor, or a list of them for a feature extractor).

    A compiled module serves every batch size at full speed, without padding: a graph for a batch of one and a
    graph with a symbolic batch size for the rest (see :func:`_mark_batch`), each compiled at its first call.

    ``report`` says what was done: folded BatchNorms, the convolutions given a zero input channel for compiling
    (``padded_single_channel_convs``, see :func:`_pad_single_channel_convs`), the layout and the timings behind it
    and, once compiled, ``compiled_graphs`` (the input shape each graph serves, ``N`` for the symbolic batch of two
    or more, and the seconds its first call took: compilation and one run) and ``compile_s``, their sum.
    """

    runtime = "torch"

    def __init__(self, module: nn.Module | Any, *, precision: str, channels_last: bool, num_classes: int | None,
                 in_chans: int, report: dict[str, Any], compiled: bool = False,
                 input_size: tuple[int, int] | None = None, example_size: tuple[int, int] | None = None) -> None:
        # input_size: the one height and width an exported (int8) program takes; None: any
        super().__init__(precision=precision, num_classes=num_classes, in_chans=in_chans, input_size=input_size)
        self.module = module
        self.channels_last = channels_last
        self.example_size = example_size or input_size  # the size it was deployed for, and is saved at
        self.report = report
        self.compiled = compiled
        if compiled:
            report.setdefault("compiled_graphs", {})

    def describe(self) -> dict[str, Any]:
        """As saved: at the size it was deployed for (see :meth:`save`)."""
        size = list(self.example_size) if self.example_size else None
        return {**super().describe(), "input_size": size, "channels_last": self.channels_last}

    def save(self, folder: Path, stem: str) -> list[str]:
        """A ``.pt2`` program (``torch.export``) of the prepared module with a symbolic batch size, at the height
        and width it was deployed for: loaded, it takes that size only (ONNX and OpenVINO keep a segmentation
        model's dynamic size)."""
        if self.example_size is None:
            raise InvalidArgumentError("this deployed model does not know the image size it was deployed for")
        module = getattr(self.module, "_orig_mod", self.module)  # the module under torch.compile
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        tensors = itertools.chain(module.parameters(), module.buffers())
        device = next(tensors, torch.zeros(())).device
        pair = torch.zeros(2, self.in_chans, *self.example_size, dtype=PRECISIONS[self.precision].dtype,
                           device=device).contiguous(memory_format=memory_format)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (pair,), dynamic_shapes=({0: batch},))
        name = f"{stem}.pt2"
        torch.export.save(program, folder / name)
        return [name]

    @classmethod
    def load(cls, folder: Path, files: list[str], entry: dict[str, Any]) -> DeployedModel:
        """Compiled with frozen weights, as deployed (each graph at its first call)."""
        program = torch.export.load(folder / files[0])
        size = tuple(entry["input_size"])
        return cls(torch.compile(program.module()), precision=entry["precision"],
                   channels_last=entry["channels_last"], num_classes=entry["num_classes"],
                   in_chans=entry["in_chans"], report={}, compiled=True, input_size=size)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> Any:
        self.check_input(x)
        x = x.to(PRECISIONS[self.precision].dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.compiled:
            with torch.inference_mode():
                return _to_float32(self.module(x))
        x, graph = _mark_batch(x)
        graphs = self.report["compiled_graphs"]
        start = time.perf_counter()
        # Freezing (weights as constants, prepacked for oneDNN) is an Inductor setting read when it compiles, which
        # happens inside a call; torch.compile's `options` do not reach it.
        with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
            output = _to_float32(self.module(x))
        if graph not in graphs:
            graphs[graph] = round(time.perf_counter() - start, 2)
            self.report["compile_s"] = round(sum(graphs.values()), 2)
            log.info("compiled a graph for input %s in %.1f s", graph, graphs[graph])
        return output


def _mark_batch(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``x`` ready for the compiled module, and the name of the graph that will serve it.

    A batch of two or more is marked dynamic: one graph with a symbolic batch size serves them all. Dynamo
    specialises a dimension of size 1, so a batch of one gets its own graph, exactly the one a batch-1
    ``example_input`` compiles. At most two graphs per image size, and no padding. Measured on Xception at
    299x299, int8, 2-core EPYC (median of interleaved calls, ms): the symbolic graph at batch 8 240 against 239
    for a graph compiled for 8 (fp32 alike), so a graph per batch size would buy nothing for its 5-15 s of
    compilation; a graph with an unbacked batch (``mark_unbacked``), which would also take batch 1, runs it in
    41.5 against 36.8 for the batch-1 graph.
    """
    if len(x) < 2:
        return x, "x".join(map(str, x.shape))
    x = x.detach()  # a new alias to mark: the caller's tensor keeps no trace of it
    torch._dynamo.mark_dynamic(x, 0)
    return x, "x".join(["N", *map(str, x.shape[1:])])


def _to_float32(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float()
    return type(output)(_to_float32(item) for item in output)


def optimize_for_inference(model: nn.Module, precision: DeployPrecision = "auto",
                           calibration_data: Iterable[Any] | torch.Tensor | None = None, *,
                           example_input: torch.Tensor | None = None, channels_last: bool | None = None,
                           compile: bool = False) -> DeployedModel:
    """An inference-only copy of ``model`` (see the module docstring) that takes the same input and gives the
    same kind of output.

    Args:
        precision: ``"auto"`` (bf16 where this machine runs it natively, else fp32), ``"fp32"``, ``"bf16"`` or
            ``"int8"``.
        calibration_data: for int8 (required): real images, as an NCHW tensor, or an iterable of batches
            (tensors, or ``(images, labels, ...)`` tuples as a DataLoader yields). The first 32 batches are used.
        example_input: a batch like those you will run, used to time the memory layouts and compiled for at
            once (a batch of one, or one graph for every batch of two or more; the other is compiled at its first
            call); by default the first calibration batch, else one random 299x299 image. int8 serves its height
            and width only (fp32 and bf16 any size, as a segmentation model needs).
        channels_last: force a memory layout; None times both and keeps the faster.
        compile: ``torch.compile`` with frozen weights (always on for int8).
    """
    choice = choose_precision(precision, next(model.parameters()).device, allowed=DEPLOY_PRECISIONS)
    precision = choice.name
    if precision == "int8" and calibration_data is None:
        raise InvalidArgumentError("precision 'int8' needs calibration_data: a few hundred real images (an NCHW "
                                   "tensor or a DataLoader) preprocessed as for evaluation, to set the activation "
                                   "ranges")
    device = next(model.parameters()).device
    calibration = _calibration_batches(calibration_data, device) if calibration_data is not None else []
    if example_input is None:
        example_input = calibration[0] if calibration else _default_input(model, device)
    in_chans = getattr(model, "in_chans", example_input.shape[1])
    report: dict[str, Any] = {"precision": precision, "precision_reason": choice.reason}
    compile = compile or precision == "int8"

    module = fold_batchnorm(model)
    report["folded_batchnorms"] = module.folded_batchnorms
    if compile and (padded := _pad_single_channel_convs(module)):
        report["padded_single_channel_convs"] = padded
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if precision == "bf16":
        module = module.to(torch.bfloat16)
    example = example_input.to(device=device, dtype=PRECISIONS[precision].dtype)
    if channels_last is None:
        channels_last, timings = _faster_layout(module, example)
        report["layout_ms"] = timings
    report["channels_last"] = channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)
    example = example.contiguous(memory_format=memory_format)

    if precision == "int8":
        for pool in module.modules():
            if isinstance(pool, MaxPool2dSame):
                pool.explicit_padding = True
        reduce_range = probe().int8_reduce_range
        module = _quantize_int8(module, example, calibration, memory_format, reduce_range=reduce_range)
        report["calibration_images"] = sum(len(batch) for batch in calibration)
        report["int8_activation_bits"] = 7 if reduce_range else 8
    size = tuple(example.shape[-2:])
    deployed = DeployedModel(torch.compile(module) if compile else module, precision=precision,
                             channels_last=channels_last, num_classes=getattr(model, "num_classes", None),
                             in_chans=in_chans, report=report, compiled=compile,
                             input_size=size if precision == "int8" else None, example_size=size)
    if compile:
        deployed(example_input)  # compile now, so that the cost is paid and reported here, not at the first use
    log.debug("deployed %s: %s", getattr(model, "model_name", type(model).__name__), report)
    return deployed


class _ZeroChannelPadded(nn.Module):
    """A convolution over a single input channel, run over two: the input and a channel of zeros, which meets
    zero weights. Exact (in int8 too: zero quantizes to the zero point, and its per-channel weight scale does not
    change). See :func:`_pad_single_channel_convs`."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        with torch.no_grad():
            weight = torch.cat([conv.weight, torch.zeros_like(conv.weight)], dim=1)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.in_channels = 2
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 0, 0, 0, 0, 1)))  # one channel of zeros after the input's


def _pad_single_channel_convs(module: nn.Module) -> list[str]:
    """Give every convolution over a single input channel a second, all-zero one (in place); their names.

    Why: under a symbolic batch size, Inductor's lowering of oneDNN convolutions (``_prepare_convolution_fusion_
    create`` in ``torch/_inductor/mkldnn_ir.py``, torch 2.14) declares a contiguous output whenever the input's
    layout is also contiguous, which an ``(N, 1, H, W)`` input always is (the stride of a size-1 dimension does
    not count, so one channel is both NCHW and channels_last). The kernel it calls (the int8
    ``onednn.qconv_pointwise``; fp32/bf16 ``mkldnn._convolution_pointwise`` in channels_last) returns
    channels_last all the same, with its weight prepacked or its input given channels_last strides by Inductor,
    and the compiled graph's stride check fails at the first call: ``expected size 8==8, stride 1==784 at
    dim=1``. Measured on a grayscale compact model: int8 failed in both layouts with a stride-1 stem and in
    channels_last with a stride-2 one, fp32 and bf16 in channels_last; static shapes (the batch-1 graph) never.
    With two channels the layouts differ and both sides say channels_last. A 1x1 feature map (aligned models at
    32x32) is ambiguous in the same way, but then so is the output and the check passes (xception41 at 32x32
    compiles in int8). The cost: the stem convolution reads twice the channels, a fraction of a percent of the
    network (int8 compact model at 28x28, 2 threads, median of interleaved calls: batch 500 141.7 ms against
    141.9 for a static graph without the zero channel, batch 1 2.12 against 2.08).
    """
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Conv2d) and child.in_channels == 1]
    padded: dict[int, _ZeroChannelPadded] = {}  # a convolution shared by two parents is padded once
    for parent, name, child in targets:
        if id(child) not in padded:
            padded[id(child)] = _ZeroChannelPadded(child)
        parent._modules[name] = padded[id(child)]
    return [name for name, child in module.named_modules() if isinstance(child, _ZeroChannelPadded)]


def _default_input(model: nn.Module, device: torch.device) -> torch.Tensor:
    """One random image at 299x299, the paper's input size: pass ``example_input`` for any other."""
    return torch.randn(1, getattr(model, "in_chans", 3), 299, 299, device=device)


def _calibration_batches(data: Iterable[Any] | torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise InvalidArgumentError(f"calibration_data as a tensor must be an NCHW batch, got shape "
                                       f"{list(data.shape)}")
        data = data.split(32)
    batches = []
    for item in data:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise InvalidArgumentError("calibration_data must yield NCHW image tensors or (images, labels, ...) tuples")
        if len(batch):
            batches.append(batch.to(device=device, dtype=torch.float32))
        if len(batches) == CALIBRATION_BATCHES:
            break
    if not batches:
        raise InvalidArgumentError("calibration_data holds no images")
    return batches


@torch.inference_mode()
def _faster_layout(module: nn.Module, example: torch.Tensor, repeats: int = 3) -> tuple[bool, dict[str, float]]:
    """Time the module in both layouts on ``example``: (channels_last is faster, {layout: best ms})."""
    timings = {}
    for layout, memory_format in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        module.to(memory_format=memory_format)
        x = example.contiguous(memory_format=memory_format)
        module(x)  # warm-up: kernel selection, weight reordering
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            best = min(best, time.perf_counter() - start)
        timings[layout] = round(1000 * best, 3)
    return timings["channels_last"] <= timings["contiguous"], timings


def _quantize_int8(module: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor],
                   memory_format: torch.memory_format, *, reduce_range: bool = False) -> nn.Module:
    """PT2E static quantization: export, insert observers, calibrate, convert to quantize/dequantize pairs
    that Inductor lowers to oneDNN int8 kernels. ``reduce_range``: activations in 0..127 instead of 0..255, for
    CPUs without VNNI, whose u8 x s8 multiply-adds (``vpmaddubsw``) saturate their 16-bit pair sums when both
    activations of a pair are large (255 x 127 x 2 > 32767); at 7 bits they cannot (127 x 127 x 2 < 32767)."""
    import_runtime("torchao", "precision 'int8'")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    # A symbolic batch size, so that one quantized program serves every batch (DeployedModel compiles it for the
    # batch sizes it sees). torch.export specialises a dimension of size 1, so it traces a batch of two.
    pair = example[:1].expand(2, *example.shape[1:]).contiguous(memory_format=memory_format)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(module, (pair,), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for images in calibration:
            prepared(images.contiguous(memory_format=memory_format))
    return convert_pt2e(prepared)
