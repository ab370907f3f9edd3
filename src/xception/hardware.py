"""What this machine runs natively: the one place the library asks (precision="auto", int8's activation range, the
machine line of every record). Probed once per process; :func:`simulate` overrides it, so that the code paths of
other machines can be tested on any machine.

The CPU's instruction sets come from torch's own checks (``torch.cpu._is_*_supported``, which read CPUID through
the same library oneDNN dispatches with), and oneDNN's bf16 check: a CPU without AVX-512 BF16 or AMX has no fast
bf16 kernels (convolutions fall to PyTorch's reference code, about 10x slower than fp32 on an AVX2 CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .version import __version__


@dataclass(frozen=True)
class CudaDevice:
    name: str
    capability: tuple[int, int]
    memory_gib: float
    bf16: bool  # native bf16 tensor cores (compute capability 8.0, Ampere, and later)

    def describe(self) -> str:
        major, minor = self.capability
        return f"{self.name} (sm_{major}{minor}, {self.memory_gib:.0f} GiB{', bf16' if self.bf16 else ''})"


@dataclass(frozen=True)
class Hardware:
    """The machine as the library sees it. ``cpu_bf16`` means *native* bf16 (AVX-512 BF16 or AMX, or an Arm CPU
    that oneDNN runs bf16 on); ``onednn_bf16`` that oneDNN has bf16 kernels at all (also AVX-512 without BF16,
    where they are emulated)."""

    cpu_model: str
    architecture: str  # platform.machine(): x86_64, aarch64, ...
    cpu_isa: str  # torch's dispatch level: DEFAULT, AVX2, AVX512, ...
    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    amx: bool = False
    vnni: bool = False  # int8 dot products without 16-bit saturation (AVX512_VNNI or AVX_VNNI)
    onednn_bf16: bool = False
    cpu_bf16: bool = False
    cores: int = 1
    threads: int = 1  # torch's intra-op threads
    torch_version: str = ""
    cuda: tuple[CudaDevice, ...] = field(default_factory=tuple)
    simulated: tuple[str, ...] = ()  # the fields :func:`simulate` changed, so that no record passes them off as real

    def isa_flags(self) -> list[str]:
        names = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX512_BF16", "amx": "AMX", "vnni": "VNNI"}
        return [label for name, label in names.items() if getattr(self, name)]

    def cpu_line(self) -> str:
        """The CPU in one line: model, instruction sets, and what it lacks that the library's choices depend on."""
        line = f"{self.cpu_model}, {self.architecture}: {', '.join(self.isa_flags()) or self.cpu_isa}"
        if self.architecture in ("x86_64", "AMD64"):
            missing = [label for name, label in (("avx512", "AVX-512"), ("cpu_bf16", "native bf16"), ("vnni", "VNNI"))
                       if not getattr(self, name)]
            if missing:
                line += "; no " + ", no ".join(missing)
        return line

    def line(self) -> str:
        """The machine line every record carries: CPU, cores and threads, GPUs, torch."""
        parts = [self.cpu_line(), f"{self.cores} cores, {self.threads} threads"]
        parts += [f"GPU {device.describe()}" for device in self.cuda]
        parts.append(f"torch {self.torch_version}")
        if self.simulated:
            parts.append(f"SIMULATED {', '.join(self.simulated)}")
        return "; ".join(parts)

    def native_precisions(self, device: str = "cpu") -> tuple[str, ...]:
        """The precisions this machine runs at full speed on ``device`` (``cpu`` or ``cuda``), fastest first
        (int8 is the CPU's deployment precision: its kernels are correct on every x86 CPU, see
        :attr:`int8_reduce_range`)."""
        if device == "cuda":
            if not self.cuda:
                return ()
            return ("bf16", "fp16", "fp32") if all(d.bf16 for d in self.cuda) else ("fp16", "fp32")
        return ("int8", "bf16", "fp32") if self.cpu_bf16 else ("int8", "fp32")

    @property
    def int8_reduce_range(self) -> bool:
        """Quantize activations to 7 bits: without VNNI, x86 int8 kernels multiply u8 x s8 with ``vpmaddubsw``,
        whose pairwise sums saturate at 16 bits; a 7-bit activation range keeps them from overflowing (the same
        reason PyTorch's fbgemm/x86 qconfigs reduce the range)."""
        return self.architecture in ("x86_64", "AMD64") and not self.vnni

    def slow_precision(self, precision: str, device: str = "cpu") -> str | None:
        """Why ``precision`` runs slowly on ``device`` here (one clause), or None when it runs natively."""
        if device != "cpu" or precision != "bf16" or self.cpu_bf16:
            return None
        if self.onednn_bf16:
            return ("this CPU has AVX-512 but no BF16 instructions: oneDNN emulates bf16, usually no faster than "
                    "fp32")
        return ("this CPU has no native bf16 (no AVX512_BF16 or AMX): bf16 convolutions fall to PyTorch's slow "
                "reference kernels, about 10x slower than fp32")

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["line"] = self.line()
        record["native_precisions"] = {"cpu": list(self.native_precisions("cpu")),
                                       "cuda": list(self.native_precisions("cuda"))}
        return record


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        values = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        values = {key.strip(): value.strip() for key, value in values.items()}
        model = values.get("model name") or values.get("Hardware") or values.get("Model")
        if model and "cpu family" in values:  # x86: family and model tell CPU generations with one brand name apart
            return f"{model} (family {values['cpu family']} model {values.get('model', '?')})"
        if model:
            return model
    return platform.processor() or platform.machine() or "unknown CPU"


