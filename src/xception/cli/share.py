"""``xception push``: share a run or a saved model on the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def command_push(args: argparse.Namespace) -> int:
    """Save the run (or saved model) with its model card to a temporary folder and upload it."""
    from ..hub import push_to_hub

    url = push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, license=args.license)
    print(f"pushed {args.source} to {args.repo_id}: {url}")
    print(f"load it with xception.from_pretrained('hf-hub:{args.repo_id}') or --weights hf-hub:{args.repo_id}")
    return 0


def add_push_command(commands: Any) -> None:
    push = commands.add_parser("push", help="upload a run to the Hugging Face Hub (config, safetensors, model card)",
                               description="Upload a training run (its best weights, classes, preprocessing and best "
                                           "validation result) or a save_pretrained folder to a Hub model "
                                           "repository, created if needed. The token is huggingface_hub's: "
                                           "HF_TOKEN, or `hf auth login`.")
    push.add_argument("source", type=Path, metavar="RUN_DIR", help="a training run folder or a save_pretrained folder")
    push.add_argument("repo_id", metavar="ORG/NAME", help="the Hub model repository, e.g. my-org/xception-fashion")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="the branch to push to (created from main if new; default main)")
    push.add_argument("--commit-message", help="default: 'Upload MODEL (xception VERSION)'")
    push.add_argument("--license", help="the Hub license id for the card, e.g. apache-2.0 (default: that of the "
                                        "pretrained weights the run started from, if any)")
    push.set_defaults(run=command_push)
