"""The ``xception`` command line: ``summary``, ``models``, ``convert`` and ``benchmark``."""

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
from .weights import get_weights, list_weights, save_weights


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
    if args.markdown:
        print(model_table(args.img_size))
        return 0
    for name in list_models():
        weights = ", ".join(list_weights(name)) or "-"
        print(f"{name:<12} weights: {weights}")
    return 0


def model_table(img_size: int = 299) -> str:
    """A markdown table of every model: size, cost, feature maps and registered weights."""
    lines = [f"| model | parameters | GMACs at {img_size} | feature channels | feature strides | weights |",
             "|---|---:|---:|---|---|---|"]
    for name in list_models():
        model = create_model(name)
        summary = summarize(model, img_size)
        channels = ", ".join(str(info["num_chs"]) for info in model.feature_info)
        strides = ", ".join(str(info["reduction"]) for info in model.feature_info)
        weights = []
        for weights_name in list_weights(name):
            registered = get_weights(name, weights_name)
            metrics = registered.meta["metrics"]["ImageNet-1k"]
            weights.append(f"`{weights_name}`: {registered.meta['source']}, "
                           f"top-1 {metrics['top1']} / top-5 {metrics['top5']}")
        lines.append(f"| `{name}` | {summary.total_params:,} | {summary.total_macs / 1e9:.2f} | {channels} | "
                     f"{strides} | {'; '.join(weights) or '-'} |")
    return "\n".join(lines)


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


def command_benchmark(args: argparse.Namespace) -> int:
    """Speed of one configuration, or of ours against the peers measured interleaved in the same run."""
    from . import benchmark

    if args.compare and (args.model != "xception" or args.set):
        raise ValueError("--compare measures the paper's network against the peers' implementations of it: "
                         "use --model xception without --set")
    config = benchmark.BenchmarkConfig(
        model=args.model, model_options=parse_options(args.set), batch_size=args.batch_size, img_size=args.img_size,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile, mode=args.mode,
        warmup=args.warmup, repeats=args.repeats, iterations=args.iterations, device=args.device,
        num_threads=args.threads)
    limits = benchmark.machine_limits(device=args.device, num_threads=args.threads) if args.limits else None
    if args.compare:
        results = benchmark.compare(config, peers=tuple(p for p in args.peers.split(",") if p), limits=limits)
    else:
        results = [benchmark.measure(None, config, limits=limits)]
    formats = {"markdown": lambda r: benchmark.results_to_markdown(r, limits), "json": benchmark.results_to_json,
               "csv": benchmark.results_to_csv}
    text = formats[args.format](results)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
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
    models.add_argument("--markdown", action="store_true",
                        help="print the README's model table (parameters, MACs, feature maps, weights)")
    models.add_argument("--img-size", type=int, default=299, help="input size for the MACs column")
    models.set_defaults(run=command_models)

    bench = commands.add_parser("benchmark", help="throughput, latency and memory, optionally against the peers")
    bench.add_argument("--model", default="xception", choices=list_models())
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="architecture option")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--img-size", type=int, default=299)
    bench.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    bench.add_argument("--channels-last", action="store_true")
    bench.add_argument("--compile", action="store_true", help="torch.compile (compile time is reported)")
    bench.add_argument("--mode", choices=("inference", "train"), default="inference")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    bench.add_argument("--iterations", type=int, default=10, help="iterations per timed run")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    bench.add_argument("--compare", action="store_true", help="also measure the peers, interleaved with ours")
    bench.add_argument("--peers", default="timm,keras,inception_v3", help="comma-separated peers for --compare")
    bench.add_argument("--limits", action="store_true", help="measure matmul GFLOP/s and report % of peak")
    bench.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown")
    bench.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    bench.set_defaults(run=command_benchmark)

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
