"""``xception segment train|eval|predict``: semantic segmentation (DeepLabV3+ on the family's backbones)."""

from __future__ import annotations

from typing import Any


def add_segment_command(commands: Any) -> None:
    segment = commands.add_parser("segment", help="semantic segmentation: train, eval, predict (DeepLabV3+)")
    segment.add_subparsers(dest="segment_command", required=True)
