"""``xception push``: share a run or weights on the Hugging Face Hub."""

from __future__ import annotations

from typing import Any


def add_push_command(commands: Any) -> None:
    commands.add_parser("push", help="upload a run to the Hugging Face Hub (config, safetensors, model card)")
