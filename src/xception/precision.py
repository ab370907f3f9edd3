"""One table of numeric precisions, shared by training, evaluation, the benchmark and deployment. Torch is imported
when a precision is used, not to read the table (the command line's choices)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    name: str
    dtype_name: str  # torch's name of the activations' dtype (int8 models take and give float32)
    autocast: bool  # run float32 modules under torch.autocast to this dtype (training, eager evaluation)
    devices: tuple[str, ...]
    why_not_elsewhere: str = ""

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", "float32", autocast=False, devices=("cpu", "cuda")),
    # Fast on CPUs with AVX-512 BF16 or AMX, and on every recent GPU.
    "bf16": Precision("bf16", "bfloat16", autocast=True, devices=("cpu", "cuda")),
    "fp16": Precision("fp16", "float16", autocast=True, devices=("cuda",),
                      why_not_elsewhere="CPU autocast runs fp16 convolutions slowly or not at all; use bf16 there"),
    # Deployment only: PT2E static quantization with oneDNN's int8 kernels.
    "int8": Precision("int8", "float32", autocast=False, devices=("cpu",),
                      why_not_elsewhere="the int8 path uses oneDNN's CPU kernels"),
}
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")


def get_precision(name: str, device: str | torch.device = "cpu", allowed: tuple[str, ...] = TRAINING_PRECISIONS,
                  ) -> Precision:
    """The precision ``name``, checked against what the caller supports and what ``device`` can run."""
    if name not in allowed:
        raise InvalidArgumentError(f"precision must be one of {', '.join(allowed)}, got {name!r}")
    import torch

    precision = PRECISIONS[name]
    device_type = torch.device(device).type
    if device_type not in precision.devices:
        raise InvalidArgumentError(f"precision {name!r} needs device {' or '.join(precision.devices)}, not "
                                   f"{device_type}: "
                                   f"{precision.why_not_elsewhere}")
    return precision


def autocast(device: str | torch.device, precision: str) -> AbstractContextManager[object]:
    """``torch.autocast`` to the precision's dtype where it autocasts; a no-op context otherwise."""
    import torch

    entry = PRECISIONS[precision]
    if not entry.autocast:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=entry.dtype)
