"""``xception env``: what this machine runs and how fast, for bug reports and benchmark records (as ``python -m
torch.utils.collect_env`` does for PyTorch)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def environment(limits_seconds: float | None = 3.0) -> dict[str, Any]:
    """The probe, the versions, the precision ``auto`` picks, and (unless ``limits_seconds`` is None) a matmul
    limit per precision measured in about that many seconds each."""
    from ..benchmark import machine_limits
    from ..hardware import probe, versions
    from ..precision import DEPLOY_PRECISIONS, TRAINING_PRECISIONS, choose_precision

    hardware = probe()
    devices = ["cpu"] + (["cuda"] if hardware.cuda else [])
    report: dict[str, Any] = {
        "machine": hardware.line(), "hardware": hardware.to_json(), "versions": versions(),
        "auto": {device: {"training": choose_precision("auto", device, TRAINING_PRECISIONS).to_json(),
                          "deployment": choose_precision("auto", device, DEPLOY_PRECISIONS).to_json()}
                 for device in devices},
    }
    if limits_seconds is not None:
        report["matmul_limits"] = [machine_limits(device=device, seconds=limits_seconds) for device in devices]
    return report


def environment_text(report: dict[str, Any]) -> str:
    hardware = report["hardware"]
    lines = [f"machine: {report['machine']}",
             "versions: " + ", ".join(f"{name} {version or '-'}" for name, version in report["versions"].items())]
    for device, natives in hardware["native_precisions"].items():
        if natives:
            lines.append(f"native precisions ({device}): {', '.join(natives)}")
    for device, choices in report["auto"].items():
        lines.append(f"precision auto ({device}): training {choices['training']['name']}, deployment "
                     f"{choices['deployment']['name']} ({choices['training']['reason'].removeprefix('auto: ')})")
    if not hardware["vnni"] and hardware["architecture"] in ("x86_64", "AMD64"):
        lines.append("int8: activations quantized to 7 bits (no VNNI: the kernels' 16-bit sums would saturate)")
    for limits in report.get("matmul_limits", []):
        rates = ", ".join(f"{key.removesuffix('_gflops')} {value:,.1f} ({limits[key.replace('gflops', 'size')]})"
                          for key, value in limits.items() if key.endswith("_gflops"))
        lines.append(f"matmul limit ({limits['device']}, GFLOP/s at the side measured): {rates}")
    return "\n".join(lines)


def command_env(args: argparse.Namespace) -> int:
    report = environment(None if args.no_limits else args.limit_seconds)
    print(json.dumps(report, indent=2) if args.json else environment_text(report))
    return 0


def add_env_command(commands: Any) -> None:
    from ..training.config import bounded

    env = commands.add_parser("env", help="this machine as the library sees it: CPU, instruction sets, GPUs, "
                                          "versions, native precisions, matmul limits (paste it into bug reports)")
    env.add_argument("--json", action="store_true", help="print JSON for scripts")
    env.add_argument("--no-limits", action="store_true", help="skip the matmul timings (instant)")
    env.add_argument("--limit-seconds", type=bounded(float, above=0), default=3.0,
                     help="seconds for each precision's matmul limit (default 3)")
    env.set_defaults(run=command_env)
