"""The README's headline training figure: the default `xception train` (compact recipe, Fashion-MNIST) end to
end, timed from the command's start, with the test-set top-1 it reaches.

    python benchmarks/fashion_mnist.py [--output runs/bench-fashion-mnist] [extra `xception train` arguments]

Writes benchmarks/results/fashion_mnist.json (figure, command, machine, date) and prints one line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench-fashion-mnist")
    args, extra = parser.parse_known_args()
    command = ["xception", "train", "--output", args.output, *extra]
    started = time.monotonic()
    subprocess.run(command, check=True)
    minutes = (time.monotonic() - started) / 60
    evaluation = subprocess.run(["xception", "eval", "--checkpoint", args.output, "--json"], check=True,
                                capture_output=True, text=True)
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    result = {"top1": metrics["top1"], "top5": metrics["top5"], "minutes": round(minutes, 2),
              "command": " ".join(command), "machine": machine(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "fashion_mnist.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Fashion-MNIST test top-1 {result['top1']:.4f} in {minutes:.1f} minutes ({result['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
