"""Data-parallel training: disjoint shards per rank, ranks in sync under DDP, rank 0 writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vptlab.data.base import TensorSplit
from vptlab.data.loaders import TensorLoader
from vptlab.steps.resolve import resolved


def test_ranks_get_disjoint_equal_shards() -> None:
    split = TensorSplit(torch.zeros(11, 1, 2, 2), torch.arange(11))
    loaders = [
        TensorLoader(split, 4, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)
    ]
    seen = [torch.cat([b.y for b in loader]) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 2  # 6 samples each: 11 padded to 12
    assert len(seen[0]) == len(seen[1]) == 6
    assert set(torch.cat(seen).tolist()) == set(range(11))  # together they cover the split
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) <= 1  # only the pad repeats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_writes_under(folder: str) -> list[str]:
    """Every file-system change this process makes below `folder`, via Python's audit hooks."""
    import sys

    events: list[str] = []
    changes = ("os.rename", "os.replace", "os.link", "os.remove", "os.mkdir", "os.chmod")

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2]
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writes and str(args[0]).startswith(folder):
                events.append(f"{event} {args[0]}")
        elif event in changes and args and str(args[0]).startswith(folder):
            events.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return events


def _batchnorm_averaging(rank: int) -> dict[str, float]:
    """Rank-specific values in a trained BatchNorm, a frozen one and a plain buffer."""
    from torch import nn

    from vptlab.engine.distributed import average_batchnorm_statistics, current

    trained, frozen = nn.BatchNorm1d(2), nn.BatchNorm1d(2).eval()
    holder = nn.Module()
    holder.register_buffer("constant", torch.full((2,), float(rank)))
    model = nn.ModuleList([trained, frozen, holder])
    for bn in (trained, frozen):
        bn.running_mean.fill_(float(rank))
    average_batchnorm_statistics(model, current())
    return {
        "trained": float(trained.running_mean[0]),
        "frozen": float(frozen.running_mean[0]),
        "constant": float(holder.constant[0]),
    }


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from vptlab.data.loaders import make_loader
    from vptlab.engine.loop import fit
    from vptlab.metrics.accuracy import evaluate
    from vptlab.steps.build import build_experiment

    run_root = str(Path(out) / "runs")
    writes = _record_writes_under(run_root) if rank == 1 else []
    cfg = resolved(
        {
            "name": "ddp",
            "device": "cpu",
            "data": {"name": "digits", "img_size": 16, "batch_size": 32, "num_workers": 0},
            "model": {"name": "simplenet", "options": {"drop_rate": 0.2}},
            "train": {"epochs": 3, "lr": 3e-3},
            "output": {"dir": run_root, "tensorboard": True, "progress": False},
        }
    )
    data, model = build_experiment(cfg)
    metrics = fit(model, data, cfg, Path(run_root) / "ddp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["top1"] = torch.tensor(metrics["final"]["test_top1"])
    state["train_loss"] = torch.tensor([row["train_loss"] for row in metrics["history"]])
    state["rng"] = torch.get_rng_state()
    # The sharded, gathered evaluation equals one process evaluating the whole test split.
    whole = evaluate(model, make_loader(data.test, 512, train=False, img_size=16))
    state["whole_top1"] = torch.tensor(whole["top1"])
    averaged = _batchnorm_averaging(rank)
    state["bn"] = torch.tensor([averaged["trained"], averaged["frozen"], averaged["constant"]])
    state["writes"] = torch.tensor(len(writes))
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    if writes:
        print("rank 1 wrote:", writes[:5])
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_trains_in_sync(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    weights = [k for k in a if k.startswith("net.")]
    # gradients were averaged at every step, BatchNorm statistics at the end of every epoch
    assert all(torch.equal(a[k], b[k]) for k in weights)
    assert float(a["top1"]) > 80.0  # chance is 10%
    assert (tmp_path / "runs" / "ddp" / "model.safetensors").is_file()  # written by rank 0
    assert int(b["writes"]) == 0  # rank 1 wrote nothing: no checkpoint, metrics, report, events
    assert list((tmp_path / "runs" / "ddp").glob("events.*"))  # rank 0's TensorBoard log
    # train loss reduced over ranks; test accuracy from disjoint shards, gathered
    assert torch.equal(a["train_loss"], b["train_loss"])
    assert float(a["top1"]) == float(a["whole_top1"]) == float(b["top1"])
    # each rank drew its own dropout masks (seed + rank)
    assert not torch.equal(a["rng"], b["rng"])
    # only BatchNorm layers in train mode are averaged; frozen ones and other buffers stay
    assert a["bn"].tolist() == [0.5, 0.0, 0.0] and b["bn"].tolist() == [0.5, 1.0, 1.0]
