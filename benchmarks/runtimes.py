"""Which runtime is fastest here: ours (torch, compiled) against ONNX Runtime and OpenVINO, and the choice
`xception deploy` makes on real images.

    python benchmarks/runtimes.py [--checkpoint runs/bench-fashion-mnist] [--camvid-checkpoint runs/camvid]
                                  [--results DIR] [--skip-speed] [--quick]

1. Speed: Xception at 299x299, batch 1 and 8, one `xception benchmark --compare --peers timm,onnxruntime,openvino`
   command each (printed above its table, run in a process of its own, one after the other): every runtime at
   fp32, bf16 where the CPU runs it natively, and int8 (calibrated on random images: speed does not depend on the
   activation ranges), interleaved with timm's eager fp32 in one process, so the ratios hold when absolute times
   drift.
2. Agreement: `xception deploy` on the trained Fashion-MNIST checkpoint (`python benchmarks/fashion_mnist.py` writes
   it): every candidate built from it, int8 calibrated on 256 training images, top-1 agreement with eager fp32 on
   500 test images, timed at batch 8; the one it writes is the fastest that agrees (>= 99%). The same for a camvid
   run (`--camvid-checkpoint`), judged by mIoU on CamVid's val split, at batch 1 and full resolution.

Writes RESULTS/runtimes-b1.md/.json, runtimes-b8.md/.json, runtimes-deploy.json, runtimes-deploy-camvid.json and
RESULTS/RUNTIMES.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from inference import RESULTS, Run, native, run_benchmark

from xception.benchmark import BenchmarkConfig, results_to_markdown
from xception.cli.deploy import candidates_table
from xception.hardware import probe

PEERS = ("timm", "onnxruntime", "openvino")


def speed_runs(quick: bool, folder: Path) -> list[Run]:
    warmup, repeats, iterations = (1, 2, 2) if quick else (2, 5, 3)
    deploy = tuple(c for c in ("fp32+compile", "bf16+compile", "int8") if native(c.partition("+")[0]))
    return [Run(f"runtimes-b{batch}", f"Batch {batch}, 299x299",
                BenchmarkConfig(deploy=deploy, batch_size=batch, channels_last=True, precision="fp32", warmup=warmup,
                                repeats=repeats, iterations=iterations), PEERS, folder)
            for batch in (1, 8)]


def deploy_section(title: str, description: str, command: list[str], results: Path, name: str) -> list[str]:
    """Run one `xception deploy` command, keep its deploy.json as RESULTS/NAME.json, and describe what it chose."""
    print("$", shlex.join(command), flush=True)
    subprocess.run([sys.executable, "-m", "xception", *command[1:]], check=True, capture_output=True)
    record = json.loads((Path(command[command.index("--output") + 1]) / "deploy.json").read_text())
    (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    height, width = record["img_size"]
    return [f"## {title}", "",
            f"`{shlex.join(command)}`: {description}, int8 calibrated on {record['calibration_images']} training "
            f"images, checked on {record['held_out_images']} held-out images, timed at batch {record['batch_size']} "
            f"({height}x{width}); accepted: {record['bound']}.", "",
            "```", *candidates_table(record["candidates"]).splitlines(), "```", "",
            f"Chosen: **{record['artifact']['runtime']} {record['artifact']['precision']}**.", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/bench-fashion-mnist"))
    parser.add_argument("--camvid-checkpoint", type=Path, default=Path("runs/camvid"),
                        help="a camvid run (python benchmarks/camvid.py writes one); left out where absent")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--skip-speed", action="store_true", help="keep the speed tables already in RESULTS")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier numbers)")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = ["# Runtimes", "",
             f"Machine: {probe().line()}. Date: {date}. Regenerate with "
             f"`{shlex.join(['python', 'benchmarks/runtimes.py', *sys.argv[1:]])}` on an otherwise idle machine.", "",
             "## Speed", "",
             "Xception at 299x299, random weights. `xception deploy compiled` rows are ours "
             "(`optimize_for_inference`, compiled); `onnxruntime` and `openvino` rows are the same network "
             "exported to ONNX (BatchNorm folded) and run by each runtime, as `xception deploy` builds them (ONNX "
             "Runtime: every graph optimization, int8 static QDQ per channel; OpenVINO: precision pinned, int8 by "
             "NNCF). `vs timm`: "
             "throughput over timm `legacy_xception`'s faster layout, eager fp32, timed in the same process.", ""]
    for run in speed_runs(args.quick, args.results):
        if args.skip_speed:
            table = (run.folder / f"{run.name}.md").read_text().strip()
        else:
            limits, results = run_benchmark(run)
            table = results_to_markdown(results, limits)
        lines += [f"### {run.title}", "", f"`{run.command()}`", "", table, ""]

    quick = ["--repeats", "2", "--held-out-images", "200"] if args.quick else []
    if (args.checkpoint / "best.safetensors").exists():
        command = ["xception", "deploy", "--checkpoint", str(args.checkpoint), "--batch-size", "8", "--output",
                   "runs/deployed-fashion-mnist", *quick, "--json"]
        lines += deploy_section("What `xception deploy` chooses for a classifier",
                                "the compact model trained on Fashion-MNIST", command, args.results,
                                "runtimes-deploy")
    else:
        lines += [f"({args.checkpoint} not found: `python benchmarks/fashion_mnist.py` writes it.)", ""]
    if (args.camvid_checkpoint / "best.safetensors").exists():
        # Full-resolution CamVid images (480x360) on a CPU: a few dozen calibrate int8 as well as hundreds.
        command = ["xception", "deploy", "--checkpoint", str(args.camvid_checkpoint), "--batch-size", "1",
                   "--calibration-images", "32", "--output", "runs/deployed-camvid", *quick, "--json"]
        lines += deploy_section("What `xception deploy` chooses for a segmentation model",
                                "the CamVid run (DeepLabV3+ on a compact Xception), mIoU on the val split",
                                command, args.results, "runtimes-deploy-camvid")
    else:
        lines += [f"({args.camvid_checkpoint} not found: `python benchmarks/camvid.py` writes a camvid run.)", ""]
    (args.results / "RUNTIMES.md").write_text("\n".join(lines))
    print(f"wrote {args.results / 'RUNTIMES.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
