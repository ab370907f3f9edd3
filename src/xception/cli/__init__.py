"""The ``xception`` command line: train, eval, predict, summary, models, convert, export, deploy, benchmark,
experiment, env."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, XceptionError
from ..models import list_models
from ..precision import AUTO, DEPLOY_PRECISIONS
from .benchmark import add_benchmark_command
from .deploy import add_deploy_command
from .env import add_env_command
from .results import report_file_results
from .segment import add_segment_command
from .share import add_push_command

PREDICT_BATCH = 16


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, refused where it is parsed, naming the flag."""
    from ..training.config import bounded

    return bounded(int, minimum=minimum)


# create_model's arguments that are not architecture options: a command sets them from its flags or the data.
NOT_OPTIONS = {"weights": "--weights", "device": "--device", "dtype": "--precision", "features_only": "the command",
               "out_indices": "the command"}
# What each training command sets from the data or a flag of its own, so that --set would give it twice (a
# segmentation model's drop_rate is its head's, an option; a classifier's output_stride is an option too).
TRAINING_OWNED = {"classification": {"num_classes": "the data's classes", "in_chans": "the data's channels",
                                     "drop_rate": "--drop-rate"},
                  "segmentation": {"num_classes": "the data's classes", "in_chans": "the data's channels",
                                   "output_stride": "--output-stride"}}


def parse_options(pairs: Sequence[str], owned: dict[str, str] | None = None) -> dict[str, Any]:
    """``["middle_repeats=4", "fc_layers=(4096, 4096)"]`` -> keyword arguments (Python literals), each value held to
    the models' declaration of its option here, so that a wrong one is refused naming --set, before the command
    loads data or builds a model (the model checks them again, against its own options)."""
    from ..models.registry import option_problem

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--set takes KEY=VALUE, got {pair!r}")
        setter = {**NOT_OPTIONS, **(owned or {})}.get(key)
        if setter is not None:
            raise InvalidArgumentError(f"{key} is not an architecture option for --set: it comes from {setter}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            options[key] = value  # a bare word such as relu or keras
        problem = option_problem(key, options[key])
        if problem:
            raise InvalidArgumentError(f"{key} (--set) {problem}")
    return options


def command_summary(args: argparse.Namespace) -> int:
    from ..models import create_model
    from ..summary import summarize

    options = parse_options(args.set, {"num_classes": "--num-classes", "in_chans": "--in-chans"})
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, **options)
    size = (args.img_size, args.img_size) if args.width is None else (args.img_size, args.width)
    summary = summarize(model, size)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_table())
    return 0


def command_models(args: argparse.Namespace) -> int:
    if args.markdown:
        from ..summary import model_table

        print(model_table(args.img_size))
        return 0
    from ..weights import list_weights

    width = max(map(len, list_models()))
    for name in list_models("classification"):
        print(f"{name:<{width}} weights: {', '.join(list_weights(name)) or '-'}")
    for name in list_models("segmentation"):  # deeplabv3plus_xception65: the backbone's weights load into it
        print(f"{name:<{width}} backbone_weights: {', '.join(list_weights(name.partition('_')[2])) or '-'}")
    return 0


def command_convert(args: argparse.Namespace) -> int:
    """Any readable weight file -> this library's safetensors, with the class count and input channels read from
    the file."""
    from ..convert import convert_weights

    file_format, model = convert_weights(args.source, args.destination, args.model)
    numerics = model.architecture().get("numerics")
    print(f"{args.source} ({file_format}) -> {args.destination}: {args.model}, num_classes={model.num_classes}"
          + (f", numerics={numerics}" if numerics else ""))
    return 0


