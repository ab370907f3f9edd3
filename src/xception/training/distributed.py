"""Which process of a run this is: rank 0 of 1, or one of ``torchrun``'s ranks (DistributedDataParallel over gloo on
the CPU, NCCL on CUDA), and the device it trains on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Distributed, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (a plain run is rank 0 of 1), and pick
    this process's device: its own GPU (``LOCAL_RANK``), set as the current one so NCCL uses it, or the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank), device
