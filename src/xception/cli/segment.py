"""``xception segment train|eval|predict``: semantic segmentation (DeepLabV3+ on the family's backbones)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..models import list_models
from ..precision import AUTO, TRAINING_PRECISIONS
from .results import report_file_results


def command_train(args: argparse.Namespace) -> int:
    """Train (the camvid recipe by default) with the classification loop, then say where everything is."""
    from ..training import train
    from ..training.config import config_from_args
    from . import TRAINING_OWNED, parse_options

    result = train(config_from_args(args, parse_options(args.model_options, TRAINING_OWNED["segmentation"]),
                                   task="segmentation"))
    output = Path(result["output"])
    if result["history"]:
        last = result["history"][-1]
        print(f"trained {result['epochs']} epochs ({result['steps']} steps, {last['minutes']:.1f} min): val mIoU "
              f"{last['val_miou']:.4f}, pixel accuracy {last['val_pixel_accuracy']:.4f}; best mIoU "
              f"{result['best_miou']:.4f}")
    if result["stopped"] != "finished":
        print(f"stopped early ({result['stopped']}): continue with xception segment train --resume --data "
              f"{args.data} --output {output}")
    print(f"checkpoints: {output / 'best.safetensors'} (best mIoU), {output / 'last.safetensors'} (last, with "
          f"{output / 'last.state.safetensors'})")
    print(f"metrics: {output / 'metrics.jsonl'}, {output / 'tensorboard'}; curves: {output / 'curves.png'}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    """mIoU, pixel accuracy and per-class IoU at full resolution, and a confusion-matrix PNG."""
    from ..inference_segmentation import evaluate_segmenter, load_segmenter

    loaded = load_segmenter(args.checkpoint)
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint if checkpoint.is_dir() else checkpoint.parent
    metrics = evaluate_segmenter(loaded, args.data, args.split, batch_size=args.batch_size, workers=args.workers,
                                 tta=args.tta, precision=args.precision,
                                 confusion_png=output / f"confusion-{args.split}.png")
    print(f"{args.split}{' (flip and multi-scale)' if args.tta else ''}: mIoU {metrics['miou']:.4f}, pixel "
          f"accuracy {metrics['pixel_accuracy']:.4f} on {metrics['images']} images"
          + (f" ({metrics['skipped']} unreadable, skipped)" if metrics["skipped"] else ""))
    for name, iou in metrics["per_class_iou"].items():
        print(f"  {name:<24} " + ("n/a (absent)" if iou is None else f"{iou:.4f}"))
    print(f"confusion matrix: {metrics['confusion_png']}")
    if args.json:
        keys = ("miou", "pixel_accuracy", "per_class_iou", "loss", "images", "skipped", "confusion_png")
        print(json.dumps({**{key: metrics[key] for key in keys}, "tta": args.tta}))
    return 0


def command_predict(args: argparse.Namespace) -> int:
    """A colour-coded mask and an overlay per image; exit code 1 when some files could not be read."""
    from ..inference_segmentation import load_segmenter, predict_masks

    if (args.checkpoint is None) == (args.deployed is None):
        raise InvalidArgumentError("give either --checkpoint RUN or --deployed DIR (a folder xception deploy wrote)")
    if args.deployed is not None:
        from ..deploy import load_deployed
        from ..inference_segmentation import segmenter_from_deployment

        loaded = segmenter_from_deployment(load_deployed(args.deployed))
    else:
        loaded = load_segmenter(args.checkpoint)
    results = predict_masks(loaded, args.inputs, args.output, tta=args.tta, precision=args.precision)
    return report_file_results(results, args.inputs, as_json=args.json,
                               describe=lambda result: f"{result['mask']}, {result['overlay']}")


def add_segment_command(commands: Any) -> None:
    from ..training.config import add_train_arguments, bounded

    segment = commands.add_parser("segment", help="semantic segmentation: train, eval, predict (DeepLabV3+)")
    actions = segment.add_subparsers(dest="segment_command", required=True)

    train = actions.add_parser("train", help="train a segmentation model (default: the camvid recipe)")
    add_train_arguments(train, list_models("segmentation"), task="segmentation")
    train.set_defaults(run=command_train)

    evaluate = actions.add_parser("eval", help="mIoU, pixel accuracy, per-class IoU and confusion matrix")
    evaluate.add_argument("--checkpoint", required=True, help="a segmentation run folder or weights file")
    evaluate.add_argument("--data", required=True, help="a folder in the segmentation layout")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--batch-size", type=bounded(int, minimum=1), default=4)
    evaluate.add_argument("--workers", type=bounded(int, minimum=0), default=0)
    evaluate.add_argument("--output", help="folder for the confusion matrix (default: the run folder)")
    evaluate.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    add_inference_arguments(evaluate)
    evaluate.set_defaults(run=command_eval)

    predict = actions.add_parser("predict", help="colour-coded label maps and overlays of images")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    predict.add_argument("--checkpoint", help="a segmentation run folder or weights file")
    predict.add_argument("--deployed", type=Path, metavar="DIR", help="a folder written by xception deploy, run in "
                         "its runtime (instead of --checkpoint)")
    predict.add_argument("--output", type=Path, required=True,
                         help="folder for IMAGE.mask.png (colour-coded classes) and IMAGE.overlay.png")
    predict.add_argument("--json", action="store_true", help="one JSON object per file")
    add_inference_arguments(predict)
    predict.set_defaults(run=command_predict)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    # The scales are written out rather than read from inference_segmentation.TTA_SCALES, which would import torch
    # before any command runs; a test holds the two together.
    parser.add_argument("--tta", action="store_true",
                        help="flip and multi-scale inference (DeepLab's): the softmax averaged over scales 0.5, 0.75, "
                             "1, 1.25, 1.5 and 1.75 and their mirror images")
    parser.add_argument("--precision", choices=(AUTO, *TRAINING_PRECISIONS), default=AUTO,
                        help="autocast precision (auto: bf16 where the CPU runs it natively, else fp32)")
