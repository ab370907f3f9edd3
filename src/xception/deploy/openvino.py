"""OpenVINO as a deploy runtime: the ONNX export converted to an OpenVINO model (IR: ``.xml`` and ``.bin``), run at
fp32, at bf16 where the CPU runs it natively, and at int8 quantized by NNCF on real images.

The precision is pinned with ``INFERENCE_PRECISION_HINT``: OpenVINO's CPU plugin otherwise runs bf16 by default on
CPUs that have it (AVX512_BF16, AMX), so an "fp32" model would silently be a bf16 one there.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RuntimeModel, import_runtime
from .onnx import exported_onnx

# The hint's value for each precision; int8 runs its quantized operations in int8 and the rest in f32.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoModel(RuntimeModel):
    """An OpenVINO model compiled for the CPU."""

    runtime = "openvino"

    def __init__(self, model: Any, *, precision: str, num_classes: int | None, in_chans: int) -> None:
        ov = import_runtime("openvino", "the openvino runtime")
        shape = model.inputs[0].get_partial_shape()
        sides = [shape[2], shape[3]]
        size = tuple(side.get_length() for side in sides) if all(side.is_static for side in sides) else None
        super().__init__(precision=precision, num_classes=num_classes, in_chans=in_chans, input_size=size)
        self.model = model
        self.compiled = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # as for every runtime: torch's thread count
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it, as the others run
        })
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        output = self.request.infer({0: array})[self.compiled.output(0)]
        return torch.from_numpy(output.copy())  # the request reuses its output buffer at the next call

    def save(self, folder: Path, stem: str) -> list[str]:
        ov = import_runtime("openvino", "the openvino runtime")
        ov.save_model(self.model, str(folder / f"{stem}.xml"), compress_to_fp16=False)  # weights as they are
        return [f"{stem}.xml", f"{stem}.bin"]

    @classmethod
    def load(cls, folder: Path, files: list[str], entry: dict[str, Any]) -> OpenVinoModel:
        ov = import_runtime("openvino", "the openvino runtime")
        model = ov.Core().read_model(str(folder / files[0]))
        return cls(model, precision=entry["precision"], num_classes=entry["num_classes"], in_chans=entry["in_chans"])


def openvino_model(model: nn.Module, precision: str, example: torch.Tensor, calibration: list[torch.Tensor],
                   workdir: Path) -> OpenVinoModel:
    """``model`` through its ONNX export to OpenVINO; for ``"int8"``, quantized by ``nncf.quantize`` (its default
    mixed preset: symmetric weights, per channel) on every calibration batch."""
    ov = import_runtime("openvino", "the openvino runtime")
    converted = ov.convert_model(str(exported_onnx(model, example, workdir)))
    if precision == "int8":
        nncf = import_runtime("nncf", "openvino int8")
        batches = [batch.float().contiguous().numpy() for batch in calibration]
        with contextlib.redirect_stdout(sys.stderr):  # its progress bars, off the command's own output
            converted = nncf.quantize(converted, nncf.Dataset(batches), subset_size=len(batches))
    return OpenVinoModel(converted, precision=precision, num_classes=getattr(model, "num_classes", None),
                         in_chans=example.shape[1])
