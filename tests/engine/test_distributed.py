"""Data-parallel training: disjoint shards per rank, ranks in sync under DDP, rank 0 writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vptlab.config import build_config
from vptlab.data.base import TensorSplit
from vptlab.data.loaders import TensorLoader


def test_ranks_get_disjoint_equal_shards() -> None:
    split = TensorSplit(torch.zeros(11, 1, 2, 2), torch.arange(11))
    loaders = [
        TensorLoader(split, 4, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)
    ]
    seen = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 2  # 6 samples each: 11 padded to 12
    assert len(seen[0]) == len(seen[1]) == 6
    assert set(torch.cat(seen).tolist()) == set(range(11))  # together they cover the split
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) <= 1  # only the pad repeats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from vptlab.engine.build import build_experiment
    from vptlab.engine.loop import fit

    cfg = build_config(
        {
            "name": "ddp",
            "device": "cpu",
            "data": {"name": "digits", "img_size": 16, "batch_size": 32, "num_workers": 0},
            "model": {"name": "simplenet"},
            "train": {"epochs": 3, "lr": 3e-3},
            "output": {"dir": out, "tensorboard": False, "progress": False},
        }
    )
    data, model = build_experiment(cfg)
    metrics = fit(model, data, cfg, Path(out) / "ddp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["top1"] = torch.tensor(metrics["final"]["test_top1"])
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_two_process_ddp_trains_in_sync(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    # gradients were averaged at every step, BatchNorm statistics at the end of every epoch
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["top1"]) > 80.0  # chance is 10%
    assert (tmp_path / "ddp" / "model.safetensors").is_file()  # written by rank 0
