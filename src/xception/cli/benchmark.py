"""``xception benchmark``: the speed of one configuration, or of ours beside the peers timed interleaved; with a
trained model (``--checkpoint`` or ``--weights``), of it and its other runtimes on real images, with each one's
agreement with the eager fp32 model beside its speed."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..files import write_text_atomic
from ..models import list_models
from ..precision import AUTO, TRAINING_PRECISIONS
from .deploy import CALIBRATION_IMAGES, HELD_OUT_IMAGES, model_and_images

DEFAULT_PEERS = "timm,keras,inception_v3"  # other implementations of the paper's network
TRAINED_PEERS = "onnxruntime,openvino"  # other runtimes of a trained model (its weights, so agreement applies)


def command_benchmark(args: argparse.Namespace) -> int:
    """Speed of one configuration, or of ours against the peers measured interleaved in the same run."""
    from .. import benchmark
    from . import parse_options

    trained = args.checkpoint is not None or args.weights is not None
    if args.compare and not trained and (args.model != "xception" or args.set):
        raise InvalidArgumentError("--compare measures the paper's network against the peers' implementations of "
                                   "it: use --model xception without --set (or --checkpoint RUN for a trained model "
                                   "and its other runtimes)")
    if trained and (args.set or args.mode != "inference"):
        raise InvalidArgumentError("--checkpoint and --weights time a trained model's inference as it is: leave out "
                                   "--set and --mode train")
    config = benchmark.BenchmarkConfig(
        model=args.model, model_options=parse_options(args.set), batch_size=args.batch_size, img_size=args.img_size,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile, mode=args.mode,
        warmup=args.warmup, repeats=args.repeats, iterations=args.iterations, device=args.device,
        num_threads=args.threads, deploy=tuple(p for p in args.deploy.split(",") if p))
    limits = benchmark.machine_limits(device=args.device, num_threads=args.threads) if args.limits else None
    real = None
    if trained:
        real = _real_images(args)
        config = dataclasses.replace(config, model=getattr(real.model, "model_name", args.model),
                                     img_size=tuple(real.calibration.shape[-2:]))
        print(f"{config.model} at {config.img_size[0]}x{config.img_size[1]}: {len(real.calibration)} calibration "
              f"images, agreement with eager fp32 on {len(real.held_out)} held-out images", flush=True)
    if args.compare or config.deploy or trained:
        peers_text = args.peers if args.peers is not None else TRAINED_PEERS if trained else DEFAULT_PEERS
        peers = tuple(p for p in peers_text.split(",") if p) if args.compare else ()
        results = benchmark.compare(config, peers=peers, limits=limits, real=real)
    else:
        results = [benchmark.measure(None, config, limits=limits)]
    formats = {"markdown": lambda r: benchmark.results_to_markdown(r, limits), "json": benchmark.results_to_json,
               "csv": benchmark.results_to_csv}
    text = formats[args.format](results)
    if args.output:
        write_text_atomic(args.output, text + "\n")
    print(text)
    return 0


def _real_images(args: argparse.Namespace) -> Any:
    """The trained model and the real images its candidates are calibrated and checked on, as ``xception deploy``
    takes them."""
    from ..benchmark import RealImages

    model, _, agreement, (calibration, held_out, labels) = model_and_images(args)
    return RealImages(model, calibration, held_out, labels, agreement)


def add_benchmark_command(commands: Any) -> None:
    from ..training.config import bounded

    at_least = {minimum: bounded(int, minimum=minimum) for minimum in (0, 1)}
    bench = commands.add_parser("benchmark", help="throughput, latency and memory, optionally against the peers")
    bench.add_argument("--model", default="xception", choices=list_models())
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="architecture option")
    bench.add_argument("--checkpoint", help="time this trained model (run folder or weights file) on real images "
                       "instead, with each candidate's agreement with it in eager fp32")
    bench.add_argument("--weights", help="as --checkpoint, for registered weights of --model (e.g. imagenet)")
    bench.add_argument("--calibration", metavar="DATA", help="with --checkpoint/--weights: real images (default: the "
                       "data the run was trained on); int8 calibrates on its train split, agreement is measured on "
                       "its val split")
    bench.add_argument("--calibration-images", type=at_least[1], default=CALIBRATION_IMAGES)
    bench.add_argument("--held-out-images", type=at_least[1], default=HELD_OUT_IMAGES,
                       help="val images agreement is measured on (evenly spaced)")
    bench.add_argument("--batch-size", type=at_least[1], default=1)
    bench.add_argument("--img-size", type=at_least[1], default=299, help="(a trained model: its own size)")
    bench.add_argument("--precision", choices=(AUTO, *TRAINING_PRECISIONS), default=AUTO,
                       help="autocast precision of the eager candidates (auto: the fastest this machine runs "
                            "natively)")
    bench.add_argument("--deploy", default="", metavar="CANDIDATES",
                       help="also time ours as optimize_for_inference makes it, for each of these comma-separated "
                            "candidates: fp32, bf16, int8 (always compiled), fp32+compile, bf16+compile "
                            "(inference only)")
    bench.add_argument("--channels-last", action="store_true")
    bench.add_argument("--compile", action="store_true", help="torch.compile (compile time is reported)")
    bench.add_argument("--mode", choices=("inference", "train"), default="inference")
    bench.add_argument("--warmup", type=at_least[0], default=3)
    bench.add_argument("--repeats", type=at_least[1], default=5, help="timed runs; the median is reported")
    bench.add_argument("--iterations", type=at_least[1], default=10, help="iterations per timed run")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--threads", type=at_least[1], default=None, help="torch intra-op threads")
    bench.add_argument("--compare", action="store_true", help="also measure the peers, interleaved with ours")
    bench.add_argument("--peers", default=None,
                       help="comma-separated peers for --compare: timm, keras, inception_v3, onnxruntime, openvino "
                            f"(default: {DEFAULT_PEERS}; with --checkpoint/--weights: {TRAINED_PEERS})")
    bench.add_argument("--limits", action="store_true", help="measure matmul GFLOP/s and report %% of peak")
    bench.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown")
    bench.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    bench.set_defaults(run=command_benchmark, min_agreement=0.99, max_miou_drop=1.0)
