"""The recorded CamVid run (issue #14): the camvid recipe (DeepLabV3+ on a narrow Xception, from scratch) trained
for a fixed budget of minutes on this machine, then its best checkpoint (else its last) evaluated on the val split
at the full 480x360.

    python benchmarks/camvid.py [--data ../shared/datasets/camvid] [--max-minutes 30] [--output runs/camvid] [--tta]
                                [--augment deeplab|basic|none] [--scale-range LOW HIGH]
                                [--class-weights median-frequency] [--batch-size N] [--lr LR]
                                [--lovasz-weight W] [--label-stride N] [--set KEY=VALUE ...]
    python benchmarks/camvid.py --compare benchmarks/results/camvid.json benchmarks/results/camvid-*/camvid.json
    python benchmarks/camvid.py --ceiling 4 8 16

Trains through :func:`xception.training.train` (what ``xception segment train`` runs) and evaluates through
:func:`xception.inference_segmentation.evaluate_segmenter` (what ``xception segment eval`` runs). Writes, in
``--results`` (default benchmarks/results):

- ``camvid.json``: date, machine, command, minutes and steps of training, epochs, mIoU, pixel accuracy, per-class
  IoU by name (and the same with ``--tta``: flip and multi-scale inference), and the val mIoU after each epoch
  against the minutes of training (measured by the loop, in the recipe's precision, at full resolution);
- ``camvid_predictions.png``: a few val images, their ground truth and the prediction, in the palette of
  ``xception segment predict``;
- ``camvid_curve.png``: val mIoU against minutes of training;

and prints the per-class IoU as a markdown table for the README. ``--smoke`` takes the same path in seconds (4
training images, 2 for the per-epoch evaluation, 136-pixel crops that the network sees at half size, batches of 2,
2 epochs) and writes its results into ``OUTPUT/results`` rather than benchmarks/results, unless ``--results`` says
otherwise. ``--compare`` trains nothing: it prints recorded runs side by side (their flags, optimizer, loss and
epochs, best checkpoint, and the mean of their last 10 epochs, which swings less than one epoch's figure).
``--ceiling`` trains nothing either: it prints how much of each class survives class scores at each given stride
on the val labels (see :func:`resolution_ceiling`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xception.cli import parse_options
from xception.data import SampleKey, SegmentationDataset, SegmentationEvalTransform
from xception.data.segmentation import SEGMENTATION_AUGMENTATIONS
from xception.errors import InvalidArgumentError
from xception.experiments.report import today
from xception.files import save_figure, write_text_atomic
from xception.hardware import probe
from xception.inference_segmentation import TTA_SCALES, LoadedSegmenter, evaluate_segmenter, load_segmenter
from xception.precision import AUTO, TRAINING_PRECISIONS, choose_precision
from xception.training import TrainConfig, train
from xception.training.config import bounded
from xception.training.recipes import Recipe
from xception.training.segmentation_metrics import confusion_matrix, mean_iou, per_class_iou, segment

ROOT = Path(__file__).resolve().parent
CAMVID = ROOT.parent.parent / "shared" / "datasets" / "camvid"  # ../shared/datasets/camvid from the repository
RECIPE = "camvid"
TARGET_MIOU = 0.65  # issue #14: at least 65% on val within 30 minutes of training on this machine
SMOKE = {"train_subset": 4, "val_subset": 2, "img_size": 136, "batch_size": 2, "epochs": 2}
FIGURE_IMAGES = 4
STEADY_EPOCHS = 10  # --compare: the mean over this many last epochs
EARLIER_TTA_SCALES = (0.75, 1.0, 1.25)  # --tta's scales in the records that do not name theirs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CAMVID, help="a folder in the segmentation layout "
                                                                  "(default: ../shared/datasets/camvid)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="training budget, evaluation after each "
                                                                        "epoch included (default 30)")
    parser.add_argument("--output", type=Path, default=Path("runs/camvid"), help="the run folder; must hold no run")
    parser.add_argument("--results", type=Path, help="where the JSON and figures go (default: benchmarks/results; "
                                                     "with --smoke, OUTPUT/results)")
    parser.add_argument("--epochs", type=int, help="the recipe's epochs, overridden (its poly schedule ends there)")
    parser.add_argument("--crop-size", type=int, help="the recipe's training crop, overridden")
    parser.add_argument("--batch-size", type=int, help="the recipe's images per step, overridden")
    parser.add_argument("--lr", type=float, help="the recipe's learning rate at its reference batch size, overridden "
                                                 "(scaled linearly to the batch size, as in xception segment train)")
    # --augment as in xception segment train; --augmentation, the spelling of the recorded commands, still works
    parser.add_argument("--augment", "--augmentation", dest="augmentation", choices=SEGMENTATION_AUGMENTATIONS,
                        help="the recipe's training augmentation, overridden (deeplab: random scale 0.5-2.0, crop, "
                             "flip, colour jitter; basic: crop and flip)")
    parser.add_argument("--scale-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="the range of the deeplab augmentation's random scale, overridden (the recipe's: "
                             "DeepLab's 0.5 2.0)")
    parser.add_argument("--lovasz-weight", type=bounded(float, minimum=0), help="the recipe's weight of the "
                        "Lovász-softmax term beside the cross-entropy, overridden (0: cross-entropy alone)")
    parser.add_argument("--label-stride", type=bounded(int, minimum=1), help="the recipe's label stride of the "
                        "training loss, overridden (1: every pixel of the crop)")
    parser.add_argument("--class-weights", choices=("median-frequency",), help="weigh the loss by class (default: "
                                                                               "the recipe's, unweighted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an architecture option on top of the recipe's (as in xception segment train), e.g. "
                             "--set input_scale=0.75 --set 'atrous_rates=(3, 6, 9)'; repeatable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", action="store_true", help="also evaluate with flip and multi-scale inference")
    parser.add_argument("--precision", choices=(AUTO, *TRAINING_PRECISIONS), default=AUTO,
                        help="of the final evaluation (auto: the machine's fastest native precision)")
    parser.add_argument("--smoke", action="store_true", help="the same path on a few images in seconds: a test")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: print a markdown table of recorded runs (their camvid.json files), "
                             "with the mean of each curve's last epochs beside the best checkpoint")
    parser.add_argument("--ceiling", type=bounded(int, minimum=1), nargs="+", metavar="STRIDE",
                        help="train nothing: print the per-class IoU on the val labels of their own class "
                             "fractions at 1/STRIDE of their resolution, resized back (the recipe's scores are at 8)")
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainConfig:
    """What ``xception segment train --recipe camvid`` gets for this run (``--smoke``: tiny sizes)."""
    sizes = dict(SMOKE) if args.smoke else {}
    if args.epochs is not None:
        sizes["epochs"] = args.epochs
    if args.crop_size is not None:
        sizes["img_size"] = args.crop_size
    if args.batch_size is not None:
        sizes["batch_size"] = args.batch_size
    return TrainConfig(task="segmentation", data=str(args.data), recipe=RECIPE, output=args.output,
                       max_minutes=args.max_minutes, seed=args.seed, class_weights=args.class_weights,
                       augmentation=args.augmentation, scale_range=args.scale_range, lr=args.lr,
                       lovasz_weight=args.lovasz_weight, label_stride=args.label_stride,
                       model_options=parse_options(args.set), progress=not args.smoke, **sizes)


def evaluate(loaded: LoadedSegmenter, args: argparse.Namespace, tta: bool) -> dict[str, Any]:
    metrics = evaluate_segmenter(loaded, args.data, "val", tta=tta, precision=args.precision,
                                 confusion_png=args.output / f"confusion-val{'-tta' if tta else ''}.png")
    kept = {key: metrics[key] for key in ("miou", "pixel_accuracy", "per_class_iou", "images", "skipped")}
    return {**kept, "scales": list(TTA_SCALES)} if tta else kept


def plot_predictions(loaded: LoadedSegmenter, data: Path, path: Path, *, count: int = FIGURE_IMAGES,
                     precision: str = "fp32") -> Path:
    """Rows of val images: the image, its ground truth and the prediction, in ``segment predict``'s colours (black:
    unlabelled), with the palette as a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    dataset = SegmentationDataset.from_folder(data, "val", SegmentationEvalTransform(),
                                              ignore_index=loaded.ignore_index)
    indices = sorted({round(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))})
    palette = loaded.palette
    figure, axes = plt.subplots(len(indices), 3, figsize=(12, 3.2 * len(indices)), squeeze=False)
    for row, index in zip(axes, indices, strict=True):
        image, mask = dataset[SampleKey(0, index)]
        with torch.no_grad():
            batch = image[None].contiguous(memory_format=torch.channels_last)
            prediction = segment(loaded.model, batch, precision=precision).argmax(1)[0]
        truth = np.zeros((*mask.shape, 3), np.uint8)
        labelled = mask.numpy() != loaded.ignore_index
        truth[labelled] = palette[mask.numpy()[labelled]]
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        name = dataset.pairs[index][0].name
        for axis, picture, title in zip(row, (pixels, truth, palette[prediction.numpy()]),
                                        (name, "ground truth", "prediction"), strict=True):
            axis.imshow(picture)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    handles = [Patch(color=np.asarray(colour) / 255, label=name) for name, colour in zip(loaded.classes, palette,
                                                                                          strict=True)]
    figure.legend(handles=[*handles, Patch(color="black", label="unlabelled")], loc="lower center",
                  ncol=min(6, len(handles) + 1), fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(figure, path)


def plot_curve(curve: list[dict[str, Any]], path: Path, max_minutes: float) -> Path:
    """Val mIoU after each epoch against the minutes of training, with the issue's target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["minutes"] for r in curve], [100 * r["miou"] for r in curve], marker="o", markersize=3,
              label="val mIoU (full resolution)")
    axis.axhline(100 * TARGET_MIOU, color="grey", linestyle="--", linewidth=1, label="target: 65% in 30 minutes")
    axis.set(xlabel="minutes of training (evaluation included)", ylabel="val mIoU (%)",
             title=f"CamVid: camvid recipe, {max_minutes:g}-minute budget", xlim=(0, None))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def iou_table(result: dict[str, Any]) -> str:
    """The per-class IoU (and with --tta, beside it) as markdown, mIoU and pixel accuracy last."""
    tta = result["tta"]
    header = "| class | IoU (val, 480x360) |" + (" with flip and multi-scale |" if tta else "")
    lines = [header, "|---|---:|" + ("---:|" if tta else "")]

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    for name, iou in result["per_class_iou"].items():
        lines.append(f"| {name} | {cell(iou)} |" + (f" {cell(tta['per_class_iou'][name])} |" if tta else ""))
    for label, key in (("**mIoU**", "miou"), ("pixel accuracy", "pixel_accuracy")):
        lines.append(f"| {label} | {cell(result[key])} |" + (f" {cell(tta[key])} |" if tta else ""))
    return "\n".join(lines)


def last_epochs_mean(result: dict[str, Any], epochs: int = STEADY_EPOCHS) -> float | None:
    """The mean val mIoU of the curve's last ``epochs`` epochs: steadier than the best checkpoint's, which is
    picked on the same val split from epochs that swing by a few points."""
    curve = result["curve"][-epochs:]
    return sum(point["miou"] for point in curve) / len(curve) if curve else None


def variant_flags(command: str) -> str:
    """The flags that set a recorded run apart: its command without the script and the paths it wrote to."""
    words, kept = iter(shlex.split(command)[2:]), []
    for word in words:
        if word in ("--output", "--results", "--data"):
            next(words, None)  # and its value
        else:
            kept.append(word)
    return f"`{shlex.join(kept)}`" if kept else "none"


def optimizer_text(recipe: dict[str, Any]) -> str:
    """The optimizer, its learning rate at the batch size the run used (the recipe's rate is for its reference
    batch size and scales linearly) and that batch size: 'adamw 0.002 at batch 8'."""
    lr = recipe["lr"] * recipe["batch_size"] / recipe["reference_batch_size"]
    return f"{recipe['optimizer']} {lr:g} at batch {recipe['batch_size']}"


def loss_text(recipe: dict[str, Any]) -> str:
    """The training loss: 'cross-entropy', with the Lovász term and the label stride where set ('cross-entropy + 1
    x Lovász, label stride 4'). Runs recorded before the recipe had these fields trained on cross-entropy alone, on
    every pixel."""
    text = "cross-entropy"
    if recipe.get("lovasz_weight", 0.0):
        text += f" + {recipe['lovasz_weight']:g} x Lovász"
    if recipe.get("label_stride", 1) > 1:
        text += f", label stride {recipe['label_stride']}"
    return text


def tta_text(result: dict[str, Any]) -> str:
    """The mIoU with flip and multi-scale inference and the scales' range: '65.3% (0.5-1.75)'. Runs recorded before
    the JSON kept the scales used 0.75, 1 and 1.25 (TTA_SCALES until the switch to DeepLab's)."""
    tta = result.get("tta")
    if not tta:
        return "n/a"
    scales = tta.get("scales", EARLIER_TTA_SCALES)
    return f"{100 * tta['miou']:.1f}% ({min(scales):g}-{max(scales):g})"


def compare_table(results: list[dict[str, Any]]) -> str:
    """Recorded runs side by side: flags, optimizer and loss (the recipe's changed between records), best
    checkpoint's mIoU (and with --tta), the last epochs' mean, epochs and minutes."""
    lines = [f"| flags | optimizer | loss | epochs | val mIoU (best epoch) | with flip and multi-scale | mean of the "
             f"last {STEADY_EPOCHS} epochs | minutes |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for result in results:
        steady = last_epochs_mean(result)
        steady_text = "n/a" if steady is None else f"{100 * steady:.1f}%"
        lines.append(f"| {variant_flags(result['command'])} | {optimizer_text(result['recipe'])} | "
                     f"{loss_text(result['recipe'])} | {len(result['curve'])} | "
                     f"{100 * result['miou']:.1f}% ({result['best_epoch']}) | {tta_text(result)} | {steady_text} | "
                     f"{result['minutes']:.1f} |")
    return "\n".join(lines)


def resolution_ceiling(data: Path, strides: list[int], split: str = "val") -> dict[int, dict[str, Any]]:
    """How much of each class survives class scores at 1/stride of the labels' resolution, resized back bilinearly
    as DeepLab's are: the mIoU and per-class IoU of each label map's own class fractions over stride x stride
    cells (its one-hot encoding averaged), resized back and arg-maxed, against the labels. Ignored pixels vote for
    no class. A guide, not a strict bound: a network's scores are not fractions, and their magnitudes can move a
    boundary between cell centres. The camvid recipe's scores are at stride 8 of the image (the decoder's stride 4,
    at input_scale 0.5)."""
    dataset = SegmentationDataset.from_folder(data, split, SegmentationEvalTransform())
    num_classes = len(dataset.classes)
    confusions = {stride: torch.zeros(num_classes, num_classes, dtype=torch.long) for stride in strides}
    for index in range(len(dataset)):
        sample = dataset[SampleKey(0, index)]
        if sample is None:  # an image that cannot be decoded: the evaluation skips it too
            continue
        mask = sample[1]
        labelled = mask != dataset.ignore_index
        one_hot = F.one_hot(torch.where(labelled, mask, 0), num_classes) * labelled[..., None]
        one_hot = one_hot.permute(2, 0, 1)[None].float()
        for stride in strides:
            cells = (math.ceil(mask.shape[0] / stride), math.ceil(mask.shape[1] / stride))
            scores = F.interpolate(F.adaptive_avg_pool2d(one_hot, cells), size=mask.shape, mode="bilinear",
                                   align_corners=False)
            confusions[stride] += confusion_matrix(scores[0].argmax(0), mask, num_classes, dataset.ignore_index)
    return {stride: {"miou": mean_iou(confusion),
                     "per_class_iou": dict(zip(dataset.classes, per_class_iou(confusion), strict=True))}
            for stride, confusion in confusions.items()}


def ceiling_table(ceilings: dict[int, dict[str, Any]]) -> str:
    classes = list(next(iter(ceilings.values()))["per_class_iou"])
    lines = ["| scores at stride | " + " | ".join(classes) + " | mIoU |", "|---:|" + "---:|" * (len(classes) + 1)]
    for stride, ceiling in ceilings.items():
        cells = ["n/a" if iou is None else f"{100 * iou:.1f}" for iou in ceiling["per_class_iou"].values()]
        lines.append(f"| {stride} | " + " | ".join(cells) + f" | {100 * ceiling['miou']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare_table([json.loads(path.read_text()) for path in args.compare]))
        return 0
    if args.ceiling:
        print(ceiling_table(resolution_ceiling(args.data, args.ceiling)))
        return 0
    command = shlex.join(["python", "benchmarks/camvid.py", *(sys.argv[1:] if argv is None else argv)])
    results = args.results or (args.output / "results" if args.smoke else ROOT / "results")
    if (args.output / "last.safetensors").exists():
        raise InvalidArgumentError(f"{args.output} already holds a run; the recorded run starts from scratch: give "
                                   "another --output or remove it")
    config = training_config(args)
    args.precision = choose_precision(args.precision, "cpu").name  # the final evaluation's, resolved once
    started = time.monotonic()
    trained = train(config)
    minutes = (time.monotonic() - started) / 60
    run_config = json.loads((args.output / "config.json").read_text())
    recipe = Recipe(**run_config["recipe"])  # as the run resolved it: its precision and any budget plan are known
    history = trained["history"]
    loaded = load_segmenter(args.output)
    plain = evaluate(loaded, args, tta=False)
    result = {
        "date": today(), "machine": probe().line(), "command": command, "smoke": args.smoke,
        "data": str(args.data), "output": str(args.output), "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in loaded.model.parameters()), "max_minutes": args.max_minutes,
        "minutes": round(minutes, 2), "steps": trained["steps"], "epochs": trained["epochs"],
        "stopped": trained["stopped"],
        "checkpoint": "best" if (args.output / "best.safetensors").exists() else "last",
        "best_epoch": max(history, key=lambda r: r["val_miou"])["epoch"] if history else None,
        "evaluation_precision": args.precision, **plain,
        "tta": evaluate(loaded, args, tta=True) if args.tta else None,
        # The loop's evaluation after each epoch, in the recipe's precision (autocast), on the whole val split
        # (--smoke: its first images).
        "curve_precision": recipe.precision, "precision": run_config["precision"],
        "schedule_plan": run_config.get("schedule_plan"),
        "curve": [{"epoch": r["epoch"], "step": r["step"], "minutes": round(r["minutes"], 3), "miou": r["val_miou"],
                   "pixel_accuracy": r["val_pixel_accuracy"]} for r in history],
    }
    write_text_atomic(results / "camvid.json", json.dumps(result, indent=2) + "\n")
    plot_predictions(loaded, args.data, results / "camvid_predictions.png", precision=args.precision)
    if history:
        plot_curve(result["curve"], results / "camvid_curve.png", args.max_minutes)
    print(iou_table(result))
    steady = last_epochs_mean(result)
    steady_text = "no epoch finished" if steady is None else f"{100 * steady:.1f}% over the last {STEADY_EPOCHS} epochs"
    print(f"\nCamVid val mIoU {100 * result['miou']:.1f}% ({result['checkpoint']} checkpoint, epoch "
          f"{result['best_epoch']}; {steady_text}) after "
          f"{minutes:.1f} minutes of training, {result['steps']} steps, {result['epochs']} epochs "
          f"({result['stopped']}); {result['machine']}")
    if trained["stopped"] != "finished":
        print(f"note: the run stopped at its time limit before its poly schedule reached its end (planned: "
              f"{(result['schedule_plan'] or {}).get('epochs', recipe.epochs)} epochs)")
    print(f"results: {results / 'camvid.json'}, camvid_predictions.png, camvid_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
