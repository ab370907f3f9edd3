"""What the ``xception experiment`` tests share: data descriptions, a tiny colour image folder, and results made up
without training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from xception.experiments import DataInfo, RunResult, VariantResult

FASHION = DataInfo("fashion-mnist", 10, 1, 60_000, 10_000, 60_000, 10_000)
COLOUR = DataInfo("folder", 5, 3, 500, 100, 500, 100)


def colour_folder(root: Path, train: int = 48, val: int = 24) -> Path:
    """Two classes of colour images of mixed sizes: reddish and bluish noise, easy to tell apart."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % 2
            pixels = rng.integers(0, 120, (30 + i % 5, 34, 3), dtype=np.uint8)
            pixels[..., 0 if label == 0 else 2] += 120
            folder = root / split / ("red" if label == 0 else "blue")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def variant(key: str, finals: list[float], label: str | None = None, params: int = 1000) -> VariantResult:
    """A variant's results as if trained: one run per final top-1, two evaluations and two loss records each."""
    runs = [RunResult(seed=i, output=f"runs/{key}/seed{i}", final_top1=top1, best_top1=top1, steps=100, seconds=10.0,
                      steps_per_s=10.0, curve=[[50, top1 - 0.05], [100, top1]], loss=[[20, 1.0], [100, 0.5]])
            for i, top1 in enumerate(finals)]
    return VariantResult(key, label or key, "xception", {}, params, "", runs)