def command_export(args: argparse.Namespace) -> int:
    """ONNX with a dynamic batch dimension (and size, for segmentation), checked against PyTorch in onnxruntime."""
    from ..deploy import check_onnx, export_onnx
    from ..inference import add_onnx_metadata, describe_preprocessing, load_model
    from ..models import create_model

    loaded = None
    if args.checkpoint is not None or args.weights is not None:
        loaded = load_model(args.checkpoint, args.model, args.weights)
        model, img_size = loaded.model, args.img_size or loaded.img_size
    else:
        model, img_size = create_model(args.model).eval(), args.img_size or 299
    # A segmentation model's output has its input's size: its height and width stay dynamic, and its images are
    # only scaled and normalised, never resized or cropped.
    segmentation = getattr(model, "task", None) == "segmentation"
    path = export_onnx(model, args.output, img_size=img_size, dynamic_size=segmentation)
    preprocessing = loaded.preprocessing if loaded is not None else None
    if preprocessing is not None and segmentation:
        preprocessing = {**preprocessing, "resize_size": None, "crop_size": None, "interpolation": None}
    if preprocessing is not None:
        # The ONNX file alone does not say how to make its input; the preprocessing predict and eval use does.
        add_onnx_metadata(path, {"xception.preprocessing": json.dumps(preprocessing)})
    shape = (f"(batch, {model.in_chans}, height, width) float32, batch, height and width dynamic (at least "
             f"{model.min_input_size} pixels)" if segmentation
             else f"(batch, {model.in_chans}, {img_size}, {img_size}) float32, batch dynamic")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), input images: {shape}")
    if preprocessing is not None:
        described = (f"any size, scale to 0..1, normalise with mean {preprocessing['mean']} and std "
                     f"{preprocessing['std']}" if segmentation else describe_preprocessing(preprocessing))
        print(f"preprocessing (also in the file's metadata, xception.preprocessing): {described}")
    if args.check:
        error = check_onnx(model, path, img_size=img_size)
        print(f"onnxruntime vs PyTorch: max relative error {error:.2e} (bound 1e-4)")
        if error > 1e-4:
            raise XceptionError(f"the ONNX model differs from PyTorch by {error:.2e} relative, above 1e-4")
    return 0


