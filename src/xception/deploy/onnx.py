"""ONNX: the export (BatchNorm folded, dynamic batch, and dynamic height and width for segmentation), its check in
ONNX Runtime, and ONNX Runtime as a deploy runtime: fp32 with every graph optimization, and int8 as QDQ (static,
per-channel weights) calibrated on real images.

On an x86 CPU without VNNI, ONNX Runtime's u8 x s8 kernels (``vpmaddubsw``) can saturate as PyTorch's do (see
:func:`xception.deploy.torch_path._quantize_int8`); its documented remedy is ``reduce_range`` (7-bit weights),
which int8 then uses there.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..files import atomic_path
from ..hardware import probe
from ..layers import MaxPool2dSame
from .base import RuntimeModel, import_runtime
from .torch_path import fold_batchnorm

INPUT_NAME = "images"


def export_onnx(model: nn.Module, path: str | Path, *, img_size: int | tuple[int, int] = 299, opset: int = 18,
                dynamic_size: bool | None = None) -> Path:
    """Write ``model`` (BatchNorm folded, fp32) to an ONNX file with a dynamic batch dimension and, with
    ``dynamic_size``, a dynamic height and width (from the model's ``min_input_size``). ``dynamic_size`` defaults to
    True for segmentation models (``model.task``), whose output has the input's size, False for classifiers.

    The file is written to a temporary name and renamed, so a failed export leaves no partial file.
    """
    path = Path(path)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if dynamic_size is None:
        dynamic_size = getattr(model, "task", None) == "segmentation"
    folded = fold_batchnorm(model)
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_size:
        smallest = max(getattr(model, "min_input_size", 2), 2)  # torch.export specialises sizes 0 and 1
        dims |= {2: torch.export.Dim("height", min=smallest, max=8192),
                 3: torch.export.Dim("width", min=smallest, max=8192)}
        for pool in folded.modules():
            if isinstance(pool, MaxPool2dSame):
                pool.shape_agnostic = True  # TF-'same' pooling would freeze the example's parity into the graph
    example = torch.randn(2, getattr(model, "in_chans", 3), height, width)
    with atomic_path(path, suffix=".onnx") as temporary:
        torch.onnx.export(folded, (example,), str(temporary), input_names=["images"], output_names=["output"],
                          dynamic_shapes={"x": dims}, opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)
    return path


def check_onnx(model: nn.Module, path: str | Path, *, img_size: int | tuple[int, int] = 299,
               batch_sizes: tuple[int, ...] = (1, 3)) -> float:
    """The largest relative difference (max |onnx - torch| / max |torch|) between onnxruntime running ``path`` and
    ``model`` on random batches of each size in ``batch_sizes``, at ``img_size`` and, where the file's height and
    width are dynamic, also at a size of the other parity in both (``img_size`` + (17, 9)), where a graph that froze
    the example's size would fail or differ."""
    onnxruntime = import_runtime("onnxruntime", "checking an ONNX export")
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = session.get_inputs()[0]
    sizes = [(height, width)]
    if not all(isinstance(side, int) for side in images.shape[2:]):
        sizes.append((height + 17, width + 9))
    model = model.eval()
    worst = 0.0
    for (size_h, size_w), batch in itertools.product(sizes, batch_sizes):
        x = torch.rand(batch, getattr(model, "in_chans", 3), size_h, size_w) * 2 - 1
        (output,) = session.run(None, {images.name: x.numpy()})
        with torch.no_grad():
            expected = model(x).double()
        worst = max(worst, ((torch.from_numpy(output).double() - expected).abs().max() / expected.abs().max()).item())
    return worst


def session_options(onnxruntime: Any) -> Any:
    """Every graph optimization, and torch's intra-op thread count (so that ``--threads`` means the same for all
    runtimes)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    return options


class OnnxRuntimeModel(RuntimeModel):
    """An ONNX file run by ONNX Runtime on the CPU."""

    runtime = "onnxruntime"

    def __init__(self, model_bytes: bytes, *, precision: str, num_classes: int | None, in_chans: int) -> None:
        onnxruntime = import_runtime("onnxruntime", "the onnxruntime runtime")
        session = onnxruntime.InferenceSession(model_bytes, session_options(onnxruntime),
                                               providers=["CPUExecutionProvider"])
        sides = session.get_inputs()[0].shape[2:]  # ints where fixed, names where dynamic
        size = tuple(sides) if all(isinstance(side, int) for side in sides) else None
        super().__init__(precision=precision, num_classes=num_classes, in_chans=in_chans, input_size=size)
        self.model_bytes = model_bytes
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (output,) = self.session.run(None, {INPUT_NAME: array})
        return torch.from_numpy(output)

    def save(self, folder: Path, stem: str) -> list[str]:
        name = f"{stem}.onnx"
        (folder / name).write_bytes(self.model_bytes)
        return [name]

    @classmethod
    def load(cls, folder: Path, files: list[str], entry: dict[str, Any]) -> OnnxRuntimeModel:
        return cls((folder / files[0]).read_bytes(), precision=entry["precision"], num_classes=entry["num_classes"],
                   in_chans=entry["in_chans"])


def exported_onnx(model: nn.Module, example: torch.Tensor, workdir: Path) -> Path:
    """``model``'s fp32 ONNX export at ``example``'s height and width, in ``workdir``: exported once per workdir
    and size, since every ONNX Runtime and OpenVINO candidate of one deployment starts from it (a workdir serves
    one model)."""
    height, width = example.shape[-2:]
    path = workdir / f"model-{height}x{width}.onnx"
    if not path.is_file():
        export_onnx(model, path, img_size=(height, width))
    return path


def onnxruntime_model(model: nn.Module, precision: str, example: torch.Tensor, calibration: list[torch.Tensor],
                      workdir: Path) -> OnnxRuntimeModel:
    """``model`` exported to ONNX (fp32) and, for ``"int8"``, quantized to QDQ on ``calibration``: static
    quantization with per-channel int8 weights and uint8 activations, after ONNX Runtime's pre-processing
    (shape inference and graph optimization), as its documentation recommends."""
    import_runtime("onnxruntime", "the onnxruntime runtime")
    path = exported_onnx(model, example, workdir)
    if precision == "int8":
        path = quantize_onnx(path, path.with_suffix(".int8.onnx"), calibration)
    return OnnxRuntimeModel(path.read_bytes(), precision=precision, num_classes=getattr(model, "num_classes", None),
                            in_chans=example.shape[1])


def quantize_onnx(source: Path, destination: Path, calibration: list[torch.Tensor]) -> Path:
    """``source`` (fp32) quantized to QDQ int8 at ``destination``, activation ranges from ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch.float().contiguous().numpy()}

    prepared = destination.with_suffix(".pre.onnx")
    # ONNX's own shape inference only: ONNX Runtime's symbolic one (meant for transformers) adds nothing to these
    # convolutional graphs (the same nodes for Xception), gives up on a segmentation model that resizes an input of
    # dynamic size, and on giving up writes files into the working folder.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(destination), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=probe().int8_reduce_range)
    return destination
