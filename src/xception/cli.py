"""The ``xception`` command line: ``summary``, ``models`` and ``convert``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .convert import WeightFileError, read_safetensors_metadata, read_weights
from .hub import WeightsUnavailableError
from .registry import create_model, list_models
from .summary import summarize
from .weights import list_weights, save_weights


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["middle_repeats=4", "fc_layers=(4096, 4096)"]`` -> keyword arguments (Python literals)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word such as relu or keras
    return options


def command_summary(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, **parse_options(args.set))
    size = (args.img_size, args.img_size) if args.width is None else (args.img_size, args.width)
    summary = summarize(model, size)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_table())
    return 0


def command_models(args: argparse.Namespace) -> int:
    for name in list_models():
        weights = ", ".join(list_weights(name)) or "-"
        print(f"{name:<12} weights: {weights}")
    return 0


def command_convert(args: argparse.Namespace) -> int:
    """Any readable weight file -> this library's safetensors, with the class count read from the file."""
    if not args.destination.parent.is_dir():  # checked first: safetensors' own error would be a traceback
        raise ValueError(f"cannot write {args.destination}: the folder {args.destination.parent} does not exist")
    probe = create_model(args.model)
    file_format, state = read_weights(args.source, probe)
    classifier = state.get("head.predictions.weight")
    num_classes = 0 if classifier is None else classifier.shape[0]
    # Weights trained by the PyTorch ports expect their numerics (BN eps 1e-5, symmetric pooling).
    numerics = "timm" if file_format.startswith(("timm", "Cadene")) else "keras"
    options: dict[str, Any] = {"num_classes": num_classes, "numerics": numerics}
    if file_format == "xception safetensors":  # saved here: keep the architecture (and numerics) it was saved with
        options = json.loads(read_safetensors_metadata(args.source).get("architecture", "null")) or options
    model = create_model(args.model, weights=args.source, **options)
    save_weights(model, args.destination)
    print(f"{args.source} ({file_format}) -> {args.destination}: {args.model}, num_classes={model.num_classes}, "
          f"numerics={model.config.numerics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xception", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    summary = commands.add_parser("summary", help="layer table: output shapes, parameters, MACs")
    summary.add_argument("model", choices=list_models())
    summary.add_argument("--img-size", type=int, default=299, help="input height (and width) in pixels")
    summary.add_argument("--width", type=int, default=None, help="input width, when it differs from the height")
    summary.add_argument("--num-classes", type=int, default=1000)
    summary.add_argument("--in-chans", type=int, default=3)
    summary.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="architecture option, e.g. --set middle_repeats=4 --set mid_activation=relu")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(run=command_summary)

    models = commands.add_parser("models", help="list models and their registered weights")
    models.set_defaults(run=command_models)

    convert = commands.add_parser("convert", help="convert Keras .h5 or timm/Cadene .pth weights to safetensors")
    convert.add_argument("source", type=Path)
    convert.add_argument("destination", type=Path)
    convert.add_argument("--model", default="xception", choices=list_models())
    convert.set_defaults(run=command_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (WeightFileError, WeightsUnavailableError, ValueError, TypeError) as error:
        print(f"xception {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