def command_train(args: argparse.Namespace) -> int:
    """Train (the default: the compact recipe on Fashion-MNIST), then say where everything is."""
    from ..training import train
    from ..training.config import config_from_args

    config = config_from_args(args, parse_options(args.model_options, TRAINING_OWNED["classification"]))
    result = train(config)
    output = Path(result["output"])
    if result["history"]:
        last = result["history"][-1]
        print(f"trained {result['epochs']} epochs ({result['steps']} steps, {last['minutes']:.1f} min): "
              f"val top-1 {last['val_top1']:.4f}, top-5 {last['val_top5']:.4f}; best top-1 {result['best_top1']:.4f}")
    if result["stopped"] != "finished":
        print(f"stopped early ({result['stopped']}): continue with --resume --output {output}")
    print(f"checkpoints: {output / 'best.safetensors'} (best), {output / 'last.safetensors'} (last, with "
          f"{output / 'last.state.safetensors'})")
    print(f"metrics: {output / 'metrics.jsonl'}, {output / 'tensorboard'}; curves: {output / 'curves.png'}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5, per-class accuracy and a confusion-matrix PNG for a trained model or registered weights on a
    data split, preprocessed as the model's own evaluation transform says."""
    from ..inference import evaluate_on, load_model, plot_confusion

    loaded = load_model(args.checkpoint, args.model, args.weights)
    metrics, classes = evaluate_on(loaded, args.data, args.split, batch_size=args.batch_size, workers=args.workers,
                                   precision=args.precision, max_images=args.max_images)
    if args.output:
        output = Path(args.output)
    elif args.checkpoint:
        output = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    else:
        output = Path("runs") / f"eval-{args.model}-{args.weights}"
    figure = plot_confusion(metrics["confusion"], classes, output / f"confusion-{args.split}.png")
    scores = [f"top-1 {metrics['top1']:.4f}", f"top-5 {metrics['top5']:.4f}",
              f"balanced accuracy {metrics['balanced_accuracy']:.4f}"]
    # Binary tasks only; None where the split holds one class, and there is no curve to measure.
    for key, label in (("roc_auc", "ROC AUC"), ("eer", "EER")):
        if key in metrics:
            scores.append(f"{label} " + ("n/a (one class)" if metrics[key] is None else f"{metrics[key]:.4f}"))
    print(f"{args.split}: {', '.join(scores)} on {metrics['samples']} images"
          + (f" ({metrics['skipped']} unreadable, skipped)" if metrics["skipped"] else ""))
    for name, accuracy in zip(classes, metrics["per_class"], strict=True):
        print(f"  {name:<24} {accuracy:.4f}")
    print(f"confusion matrix: {figure}")
    if args.json:
        keys = ("top1", "top5", "balanced_accuracy", "roc_auc", "eer", "loss", "samples", "skipped", "per_class")
        print(json.dumps({k: metrics[k] for k in keys if k in metrics}))
    return 0


def command_predict(args: argparse.Namespace) -> int:
    """Top-k classes per image; exit code 1 when some files could not be read (the rest are still predicted)."""
    from ..inference import (
        CALIBRATION_IMAGES,
        deploy_loaded,
        load_images,
        load_model,
        loaded_from_deployment,
        predict,
    )

    if args.deployed is not None:
        if args.checkpoint or args.weights:
            raise InvalidArgumentError("--deployed runs the model of a deploy folder: leave out --checkpoint and "
                                       "--weights")
        from ..deploy import load_deployed

        loaded = loaded_from_deployment(load_deployed(args.deployed))
    else:
        loaded = load_model(args.checkpoint, args.model, args.weights)
        calibration = load_images(loaded, args.inputs, CALIBRATION_IMAGES) if args.precision == "int8" else None
        batch = 1 if calibration is None else min(len(calibration), PREDICT_BATCH)
        loaded = deploy_loaded(loaded, args.precision, calibration, batch_size=batch)
    results = predict(loaded, args.inputs, top_k=args.top_k, batch_size=PREDICT_BATCH)
    return report_file_results(results, args.inputs, as_json=args.json, describe=lambda result: ", ".join(
        f"{p['class']} {p['probability']:.3f}" for p in result["predictions"]))


def command_experiment(args: argparse.Namespace) -> int:
    """Test one of the paper's claims (or all) at small scale; print each verdict and where the outputs are."""
    from .. import experiments

    if args.docs and args.name in experiments.SEGMENTATION_EXPERIMENTS:
        raise InvalidArgumentError(f"--docs writes the Xception paper's report (xception experiment all); "
                                   f"{args.name}'s report is {args.output / args.name / 'results.md'}")
    settings = experiments.make_settings(experiment=args.name, quick=args.quick, data=args.data, seeds=args.seeds,
                                         epochs=args.epochs)
    results = experiments.run_experiments(args.name, settings, args.output, report=lambda line: print(line, flush=True))
    for result in results:
        print(result.summary_line())
        print(f"  {args.output / result.name}/curves.png, results.md, results.json")
    if args.docs:
        print(f"report: {experiments.write_report(args.output, args.docs)}")
    return 0


def add_summary_command(commands: Any) -> None:
    summary = commands.add_parser("summary", help="layer table: output shapes, parameters, MACs")
    summary.add_argument("model", choices=list_models())
    summary.add_argument("--img-size", type=at_least(1), default=299, help="input height (and width) in pixels")
    summary.add_argument("--width", type=at_least(1), default=None, help="input width, when it differs from the height")
    summary.add_argument("--num-classes", type=at_least(0), default=1000)
    summary.add_argument("--in-chans", type=at_least(1), default=3)
    summary.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="architecture option, e.g. --set middle_repeats=4 --set mid_activation=relu")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(run=command_summary)


