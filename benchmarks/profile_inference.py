"""Where the deployed int8 Xception spends its time, and how close its 1x1 convolutions run to the machine's int8
matmul limit: the evidence behind BENCHMARKS.md's note on the int8 target.

    python benchmarks/profile_inference.py [--batch-size 8]

Deploys Xception at 299x299 with ``optimize_for_inference(model, "int8", ...)`` (calibrated on random images:
speed does not depend on the calibration), profiles three calls after a warm-up and groups operator self times
into int8 1x1 convolutions, int8 depthwise convolutions, other convolutions, max-pooling, Inductor's generated
kernels (quantize, dequantize, adds and ReLUs it fused) and the rest. The 1x1 convolutions of the middle flow (728
to 728 channels at 19x19) are then rated in int8 operations per second against ``torch._int_mm`` in the same
process.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import xception
from xception.benchmark import machine_limits
from xception.deploy import optimize_for_inference

QUANTIZED_CONVOLUTIONS = ("onednn::qconv_pointwise", "onednn::qconv2d_pointwise")
MIDDLE_FLOW_POINTWISE = ([728, 728, 1, 1], 19)  # weight shape, feature map side


def category(name: str, shapes: list) -> str:
    if name in QUANTIZED_CONVOLUTIONS:
        weight = shapes[3] if len(shapes) > 3 else []
        if weight[2:] == [1, 1]:
            return "int8 1x1 convolutions"
        return "int8 depthwise convolutions" if weight[1:2] == [1] else "int8 other convolutions"
    if "convolution" in name:
        return "float convolutions"
    if "max_pool" in name:
        return "max-pooling"
    if "CompiledFxGraph" in name:
        return "Inductor kernels (quantize, dequantize, adds, ReLU)"
    return "the rest (copies, dispatch)"


def report(batch_size: int, calls: int = 3) -> tuple[str, dict[str, float]]:
    """The markdown section, and its key figure: the middle-flow 1x1 convolutions' int8 operations per second
    as a fraction of the int8 matmul limit."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, 299, 299)
    model = xception.create_model("xception").eval()
    deployed = optimize_for_inference(model, "int8", [torch.randn_like(x) for _ in range(2)], example_input=x)
    for _ in range(2):
        deployed(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            deployed(x)
    seconds: dict[str, float] = defaultdict(float)
    pointwise_s, pointwise_count = 0.0, 0
    for event in prof.key_averages(group_by_input_shape=True):
        seconds[category(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e6 / calls
        shapes = event.input_shapes
        if (event.key in QUANTIZED_CONVOLUTIONS and len(shapes) > 3 and shapes[3] == MIDDLE_FLOW_POINTWISE[0]
                and shapes[0][-1] == MIDDLE_FLOW_POINTWISE[1]):
            pointwise_s += event.self_cpu_time_total / 1e6
            pointwise_count += event.count
    total = sum(seconds.values())
    lines = ["| operators | ms per call | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {1000 * value:.1f} | {value / total:.0%} |"
              for name, value in sorted(seconds.items(), key=lambda item: -item[1])]
    operations = 2 * batch_size * 19 * 19 * 728 * 728
    achieved = operations * pointwise_count / pointwise_s / 1e9
    limit = machine_limits()["int8_gflops"]
    lines += ["", f"The middle flow's 1x1 convolutions ({pointwise_count // calls} per call, batch {batch_size}, 728 "
              f"to 728 channels at 19x19) run at {achieved:.0f} G int8 operations/s, against {limit:.0f} for a "
              f"4096x4096 `torch._int_mm` in the same process ({achieved / limit:.0%})."]
    return "\n".join(lines), {"pointwise_fraction_of_limit": achieved / limit,
                              "pointwise_share": seconds["int8 1x1 convolutions"] / total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(report(args.batch_size)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
