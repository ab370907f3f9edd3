"""Fine-tuning at any data size: the finetune recipe against plain fine-tuning and training from scratch, at 10, 25
and 100 training images per class.

Fashion-MNIST. The compact model is pretrained on classes 0-4 (all their 30,000 training images, 5 epochs), then
trained on classes 5-9 from N training images per class and tested on all 5,000 test images of classes 5-9:

- finetune: the finetune recipe from the pretrained run with nothing else set, as a user gets it: its batch, epochs
  and classifier-alone phase as the recipe fits them to the data, the pretrained run's image size and augmentation;
- plain: the same pretrained run with the compact recipe (every layer at its rate, nothing frozen, no EMA), at the
  finetune run's batch and optimizer steps;
- scratch: the compact recipe from random weights (no EMA) at that batch, for three times those steps; its best
  epoch, picked on the first 1,000 test images (so it is an optimistic figure for scratch).

Each run evaluates on the first 1,000 test images at each epoch (about half of them of classes 5-9) and the figure is
its final weights' (scratch: its best epoch's) top-1 on all of them. Mean and standard deviation over the seeds.

--tune reports held-out *training* images instead, never the test set: the first N training images of each class
train, 200 others per class (from the 1,000th on) are held out, both written as an image folder. The recipe's
settings were chosen with it; extra finetune settings to compare go in --set KEY=VALUE (TrainConfig fields).

    python benchmarks/finetune.py [--sizes 10,25,100] [--seeds 3] [--methods finetune,plain,scratch] [--tune]
                                  [--set KEY=VALUE ...] [--output runs/finetune-demo] [--results FILE]

Writes RESULTS (default benchmarks/results/finetune.json; with --tune, finetune-tuning.json) and prints a table.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image

from xception.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from xception.experiments.report import today
from xception.files import write_text_atomic
from xception.hardware import probe
from xception.inference import evaluate_on, load_model
from xception.training import TrainConfig, train
from xception.weights import load_weights

ROOT = Path(__file__).resolve().parent
NEW_CLASSES = (5, 6, 7, 8, 9)
HELD_OUT_FROM, HELD_OUT_PER_CLASS = 1000, 200  # --tune: training images held out of every class
VAL_IMAGES = 1000  # test images evaluated at each epoch (the final figure is on all of them)
SCRATCH_STEPS = 3  # scratch trains this many times the finetune run's steps


def pretrain(output: Path) -> Path:
    """The compact recipe on classes 0-4; a finished run is reused."""
    folder = output / "pretrain-classes-0-4"
    train(TrainConfig(data="fashion-mnist", recipe="compact", classes="0,1,2,3,4", epochs=5, output=folder,
                      resume=True, progress=False))
    return folder


def held_out_folder(output: Path, per_class: int) -> Path:
    """--tune's data: the first ``per_class`` training images of each new class in train/, 200 later ones in val/."""
    folder = output / f"held-out-{per_class}"
    if (folder / "done").is_file():
        return folder
    images, labels = load_fashion_mnist("train")
    for label in NEW_CLASSES:
        indices = (labels == label).nonzero().flatten().tolist()
        for split, chosen in (("train", indices[:per_class]),
                              ("val", indices[HELD_OUT_FROM:HELD_OUT_FROM + HELD_OUT_PER_CLASS])):
            target = folder / split / FASHION_MNIST_CLASSES[label].replace("/", "-")
            target.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                Image.fromarray(images[index].numpy()).save(target / f"{index}.png")
    (folder / "done").write_text("")
    return folder


def data_options(per_class: int, tune: bool, output: Path) -> dict[str, Any]:
    if tune:
        return {"data": str(held_out_folder(output, per_class))}
    return {"data": "fashion-mnist", "classes": ",".join(map(str, NEW_CLASSES)), "train_per_class": per_class,
            "val_subset": VAL_IMAGES}