def add_models_command(commands: Any) -> None:
    models = commands.add_parser("models", help="list models and their registered weights")
    models.add_argument("--markdown", action="store_true",
                        help="print the README's model table (parameters, MACs, feature maps, weights)")
    models.add_argument("--img-size", type=at_least(1), default=299, help="input size for the MACs column")
    models.set_defaults(run=command_models)


def add_train_command(commands: Any) -> None:
    from ..training.config import add_train_arguments

    train = commands.add_parser("train", help="train a model (default: compact recipe on Fashion-MNIST)")
    add_train_arguments(train, list_models("classification"))
    train.set_defaults(run=command_train)


def add_eval_command(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="top-1/top-5, per-class accuracy and confusion matrix")
    evaluate.add_argument("--checkpoint", help="a run folder or a weights file")
    evaluate.add_argument("--weights", help="registered weights of --model, e.g. imagenet, with their own "
                                            "preprocessing (Weights.transforms())")
    evaluate.add_argument("--model", default="xception", choices=list_models("classification"),
                          help="model of --weights")
    evaluate.add_argument("--data", default="fashion-mnist")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--batch-size", type=at_least(1), default=64)
    evaluate.add_argument("--workers", type=at_least(0), default=0)
    evaluate.add_argument("--max-images", type=at_least(1), metavar="N",
                          help="a quick check on N images spread evenly over the split (default: all of it)")
    evaluate.add_argument("--output", help="folder for the confusion matrix (default: the run folder, or "
                                           "runs/eval-MODEL-WEIGHTS)")
    evaluate.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    evaluate.add_argument("--precision", choices=(AUTO, *DEPLOY_PRECISIONS), default=AUTO,
                          help="evaluate the deployed model (optimize_for_inference) at this precision (auto: bf16 "
                               "where the CPU runs it natively, else fp32); int8 is calibrated on 512 training images")
    evaluate.set_defaults(run=command_eval)


def add_predict_command(commands: Any) -> None:
    pred = commands.add_parser("predict", help="top-k classes of images or folders of images")
    pred.add_argument("inputs", nargs="+", type=Path)
    pred.add_argument("--checkpoint", help="a run folder or a weights file")
    pred.add_argument("--weights", help="registered weights, e.g. imagenet")
    pred.add_argument("--model", default="xception", choices=list_models("classification"), help="model of --weights")
    pred.add_argument("--deployed", type=Path, metavar="DIR", help="a folder written by xception deploy: its model, "
                      "in its runtime, with the preprocessing and class names it records")
    pred.add_argument("--top-k", type=at_least(1), default=5)
    pred.add_argument("--json", action="store_true", help="one JSON object per file")
    pred.add_argument("--precision", choices=(AUTO, *DEPLOY_PRECISIONS), default=AUTO,
                      help="run the deployed model at this precision (auto: bf16 where the CPU runs it natively, else "
                           "fp32; BN folded; not compiled except for int8, which is calibrated on the given images)")
    pred.set_defaults(run=command_predict)


def add_export_command(commands: Any) -> None:
    export = commands.add_parser("export", help="export to ONNX (dynamic batch; and size for segmentation), checked "
                                                "with onnxruntime")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--checkpoint", help="a run folder or a weights file")
    export.add_argument("--weights", help="registered weights of --model, e.g. imagenet")
    export.add_argument("--model", default="xception", choices=list_models())
    export.add_argument("--img-size", type=at_least(1), help="default: the model's training or evaluation size")
    export.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with PyTorch in onnxruntime (default: on)")
    export.set_defaults(run=command_export)


def add_convert_command(commands: Any) -> None:
    convert = commands.add_parser("convert", help="convert Keras .h5 or timm/Cadene .pth weights to safetensors")
    convert.add_argument("source", type=Path)
    convert.add_argument("destination", type=Path)
    convert.add_argument("--model", default="xception", choices=list_models("classification"))
    convert.set_defaults(run=command_convert)