def _probe() -> Hardware:
    import torch

    checks = {name: getattr(torch.cpu, f"_is_{name}_supported", lambda: False)
              for name in ("avx2", "avx512", "avx512_bf16", "vnni")}
    flags = {name: bool(check()) for name, check in checks.items()}
    flags["amx"] = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if torch.backends.mkldnn.is_available() else False
    architecture = platform.machine()
    native_bf16 = onednn_bf16 and (flags["avx512_bf16"] or flags["amx"] or architecture in ("aarch64", "arm64"))
    cuda = ()
    if torch.cuda.is_available():
        cuda = tuple(CudaDevice(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i),
                                torch.cuda.get_device_properties(i).total_memory / 2**30,
                                torch.cuda.get_device_capability(i) >= (8, 0))
                     for i in range(torch.cuda.device_count()))
    return Hardware(cpu_model=_cpu_model(), architecture=architecture,
                    cpu_isa=torch.backends.cpu.get_cpu_capability(), **flags, onednn_bf16=onednn_bf16,
                    cpu_bf16=native_bf16, cores=os.cpu_count() or 1, threads=torch.get_num_threads(),
                    torch_version=torch.__version__, cuda=cuda)


@cache
def _probed() -> Hardware:
    return _probe()


_simulated: list[Hardware] = []


def probe() -> Hardware:
    """This machine (probed once; torch's thread count read now), or what :func:`simulate` says it is."""
    if _simulated:
        return _simulated[-1]
    import torch

    return dataclasses.replace(_probed(), threads=torch.get_num_threads())


@contextlib.contextmanager
def simulate(**changes: Any) -> Iterator[Hardware]:
    """Within the block, :func:`probe` answers as this machine with ``changes`` (fields of :class:`Hardware`), e.g.
    ``simulate(cpu_bf16=False, vnni=False)`` for an AVX2-only CPU: the library then chooses what it would choose
    there (its kernels are still this machine's)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Hardware)}
    if unknown:
        raise TypeError(f"Hardware has no field(s) {sorted(unknown)}")
    simulated = dataclasses.replace(probe(), **changes, simulated=tuple(sorted(changes)))
    _simulated.append(simulated)
    try:
        yield simulated
    finally:
        _simulated.remove(simulated)


def versions() -> dict[str, str | None]:
    """The versions a bug report needs: Python, this library, torch and the packages it runs beside."""
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version(), "xception": __version__}
    for package in ("torch", "torchvision", "numpy", "timm", "torchao", "onnx", "onnxruntime", "openvino", "keras"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found
