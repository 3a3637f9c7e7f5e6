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


def current() -> DistInfo:
    """This process's place: from the joined process group, else from torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    env = os.environ
    return DistInfo(
        int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    )


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process: the one that writes files."""
    return current().is_main


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (no-op when run as one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = current()
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def teardown_distributed() -> None:
    """Leave the process group, if one was joined (the end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP for training steps (the caller keeps the bare model for eval and checkpoints)."""
    if info.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _collective_device(tensor: torch.Tensor) -> torch.device:
    # NCCL moves CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise sum of `tensor` over ranks (the tensor itself when run alone)."""
    if info.world_size == 1:
        return tensor
    moved = tensor.to(_collective_device(tensor))
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate each rank's rows (their counts may differ) in rank order, on every rank."""
    if info.world_size == 1:
        return tensor
    where = _collective_device(tensor)
    sizes = [torch.zeros(1, dtype=torch.int64, device=where) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=where))
    longest = int(max(sizes).item())
    padded = tensor.new_zeros((longest, *tensor.shape[1:])).to(where)
    padded[: len(tensor)] = tensor.to(where)
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    rows = [part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)]
    return torch.cat(rows).to(tensor.device)


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, info: DistInfo) -> None:
    """Average the running mean/var of BatchNorm layers that trained this epoch, over ranks.

    Each rank's statistics saw only its shard, and rank 0's are the ones saved (timm's
    `distribute_bn`). Frozen BatchNorm (eval mode) and every other buffer, normalization constants
    included, are left alone: averaging equal values still drifts them by rounding.
    """
    if info.world_size == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            for stat in (module.running_mean, module.running_var):
                if stat is not None:
                    stat.copy_(all_reduce_sum(stat, info) / info.world_size)