def run(method: str, per_class: int, seed: int, pretrained: Path, output: Path, tune: bool,
        finetune_run: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """One training run and its figure; plain and scratch take their batch and steps from ``finetune_run``."""
    folder = output / ("tune" if tune else "table") / f"{per_class}-per-class" / f"{method}-seed{seed}"
    options: dict[str, Any] = {**data_options(per_class, tune, output), "seed": seed, "progress": False,
                               "output": folder}
    if method == "finetune":
        options |= {"recipe": "finetune", "weights": str(pretrained), **extra}
    else:
        batch, steps_per_epoch = finetune_run["batch_size"], finetune_run["steps_per_epoch"]
        steps = finetune_run["steps"] * (SCRATCH_STEPS if method == "scratch" else 1)
        options |= {"recipe": "compact", "ema_decay": 0.0, "batch_size": batch,
                    "epochs": math.ceil(steps / steps_per_epoch)}
        if method == "plain":
            options["weights"] = str(pretrained)
    started = time.monotonic()
    result = train(TrainConfig(**options))
    minutes = (time.monotonic() - started) / 60
    config = json.loads((folder / "config.json").read_text())
    history = result["history"]
    best = max(history, key=lambda record: record["val_top1"])
    loaded = load_model(folder)  # its best weights
    if method != "scratch":
        load_weights(loaded.model, folder / "last.safetensors")
    metrics, _ = evaluate_on(loaded, options["data"], "val", precision=None)
    return {"method": method, "per_class": per_class, "seed": seed, "top1": metrics["top1"],
            "epoch": best["epoch"] if method == "scratch" else history[-1]["epoch"], "steps": result["steps"],
            "batch_size": config["recipe"]["batch_size"], "steps_per_epoch": config["steps"]["per_epoch"],
            "head_steps": config["steps"]["head"], "minutes": minutes,
            "curve": [round(record["val_top1"], 4) for record in history]}


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for per_class in sorted({r["per_class"] for r in runs}):
        for method in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == method and r["per_class"] == per_class]
            top1 = [100 * r["top1"] for r in mine]
            rows.append({"per_class": per_class, "method": method, "top1_mean": statistics.mean(top1),
                         "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                         "steps": sorted({r["steps"] for r in mine}), "batch_size": mine[0]["batch_size"],
                         "minutes": sum(r["minutes"] for r in mine)})
    return rows


def parse_set(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,25,100", help="training images per class, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="finetune,plain,scratch")
    parser.add_argument("--tune", action="store_true", help="held-out training images instead of the test set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a finetune run's option")
    parser.add_argument("--output", type=Path, default=Path("runs/finetune-demo"))
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    extra = parse_set(args.set)
    methods = args.methods.split(",")
    if methods[0] != "finetune":
        parser.error("--methods starts with finetune: the others take its batch and steps")
    started = time.monotonic()
    pretrained = pretrain(args.output)
    pretrain_minutes = (time.monotonic() - started) / 60
    runs = []
    for per_class in map(int, args.sizes.split(",")):
        for seed in range(args.seeds):
            finetuned = run("finetune", per_class, seed, pretrained, args.output, args.tune, None, extra)
            runs.append(finetuned)
            runs += [run(method, per_class, seed, pretrained, args.output, args.tune, finetuned, extra)
                     for method in methods[1:]]
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    rows = summary(runs)
    command = "python benchmarks/finetune.py " + " ".join(
        [f"--sizes {args.sizes}", f"--seeds {args.seeds}", f"--methods {args.methods}"]
        + (["--tune"] if args.tune else []) + [f"--set {pair}" for pair in args.set])
    result = {"date": today(), "machine": probe().line(), "command": command, "evaluated_on":
              "held-out training images" if args.tune else "the test images of classes 5-9",
              "finetune_options": extra, "pretrain_minutes": pretrain_minutes,
              "runs_minutes": sum(r["minutes"] for r in runs), "summary": rows, "runs": runs}
    path = args.results or ROOT / "results" / ("finetune-tuning.json" if args.tune else "finetune.json")
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(f"| images per class | method | top-1, mean ± std ({len(runs) // len(rows)} seeds) | batch | steps | "
          "minutes |")
    print("|---:|---|---:|---:|---|---:|")
    for row in rows:
        print(f"| {row['per_class']} | {row['method']} | {row['top1_mean']:.2f} ± {row['top1_std']:.2f} | "
              f"{row['batch_size']} | {', '.join(map(str, row['steps']))} | {row['minutes']:.1f} |")
    print(f"pretraining {pretrain_minutes:.1f} min; the {len(runs)} runs {result['runs_minutes']:.1f} min; {path}")


if __name__ == "__main__":
    main()
