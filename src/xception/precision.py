"""One table of numeric precisions, shared by training, evaluation, the benchmark and deployment, and the one choice
of ``"auto"`` (:func:`choose_precision`) from what the hardware runs natively. Torch is imported when a precision is
used, not to read the table (the command line's choices)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

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
DEPLOY_PRECISIONS = ("fp32", "bf16", "int8")
AUTO = "auto"  # the fastest precision this machine runs natively, of those the caller takes (never int8)

log = logging.getLogger("xception.precision")


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


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, what was asked for (``auto`` or a name) and why: printed at start and recorded
    with the run or the benchmark."""

    name: str
    requested: str
    reason: str

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_precision(requested: str, device: str | torch.device = "cpu",
                     allowed: tuple[str, ...] = TRAINING_PRECISIONS) -> PrecisionChoice:
    """``requested`` resolved for ``device``: ``"auto"`` becomes the first of the machine's native precisions
    (:meth:`xception.hardware.Hardware.native_precisions`: bf16 on a CPU with AVX512_BF16 or AMX and on a GPU with
    bf16, fp16 on an older GPU, else fp32) that the caller ``allowed``; a name is checked, and where this machine
    runs it slowly (bf16 on a CPU without native bf16) it still runs, after a warning that names the fast choice."""
    import torch

    from .hardware import probe

    device_type = torch.device(device).type
    hardware = probe()
    if requested == AUTO:
        native = [name for name in hardware.native_precisions(device_type) if name in allowed and name != "int8"]
        name = native[0] if native else "fp32"
        if device_type == "cpu":
            why = ("this CPU runs bf16 natively (AVX512_BF16 or AMX)" if name == "bf16"
                   else "this CPU has no native bf16 (no AVX512_BF16 or AMX)")
        else:
            gpus = ", ".join(device.name for device in hardware.cuda)
            why = f"{gpus} runs bf16 natively" if name == "bf16" else f"{gpus} has no bf16 (compute capability < 8.0)"
        return PrecisionChoice(name, AUTO, f"auto: {why}")
    if requested not in allowed:
        raise InvalidArgumentError(f"precision must be {AUTO} or one of {', '.join(allowed)}, got {requested!r}")
    get_precision(requested, device_type, allowed=allowed)
    slow = hardware.slow_precision(requested, device_type)
    if slow is None:
        return PrecisionChoice(requested, requested, "as asked")
    fast = choose_precision(AUTO, device, allowed).name
    log.warning("precision %s runs slowly here: %s; precision auto (%s on this machine) is the fast choice",
                requested, slow, fast)
    return PrecisionChoice(requested, requested, f"as asked; slow here: {slow}")


def autocast(device: str | torch.device, precision: str) -> AbstractContextManager[object]:
    """``torch.autocast`` to the precision's dtype where it autocasts; a no-op context otherwise."""
    import torch

    entry = PRECISIONS[precision]
    if not entry.autocast:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=entry.dtype)
