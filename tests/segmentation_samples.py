"""A tiny segmentation folder in the real layout, for the data, training and CLI tests.

The layout is CamVid's as ``../shared/datasets/camvid/README.md`` describes it (and as that folder holds it):
``classes.txt`` with one name per line in index order, ``<split>/images/<stem>.jpg`` RGB images,
``<split>/labels/<stem>.png`` 8-bit single-channel (PIL mode "L") label maps of the same size, one class index per
pixel, 255 for unlabelled pixels.

The scenes are easy on purpose, so that a tiny network learns them in a few steps: a dark background (class 0),
a red rectangle (class 1) and a blue square (class 2) at random places, and a thin unlabelled (255) frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("background", "box", "square")
COLOURS = np.array([[30, 30, 30], [220, 40, 40], [40, 60, 220]], dtype=np.uint8)
REAL_CAMVID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "camvid"


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (H, W, 3) and its uint8 label map (H, W)."""
    label = np.zeros((height, width), np.uint8)
    for value, (low, high) in ((1, (height // 4, height // 2)), (2, (height // 5, height // 3))):
        h, w = rng.integers(low, high + 1), rng.integers(low, high + 1)
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        label[top: top + h, left: left + w] = value
    image = COLOURS[label].astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    label[:1, :] = label[-1:, :] = 255
    label[:, :1] = label[:, -1:] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_segmentation_folder(root: Path, *, train: int = 16, val: int = 6, size: tuple[int, int] = (32, 40),
                              seed: int = 0) -> Path:
    """``root`` in the segmentation layout: ``train`` and ``val`` scenes of ``size`` (height, width)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = scene(rng, *size)
            # PNG images here: JPEG's loss would blur the colours the test model relies on (CamVid's are JPEG).
            Image.fromarray(image).save(root / split / "images" / f"{split}{i:03d}.png")
            Image.fromarray(label).save(root / split / "labels" / f"{split}{i:03d}.png")
    return root
