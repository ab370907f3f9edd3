"""What the training-loop tests share: a narrow network and the quick command line that trains it."""

from __future__ import annotations

import sys

# A narrow network so that every test trains in seconds on two cores.
TINY = {"stem_widths": (8, 16), "entry_widths": (16, 32), "middle_repeats": 0, "exit_widths": (32, 48),
        "tail_widths": (48, 64)}
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
QUICK = ["--train-subset", "512", "--val-subset", "500", "--batch-size", "32"]


def xception_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "xception", "train", *TINY_ARGS, *QUICK, *args]
