"""Where one Xception training step spends its time on this machine, and how close its main kernel runs to the
machine's matmul limit: the evidence behind BENCHMARKS.md's note on the training-speed target.

    python benchmarks/profile_training.py [--batch-size 32] [--precision bf16]

Three profiled steps (after two warm-up steps) of ours and of timm ``legacy_xception``, both channels_last: the step
``xception train`` runs and ``xception benchmark --mode train`` times (:func:`xception.training.step.train_step`),
with SGD with momentum and autocast at ``--precision``. Operator self times are grouped into 1x1 convolutions,
depthwise 3x3 convolutions, other convolutions, BatchNorm, ReLU and the rest. Then the 1x1 convolution of the middle
flow (728 to 728 channels at 19x19, a third of the network's FLOPs) is timed on its own, forward and backward,
against the best square matmul measured in the same process. Last, a torch.compile'd training step of ours is timed
against the eager one.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import xception
from xception.benchmark import machine_limits
from xception.precision import PRECISIONS
from xception.training.step import train_step

CONVOLUTIONS = {"aten::mkldnn_convolution": 1, "aten::convolution_backward": 2}  # op -> index of the weight shape


def category(name: str, shapes: list) -> str:
    if name in CONVOLUTIONS:
        weight = shapes[CONVOLUTIONS[name]] if len(shapes) > CONVOLUTIONS[name] else []
        if len(weight) == 4 and weight[2:] == [1, 1]:
            return "1x1 convolutions"
        if len(weight) == 4 and weight[1] == 1:
            return "depthwise convolutions"
        return "other convolutions"
    if "batch_norm" in name:
        return "BatchNorm"
    if "threshold_backward" in name or "relu" in name or "clamp_min" in name:
        return "ReLU"
    return "the rest (pooling, adds, optimizer, casts, autograd)"


def timed_step(model: torch.nn.Module, batch_size: int, precision: str,
               runner: torch.nn.Module | None = None) -> Callable[[], object]:
    """``xception train``'s step (as ``xception benchmark --mode train`` times it: SGD with momentum, random labels)
    on random channels_last data; ``runner`` (default: the model) is what runs the forward, e.g. its compiled
    wrapper."""
    model = model.to(memory_format=torch.channels_last).train()
    runner = runner if runner is not None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.045, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # loss scaling is for fp16, which the CPU does not run
    x = torch.randn(batch_size, 3, 299, 299).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(1000, (batch_size,))
    return lambda: train_step(runner, optimizer, scaler, x, labels, precision=precision)


def breakdown(step, steps: int = 3) -> tuple[float, dict[str, float]]:
    """(seconds per step, {category: seconds per step}) over ``steps`` profiled steps."""
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        shares[category(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e6 / steps
    return seconds, dict(shares)


def pointwise_gflops(batch_size: int, precision: str, repeats: int = 5) -> tuple[float, float]:
    """Best GFLOP/s of the middle flow's 1x1 convolution, forward and forward + backward."""
    dtype = PRECISIONS[precision].dtype
    x = torch.randn(batch_size, 728, 19, 19, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(728, 728, 1, 1, dtype=dtype, requires_grad=True).contiguous(
        memory_format=torch.channels_last)
    x.requires_grad_(True)
    flops = 2 * batch_size * 19 * 19 * 728 * 728
    best_forward = best_both = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        y = F.conv2d(x, weight)
        middle = time.perf_counter()
        y.backward(torch.ones_like(y))
        end = time.perf_counter()
        best_forward, best_both = min(best_forward, middle - start), min(best_both, end - start)
    return flops / best_forward / 1e9, 3 * flops / best_both / 1e9  # backward: grad input and grad weight


def compiled_speedup(batch_size: int, precision: str, repeats: int = 3) -> tuple[float, float]:
    """(compiled step speed over eager, compile seconds) for ours, timed interleaved: torch.compile could fuse
    BatchNorm and ReLU into fewer passes, which is the only room left."""
    eager = timed_step(xception.create_model("xception"), batch_size, precision)
    model = xception.create_model("xception")
    compiled = timed_step(model, batch_size, precision, runner=torch.compile(model))
    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    eager()
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(repeats):
        for name, step in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["eager"] / best["compiled"], compile_s


def report(batch_size: int, precision: str) -> tuple[str, dict[str, float]]:
    """The markdown section, and its key figures: the 1x1 convolutions' share of our step and the middle-flow
    1x1 convolution's forward + backward speed as a fraction of the matmul limit."""
    import timm

    rows = {}
    for name, model in (("xception", xception.create_model("xception")),
                        ("timm legacy_xception", timm.create_model("legacy_xception"))):
        rows[name] = breakdown(timed_step(model, batch_size, precision))
    forward, both = pointwise_gflops(batch_size, precision)
    speedup, compile_s = compiled_speedup(batch_size, precision)
    limit = machine_limits()[f"{'bf16' if precision == 'bf16' else 'fp32'}_gflops"]
    categories = sorted({c for _, shares in rows.values() for c in shares},
                        key=lambda c: -rows["xception"][1].get(c, 0.0))
    lines = [f"| operators | {' | '.join(rows)} |", "|---|" + "---:|" * len(rows)]
    for c in categories:
        cells = [f"{shares.get(c, 0.0):.2f} s ({100 * shares.get(c, 0.0) / sum(shares.values()):.0f}%)"
                 for _, shares in rows.values()]
        lines.append(f"| {c} | {' | '.join(cells)} |")
    lines.append(f"| **step (wall, profiled)** | {' | '.join(f'{seconds:.2f} s' for seconds, _ in rows.values())} |")
    lines += ["", f"The middle flow's 1x1 convolution (batch {batch_size}, 728 to 728 channels, 19x19, {precision}) "
              f"runs at {forward:.0f} GFLOP/s forward and {both:.0f} GFLOP/s forward + backward, against "
              f"{limit:.0f} GFLOP/s for a 4096x4096 {'bf16' if precision == 'bf16' else 'fp32'} matmul in the same "
              f"process ({100 * forward / limit:.0f}% and {100 * both / limit:.0f}%). torch.compile of our model "
              f"(which could fuse BatchNorm and ReLU) makes the step {speedup:.2f}x as fast as eager, after "
              f"{compile_s:.0f} s of compilation (interleaved best of 3)."]
    shares = rows["xception"][1]
    return "\n".join(lines), {"pointwise_share": shares.get("1x1 convolutions", 0.0) / sum(shares.values()),
                              "pointwise_fraction_of_limit": both / limit, "compiled_speedup": speedup}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    print(report(args.batch_size, args.precision)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
