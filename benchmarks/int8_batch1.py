"""int8 at batch 1: optimize_for_inference with its default arguments against a one-image example_input.

Issue #11's check that a batch of one is never padded to the calibration batch: both deployments are timed
interleaved in one process (3 warm-up calls, then rounds of one call each), on the paper's Xception at 299x299
with random weights and 16 random calibration images (speed does not depend on the calibration).

    python benchmarks/int8_batch1.py [--calls 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import xception


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each deployment")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = xception.create_model("xception").eval()
    calibration = torch.rand(16, 3, 299, 299) * 2 - 1
    image = calibration[:1].clone()
    deployed = {
        "default arguments": xception.optimize_for_inference(model, "int8", calibration),
        "example_input of one image": xception.optimize_for_inference(model, "int8", calibration,
                                                                      example_input=image),
    }
    timings: dict[str, list[float]] = {name: [] for name in deployed}
    with torch.inference_mode():
        for fast in deployed.values():
            for _ in range(3):
                fast(image)
        for _ in range(args.calls):
            for name, fast in deployed.items():
                start = time.perf_counter()
                fast(image)
                timings[name].append((time.perf_counter() - start) * 1000)
    result = {name: {"median_ms": round(statistics.median(values), 1), "min_ms": round(min(values), 1),
                     "compiled_graphs": deployed[name].report["compiled_graphs"]}
              for name, values in timings.items()}
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
