"""The deploy candidates: each runtime at each precision it runs, how to build one from a trained model, whether
this machine can, and how a written one is read back.

A candidate is built from the model in evaluation mode, an example batch (its height and width are the size the
candidate is made for; ONNX and OpenVINO keep a segmentation model's height and width dynamic) and calibration
batches of real images, preprocessed as for evaluation (int8 sets its activation ranges from them).
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..hardware import probe
from .base import EXTRA, RuntimeModel
from .onnx import OnnxRuntimeModel, onnxruntime_model
from .openvino import OpenVinoModel, openvino_model
from .torch_path import DeployedModel, optimize_for_inference

Builder = Callable[[nn.Module, str, torch.Tensor, list[torch.Tensor], Path], RuntimeModel]


def _torch_model(model: nn.Module, precision: str, example: torch.Tensor, calibration: list[torch.Tensor],
                 workdir: Path) -> RuntimeModel:
    """Compiled with frozen weights; the layout timed on the example."""
    return optimize_for_inference(model, precision, calibration if precision == "int8" else None,
                                  example_input=example, compile=True)


@dataclass(frozen=True)
class RuntimeCandidate:
    runtime: str
    precision: str
    packages: tuple[str, ...]  # what must be importable (the ``deploy`` extra installs them all)
    builder: Builder

    def build(self, model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor],
              workdir: Path | None = None) -> RuntimeModel:
        """This candidate made from ``model`` in evaluation mode (see the module docstring). ``workdir``: a folder
        for intermediate files that the candidates of one model share (its ONNX export); a temporary one if None."""
        if workdir is not None:
            return self.builder(model, self.precision, example, calibration, workdir)
        with tempfile.TemporaryDirectory(prefix="xception-deploy-") as scratch:
            return self.builder(model, self.precision, example, calibration, Path(scratch))

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision}"

    def unavailable(self) -> str | None:
        """Why this machine cannot build the candidate, or None."""
        missing = [package for package in self.packages if importlib.util.find_spec(package) is None]
        if missing:
            return f"{', '.join(missing)} not installed ({EXTRA})"
        if self.precision == "bf16" and "bf16" not in probe().native_precisions("cpu"):
            return "this CPU has no native bf16 (no AVX512_BF16 or AMX)"
        return None


_ONNX = ("onnx", "onnxscript")  # the exporter's own needs
CANDIDATES = tuple(RuntimeCandidate(runtime, precision, packages, build) for runtime, precision, packages, build in (
    ("torch", "fp32", (), _torch_model),
    ("torch", "bf16", (), _torch_model),
    ("torch", "int8", ("torchao",), _torch_model),
    ("onnxruntime", "fp32", (*_ONNX, "onnxruntime"), onnxruntime_model),
    ("onnxruntime", "int8", (*_ONNX, "onnxruntime"), onnxruntime_model),
    ("openvino", "fp32", (*_ONNX, "openvino"), openvino_model),
    ("openvino", "bf16", (*_ONNX, "openvino"), openvino_model),
    ("openvino", "int8", (*_ONNX, "openvino", "nncf"), openvino_model),
))
CANDIDATE_NAMES = tuple(candidate.name for candidate in CANDIDATES)
RUNTIMES: dict[str, type[RuntimeModel]] = {"torch": DeployedModel, "onnxruntime": OnnxRuntimeModel,
                                           "openvino": OpenVinoModel}


def get_candidate(name: str) -> RuntimeCandidate:
    """The candidate called ``name`` (``"openvino int8"``; ``"openvino-int8"`` and ``"openvino:int8"`` too)."""
    wanted = name.replace("-", " ").replace(":", " ").strip()
    for candidate in CANDIDATES:
        if candidate.name == wanted:
            return candidate
    raise InvalidArgumentError(f"unknown deploy candidate {name!r}; the candidates: {', '.join(CANDIDATE_NAMES)}")