def add_experiment_command(commands: Any) -> None:
    experiment = commands.add_parser("experiment", help="test the paper's claims at small scale: curves, tables, "
                                                        "verdicts")
    experiment.add_argument("name", help="activation, residual, spectrum, order, inception or all (the Xception "
                                         "paper's); decoder (DeepLabV3+ on a segmentation folder)")
    experiment.add_argument("--data", help="fashion-mnist (the default), or a folder with train/ and val/; decoder: a "
                                           "segmentation folder (default: ../shared/datasets/camvid)")
    experiment.add_argument("--seeds", type=at_least(1), help="training runs per variant (default 3; 1 with --quick; "
                                                              "decoder: its other factors run 2 at most)")
    experiment.add_argument("--quick", action="store_true",
                            help="one seed and a subset of the data: about 10 minutes, a smoke test, not evidence")
    experiment.add_argument("--epochs", type=at_least(1), help="epochs per run (default 3)")
    experiment.add_argument("--output", type=Path, default=Path("runs/experiments"),
                            help="runs, curves, tables and JSON go here; finished runs in it are reused")
    experiment.add_argument("--docs", type=Path, help="also write DOCS/paper-reproduction.md and DOCS/figures/")
    experiment.set_defaults(run=command_experiment)


def command_explain(args: argparse.Namespace) -> int:
    """Grad-CAM overlays, one PNG and one JSON line per image; exit code 1 when some files could not be read (the
    rest are still explained)."""
    from ..explain import explain_files
    from ..inference import load_model

    loaded = load_model(args.checkpoint, args.model, args.weights)
    results = explain_files(loaded, args.inputs, args.output, target=args.target, stage=args.stage)
    if not results:
        raise InvalidArgumentError(f"no images found in {' '.join(map(str, args.inputs))}")
    for result in results:
        print(json.dumps(result))
        if "error" in result:
            print(f"xception explain: error: {result['error']}", file=sys.stderr)
    return 1 if any("error" in result for result in results) else 0


def add_explain_command(commands: Any) -> None:
    explain = commands.add_parser("explain", help="Grad-CAM heatmaps: where in each image the model saw a class")
    explain.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    explain.add_argument("--checkpoint", help="a run folder or a weights file")
    explain.add_argument("--weights", help="registered weights, e.g. imagenet")
    explain.add_argument("--model", default="xception", choices=list_models("classification"),
                         help="model of --weights")
    explain.add_argument("--output", type=Path, required=True, help="folder for the overlays (IMAGE.gradcam.png)")
    explain.add_argument("--class", dest="target", metavar="CLASS", default=None,
                         help="class to explain, by name or index (default: each image's predicted class)")
    explain.add_argument("--stage", type=int, default=-1,
                         help="feature map to explain, an index into the model's feature_info (default -1: the "
                              "last, the coarsest; earlier maps are finer but less specific to the class)")
    explain.set_defaults(run=command_explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xception", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_summary_command(commands)
    add_models_command(commands)
    add_train_command(commands)
    add_eval_command(commands)
    add_predict_command(commands)
    add_explain_command(commands)
    add_benchmark_command(commands)
    add_export_command(commands)
    add_deploy_command(commands, list_models("classification"))
    add_convert_command(commands)
    add_experiment_command(commands)
    add_segment_command(commands)
    add_push_command(commands)
    add_env_command(commands)
    return parser


class _StandardError(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a message comes (pytest swaps it per test)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def show_library_messages() -> None:
    """The library's messages (the precision chosen and why, a planned schedule, each epoch's scores, warnings) on
    stderr, one line each, beside the command's own output on stdout."""
    logger = logging.getLogger("xception")
    if not any(isinstance(handler, _StandardError) for handler in logger.handlers):
        handler = _StandardError()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Problems with the input, files or environment (the library's own errors and the OS's) are
    one line on stderr and exit code 2; anything else is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    show_library_messages()
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader went away (xception models | head): nothing to report
        # Python's documented remedy: point stdout at devnull so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (XceptionError, OSError) as error:
        print(f"xception {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
