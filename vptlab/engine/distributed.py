"""Several GPUs (or CPU processes) the nanoGPT way: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK,
we read them, wrap the model in DDP, shard the data, and only rank 0 logs and writes files.

    torchrun --nproc_per_node 4 -m vptlab.cli train -c configs/cifar10_vpt.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (no-op when run as one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP for training steps (the caller keeps the bare model for eval and checkpoints)."""
    if info.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def average_buffers(model: nn.Module, info: DistInfo) -> None:
    """Average float buffers (BatchNorm statistics) over ranks, as timm's `distribute_bn` does:
    each rank's running statistics saw only its shard, and rank 0's are the ones saved."""
    if info.world_size == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= info.world_size
