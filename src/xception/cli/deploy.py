"""``xception deploy``: the fastest correct deployment of a trained classifier or segmentation model on this
machine, written to a folder that ``xception predict --deployed`` (or ``segment predict --deployed``) and
:func:`xception.load_deployed` run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

CALIBRATION_IMAGES = 256  # int8's calibration set, for each of the three int8 candidates (eval's int8 takes 512)
HELD_OUT_IMAGES = 500  # one image is 0.2 points of agreement; the whole val split when it is smaller


def checkpoint_task(checkpoint: str | None) -> str:
    """"classification" or "segmentation": what the model of a run folder or weight file does (registered weights
    and save_pretrained folders are classifiers)."""
    from ..inference import run_files
    from ..models.registry import model_task
    from ..training.checkpoint import read_architecture
    from ..weights import parse_hub_spec
    from ..weights.pretrained import is_pretrained_folder

    if checkpoint is None or parse_hub_spec(checkpoint) is not None or is_pretrained_folder(checkpoint):
        return "classification"
    weights, _ = run_files(Path(checkpoint))
    return model_task(read_architecture(weights)[0])


def calibration_data(args: argparse.Namespace) -> str | None:
    """``--calibration``, else the data the run was trained on (its config.json records it), else None."""
    from ..inference import run_files
    from ..weights.pretrained import is_pretrained_folder

    if args.calibration is not None or args.checkpoint is None or not Path(args.checkpoint).is_dir():
        return args.calibration
    if is_pretrained_folder(args.checkpoint):  # a save_pretrained folder names its data sets by Hub id only
        return None
    _, config = run_files(Path(args.checkpoint))
    return config.get("train", {}).get("data")


def classifier_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, Any]:
    """The model, what deploy.json records of it, the agreement it is held to, and (calibration, held-out, labels)."""
    from ..deploy import TopOneAgreement
    from ..inference import deploy_inputs, load_model

    loaded = load_model(args.checkpoint, args.model, args.weights)
    data = calibration_data(args)
    if data is None:
        raise InvalidArgumentError("give --calibration DATA: real images like those the model will see (fashion-mnist, "
                                   "or a folder with train/ and val/ class folders)")
    calibration, held_out, labels = deploy_inputs(loaded, data, args.calibration_images, args.held_out_images)
    record = {"task": "classification", "data": data, "classes": loaded.classes,
              "preprocessing": loaded.preprocessing, "registered": loaded.registered}
    return loaded.model, record, TopOneAgreement(args.min_agreement), (calibration, held_out, labels)


def segmenter_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, Any]:
    """As :func:`classifier_inputs`, for a segmentation run."""
    from ..deploy import MeanIoUAgreement
    from ..inference_segmentation import load_segmenter, segmentation_deploy_inputs

    data = calibration_data(args)
    if data is None:
        raise InvalidArgumentError("give --calibration DATA: a segmentation folder (train/ images calibrate int8, "
                                   "val/ images and labels check the mIoU)")
    loaded = load_segmenter(args.checkpoint)
    tensors = segmentation_deploy_inputs(loaded, data, args.calibration_images, args.held_out_images)
    record = {"task": "segmentation", "data": data, "classes": loaded.classes, "ignore_index": loaded.ignore_index,
              "preprocessing": {"scale": "x / 127.5 - 1", "resize": None}}  # full resolution, as segment predict
    agreement = MeanIoUAgreement(args.max_miou_drop, loaded.ignore_index)
    return loaded.model, record, agreement, tensors


TASK_INPUTS = {"classification": classifier_inputs, "segmentation": segmenter_inputs}


def model_and_images(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, Any]:
    """The model of ``--checkpoint``/``--weights``, as its task's inputs function gives it (see
    :func:`classifier_inputs`)."""
    if (args.checkpoint is None) == (args.weights is None):
        raise InvalidArgumentError("give either --checkpoint RUN or --weights NAME")
    return TASK_INPUTS[checkpoint_task(args.checkpoint)](args)


def command_deploy(args: argparse.Namespace) -> int:
    """Build every candidate, check and time it, write the winner; exit 1 when no candidate agrees with fp32."""
    from ..benchmark.selection import choose_deployment
    from ..deploy import CANDIDATE_NAMES, write_deployment

    candidates = [name.strip() for name in args.candidates.split(",")] if args.candidates else CANDIDATE_NAMES
    model, record, agreement, (calibration, held_out, labels) = model_and_images(args)
    print(f"deploying a {record['task']} model: {len(calibration)} calibration images, {len(held_out)} held-out "
          f"images, batch {args.batch_size}; accepted: {agreement.bound}", flush=True)
    selection = choose_deployment(model, calibration, held_out, labels, batch_size=args.batch_size,
                                  candidates=candidates, agreement=agreement, repeats=args.repeats)
    record |= {"source": args.checkpoint or f"{args.model} {args.weights}", **selection.record}
    print(candidates_table(selection.rows))
    print(f"machine: {selection.record['machine']}")
    if selection.winner is None:
        print(f"no candidate agrees with fp32 ({agreement.bound}): nothing written")
        return 1
    path = write_deployment(args.output, selection.winner, record)
    print(f"chosen: {selection.winner.candidate}, written to {args.output} ({path.name} records every candidate)")
    if args.json:
        print(json.dumps({"chosen": selection.winner.candidate, "candidates": selection.rows}))
    return 0


def candidates_table(rows: list[dict[str, Any]]) -> str:
    """One line per candidate: its speed, agreement and status (with the reason where it was not chosen)."""
    miou = any("miou" in row for row in rows)  # segmentation: the score it is judged by, beside the agreement
    score = f"{'mIoU':>7}" if miou else ""
    lines = [f"{'candidate':<18} {'img/s':>9} {'p50 ms':>9} {'agreement':>9}{score}  status"]
    for row in rows:
        speed = f"{row['images_per_s']:9.1f} {row['p50_ms']:9.2f}" if "images_per_s" in row else f"{'-':>9} {'-':>9}"
        agreement = f"{row['agreement']:9.2%}" if "agreement" in row else f"{'-':>9}"
        if miou:
            agreement += f"{row['miou']:7.2f}" if "miou" in row else f"{'-':>7}"
        status = row["status"] + (f" ({row['reason']})" if row.get("reason") else "")
        lines.append(f"{row['candidate']:<18} {speed} {agreement}  {status}")
    return "\n".join(lines)


def add_deploy_command(commands: Any, classifiers: list[str]) -> None:
    from ..training.config import bounded

    positive = bounded(int, minimum=1)
    deploy = commands.add_parser("deploy", help="the fastest correct runtime of this machine for a model: torch, "
                                 "ONNX Runtime or OpenVINO at fp32/bf16/int8, measured and checked against fp32")
    deploy.add_argument("--checkpoint", help="a run folder (classification or segmentation) or a weights file")
    deploy.add_argument("--weights", help="registered weights of --model, e.g. imagenet, or hf-hub:org/name")
    deploy.add_argument("--model", default="xception", choices=classifiers, help="model of --weights")
    deploy.add_argument("--calibration", metavar="DATA", help="real images: fashion-mnist, an ImageNet-layout folder, "
                        "or a segmentation folder (default: the data the run was trained on); int8 calibrates on its "
                        "train split, agreement with fp32 is measured on its val split")
    deploy.add_argument("--calibration-images", type=positive, default=CALIBRATION_IMAGES)
    deploy.add_argument("--held-out-images", type=positive, default=HELD_OUT_IMAGES,
                        help="val images agreement is measured on (evenly spaced)")
    deploy.add_argument("--batch-size", type=positive, default=1, help="the batch the deployment will run")
    deploy.add_argument("--candidates", help="comma-separated, e.g. 'torch int8,openvino int8' (default: all)")
    deploy.add_argument("--min-agreement", type=float, default=0.99,
                        help="classifiers: the least top-1 agreement with fp32 accepted")
    deploy.add_argument("--max-miou-drop", type=float, default=1.0,
                        help="segmentation: the most mIoU points below fp32's accepted")
    deploy.add_argument("--repeats", type=positive, default=5, help="timed runs per candidate (interleaved)")
    deploy.add_argument("--output", type=Path, required=True, help="the deploy folder to write")
    deploy.add_argument("--json", action="store_true", help="end with one JSON line of the candidates")
    deploy.set_defaults(run=command_deploy)
