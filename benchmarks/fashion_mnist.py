"""The README's headline training figure: the default `xception train` (compact recipe, Fashion-MNIST) end to
end, timed from the command's start, with the test-set top-1 it reaches.

    python benchmarks/fashion_mnist.py [--output runs/bench-fashion-mnist] [--results FILE]
                                       [extra `xception train` arguments]

Writes ``--results`` (default benchmarks/results/fashion_mnist.json: figure, command, the probe's machine line, the
precision the run chose and why, date) and prints one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from xception.files import write_text_atomic
from xception.hardware import probe

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench-fashion-mnist")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "fashion_mnist.json",
                        help="the JSON record to write")
    args, extra = parser.parse_known_args()
    command = ["xception", "train", "--output", args.output, *extra]
    started = time.monotonic()
    subprocess.run(command, check=True)
    minutes = (time.monotonic() - started) / 60
    evaluation = subprocess.run(["xception", "eval", "--checkpoint", args.output, "--json"], check=True,
                                capture_output=True, text=True)
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    config = json.loads((Path(args.output) / "config.json").read_text())
    history = [json.loads(line) for line in (Path(args.output) / "metrics.jsonl").read_text().splitlines()]
    result = {"top1": metrics["top1"], "top5": metrics["top5"], "minutes": round(minutes, 2),
              "epochs": [round(r["val_top1"], 4) for r in history if "val_top1" in r],
              "command": " ".join(command), "machine": probe().line(), "precision": config["precision"],
              "schedule_plan": config.get("schedule_plan"), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    write_text_atomic(args.results, json.dumps(result, indent=2) + "\n")
    print(f"Fashion-MNIST test top-1 {result['top1']:.4f} in {minutes:.1f} minutes ({result['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
