"""Fine-tuning, demonstrated on real data: does the finetune recipe beat plain fine-tuning and training from scratch?

Fashion-MNIST. The compact model is pretrained on classes 0-4 (all their 30,000 training images), then trained on
classes 5-9 from 100 training images per class (500 images), and tested on all 5,000 test images of classes 5-9:

- finetune: the finetune recipe from the pretrained run (classifier alone first, then everything with layer-wise
  learning-rate decay, BatchNorm statistics frozen);
- plain: the same pretrained run, every layer trained at the compact recipe's rate, nothing frozen;
- scratch: the compact recipe from random weights, for many more epochs (its best epoch and steps are reported).

Three seeds each; mean and standard deviation of the test top-1 of the last epoch (scratch: of its best), and
minutes. Writes benchmarks/results/finetune.json and prints a markdown table.

    python benchmarks/finetune.py [--output runs/finetune-demo] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from xception.experiments.report import today
from xception.files import write_text_atomic
from xception.hardware import probe
from xception.training import TrainConfig, train

NEW_CLASSES = "5,6,7,8,9"
COMMON = {"data": "fashion-mnist", "classes": NEW_CLASSES, "train_per_class": 100, "img_size": 28,
          "batch_size": 32, "progress": False}
METHODS = {
    "finetune": {"recipe": "finetune", "augmentation": "compact", "epochs": 12, "freeze_epochs": 3,
                 "precision": "bf16"},
    "plain": {"recipe": "compact", "epochs": 12, "ema_decay": 0},
    "scratch": {"recipe": "compact", "epochs": 30, "ema_decay": 0},
}


def pretrain(output: Path) -> Path:
    """The compact recipe on classes 0-4; a finished run is reused."""
    folder = output / "pretrain-classes-0-4"
    train(TrainConfig(data="fashion-mnist", recipe="compact", classes="0,1,2,3,4", epochs=5, output=folder,
                      resume=True, progress=False))
    return folder


def run(method: str, seed: int, pretrained: Path, output: Path) -> dict:
    weights = None if method == "scratch" else str(pretrained)
    started = time.monotonic()
    result = train(TrainConfig(**COMMON, **METHODS[method], weights=weights, seed=seed,
                               output=output / f"{method}-seed{seed}"))
    history = result["history"]
    best = max(history, key=lambda record: record["val_top1"])
    reported = best if method == "scratch" else history[-1]
    return {"method": method, "seed": seed, "top1": reported["val_top1"], "epoch": reported["epoch"],
            "steps": reported["step"], "minutes": (time.monotonic() - started) / 60,
            "curve": [record["val_top1"] for record in history]}


def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        top1 = [100 * r["top1"] for r in mine]
        rows.append({"method": method, "top1_mean": statistics.mean(top1),
                     "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "steps": [r["steps"] for r in mine], "minutes": sum(r["minutes"] for r in mine)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/finetune-demo"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    started = time.monotonic()
    pretrained = pretrain(args.output)
    pretrain_minutes = (time.monotonic() - started) / 60
    runs = [run(method, seed, pretrained, args.output) for seed in range(args.seeds) for method in METHODS]
    rows = summary(runs)
    result = {"date": today(), "machine": probe().line(),
              "command": "python benchmarks/finetune.py", "pretrain_minutes": pretrain_minutes,
              "runs_minutes": sum(r["minutes"] for r in runs), "summary": rows, "runs": runs}
    path = Path(__file__).parent / "results" / "finetune.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print("| method | test top-1 (classes 5-9), mean ± std | steps | minutes (all seeds) |")
    print("|---|---:|---|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['top1_mean']:.2f} ± {row['top1_std']:.2f} | "
              f"{', '.join(map(str, row['steps']))} | {row['minutes']:.1f} |")
    print(f"pretraining {pretrain_minutes:.1f} min; the {len(runs)} runs {result['runs_minutes']:.1f} min; {path}")


if __name__ == "__main__":
    main()
