"""Why int8 uses 7-bit activations on a CPU without VNNI: the trained default model deployed in int8 with 8-bit and
with 7-bit activations, against its fp32 self on the Fashion-MNIST test set.

    python benchmarks/int8_range.py [--checkpoint runs/bench-fashion-mnist] [--results FILE]

Without VNNI, oneDNN's int8 convolutions multiply u8 activations by s8 weights with ``vpmaddubsw``, which adds each
pair of products into 16 bits and saturates there (255 x 127 x 2 > 32767); at 7 bits (127 x 127 x 2 < 32767) it
cannot. Both settings are run on this machine whatever it is (the probe is overridden to pick each), so on a CPU
with VNNI both should agree with fp32, and on one without only the 7-bit one. Writes the JSON record (default
benchmarks/results/int8_range.json) with the machine line, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from xception.data import load_fashion_mnist
from xception.deploy import optimize_for_inference
from xception.files import write_text_atomic
from xception.hardware import probe, simulate
from xception.inference import calibration_images, load_trained

ROOT = Path(__file__).resolve().parent
BATCH = 250


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(images[i: i + BATCH]).float() for i in range(0, len(images), BATCH)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/bench-fashion-mnist"))
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "int8_range.json")
    args = parser.parse_args()
    loaded = load_trained(args.checkpoint)
    images, labels = load_fashion_mnist("test")
    transform = loaded.transform()
    test = torch.stack([transform(image[None]) for image in images])
    calibration = calibration_images(loaded, "fashion-mnist", 512)  # training images, never the test images
    reference = logits_of(loaded.model.eval(), test)
    rows = [{"model": "eager fp32", "top1": (reference.argmax(1) == labels).float().mean().item(),
             "agreement": 1.0, "relative_error": 0.0}]
    for bits in (8, 7):
        with simulate(vnni=bits == 8):  # the probe picks 7 bits exactly where it finds no VNNI
            deployed = optimize_for_inference(loaded.model, "int8", calibration, example_input=test[:BATCH])
        assert deployed.report["int8_activation_bits"] == bits
        logits = logits_of(deployed, test)
        rows.append({"model": f"int8, {bits}-bit activations",
                     "top1": (logits.argmax(1) == labels).float().mean().item(),
                     "agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
                     "relative_error": ((logits - reference).abs().max() / reference.abs().max()).item()})
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": probe().line(),
              "vnni": probe().vnni, "checkpoint": str(args.checkpoint), "images": len(test), "rows": rows,
              "command": " ".join(["python", "benchmarks/int8_range.py", *sys.argv[1:]])}
    write_text_atomic(args.results, json.dumps(record, indent=2) + "\n")
    print(f"{record['machine']}\n\n| model | top-1 | agreement with fp32 | max error / max fp32 logit |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {100 * row['top1']:.2f}% | {100 * row['agreement']:.2f}% | "
              f"{row['relative_error']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
