"""What every deployed model is, whichever runtime runs it: an inference-only ``nn.Module`` that takes the NCHW float
batch the trained model takes and returns float32 torch tensors, so that evaluation, prediction and the benchmarks
use it unchanged. Each runtime (torch, ONNX Runtime, OpenVINO) subclasses :class:`RuntimeModel` and knows how to
write itself to a folder and read itself back."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InvalidArgumentError, XceptionError

EXTRA = "pip install 'xception[deploy]'"


class RuntimeUnavailable(XceptionError, ImportError):
    """A runtime (or the library it needs) that is not installed or cannot run on this machine; the message says
    which and what to do (the command line prints it as one line, like the library's other errors)."""


def import_runtime(package: str, purpose: str) -> ModuleType:
    """``package`` imported, or :class:`RuntimeUnavailable` naming it and the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise RuntimeUnavailable(f"{purpose} needs {package}, which is not installed ({EXTRA})") from error


class RuntimeModel(nn.Module):
    """Inference only: ``train()``/``eval()`` (which evaluation loops call) change nothing underneath.

    ``input_size`` is the one (height, width) the model takes, or None where any size runs (a segmentation model
    exported with a dynamic size, and every fp32/bf16 torch model)."""

    runtime: ClassVar[str] = ""

    def __init__(self, *, precision: str, num_classes: int | None, in_chans: int,
                 input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.precision = precision
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.input_size = input_size

    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for an image size the model was not made for (the runtimes' own are cryptic)."""
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            raise InvalidArgumentError(f"this {self.runtime} {self.precision} model was made for "
                                       f"{self.input_size[0]}x{self.input_size[1]} images, got {x.shape[-2]}x"
                                       f"{x.shape[-1]}: deploy it again for the size it will run at")

    def train(self, mode: bool = True) -> RuntimeModel:
        self.training = mode
        return self

    @property
    def candidate(self) -> str:
        """The name this model goes by among the deploy candidates, e.g. ``"onnxruntime int8"``."""
        return f"{self.runtime} {self.precision}"

    def describe(self) -> dict[str, Any]:
        """What a deploy.json records of it besides its files."""
        return {"runtime": self.runtime, "precision": self.precision, "num_classes": self.num_classes,
                "in_chans": self.in_chans, "input_size": list(self.input_size) if self.input_size else None}

    def save(self, folder: Path, stem: str) -> list[str]:
        """Write the model's files into ``folder`` under names starting with ``stem``; their names."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, files: list[str], entry: dict[str, Any]) -> RuntimeModel:
        """The model :meth:`save` wrote, with the description ``entry`` (:meth:`describe` and more)."""
        raise NotImplementedError
