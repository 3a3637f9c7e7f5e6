"""A full disk: a write refused by the operating system (ENOSPC, or a file size limit) is one
line naming the file, and the folder keeps its previous checkpoint and metrics, complete and
still a pair that resumes to the uninterrupted run once there is room again.

ENOSPC is injected where each atomic write hands its temp file back (half of it written, then the
error); the real refusals come from RLIMIT_FSIZE in a forked child, through the real writers:
safetensors (Rust), torch.save and plain text."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vptlab import runs
from vptlab.engine import checkpoint
from vptlab.engine.checkpoint import load_state, save_model, save_state
from vptlab.errors import VptlabError
from vptlab.runs import atomic_write_text

from .helpers import (
    TINY,
    Child,
    Reference,
    check_complete,
    ok,
    one_error,
    read_metrics,
    tiny_config,
)


def snapshot(folder: Path) -> dict[str, bytes]:
    """The folder's files, without the hidden ones (temp files, the lock, the previous model)."""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".")}  # fmt: skip


class _FullDiskOs:
    """The atomic writer's `os`: its `fail_at`th write (counted at its chmod, right after the
    writer returns) finds the disk full with half of the file written."""

    def __init__(self, fail_at: int, folder: Path) -> None:
        self.fail_at, self.folder = fail_at, folder
        self.before: list[dict[str, bytes]] = []  # the folder before each write began

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def chmod(self, path: str, mode: int) -> None:
        self.before.append(snapshot(self.folder))
        if len(self.before) == self.fail_at:
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        os.chmod(path, mode)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "metrics.json"])
def test_full_disk_keeps_the_previous_checkpoint_and_metrics(
    name: str, reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The disk fills in the first write of `name` after the first epoch's metrics.json (so a
    previous checkpoint and metrics exist): in epoch 2."""
    writes = reference.faults.writes
    first_epoch = writes.index("metrics.json") + 1
    fail_at = writes.index(name, first_epoch) + 1
    run = tmp_path / TINY["name"]
    full = _FullDiskOs(fail_at, run)
    monkeypatch.setattr(runs, "os", full)
    line = one_error(capsys, ["train", "-c", str(tiny_config(tmp_path))])
    monkeypatch.undo()
    assert line == (f"vptlab: error: cannot write {run / name}: No space left on device "
                    f"({name} is left as it was)")  # fmt: skip
    # The folder is as it was before the checkpoint began (a state write that fails puts the
    # checkpoint's new model file back), every file complete, no temp file, no lock.
    began = fail_at - 1 if name == "state.pt" else fail_at
    assert snapshot(run) == full.before[began - 1]
    check_complete(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "running" and metrics["epochs_done"] >= 1
    ok(capsys, ["train", "--resume", str(run)])  # room again: the same run as one go
    assert read_metrics(run) == reference.metrics


def _write_under_file_size_limit(folder: Path, limit: int) -> Callable[[Callable[[], None]], None]:
    """In the child: old versions of three files, then new ones larger than `limit` bytes."""

    def body(pause: Callable[[], None]) -> None:
        model = nn.Linear(200, 200)
        writers: dict[str, Callable[[Path, int], None]] = {
            "model.safetensors": lambda p, scale: save_model(nn.Linear(scale, scale), p),
            "state.pt": lambda p, scale: save_state({"w": torch.zeros(scale, scale)}, p),
            "metrics.json": lambda p, scale: atomic_write_text(p, json.dumps([0] * scale**2)),
        }
        for name, write in writers.items():
            write(folder / name, 4)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        errors = {}
        for name, write in writers.items():
            try:
                write(folder / name, 200)
            except VptlabError as error:
                errors[name] = str(error)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        (folder / "errors.json").write_text(json.dumps(errors))
        del model

    return body


def test_real_write_refusals_of_every_writer_are_one_line(tmp_path: Path) -> None:
    child = Child(_write_under_file_size_limit(tmp_path, limit=8192))
    assert child.join() == 0
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert set(errors) == {"model.safetensors", "state.pt", "metrics.json"}
    for name, message in errors.items():
        assert message.startswith(f"cannot write {tmp_path / name}: File too large"), message
        assert message.endswith(f"({name} is left as it was)") and "\n" not in message
    # The old versions are intact and no temp file is left.
    assert checkpoint.read_metadata(tmp_path / "model.safetensors")["trainable_only"] == "False"
    assert load_state(tmp_path / "state.pt")["w"].shape == (4, 4)
    assert json.loads((tmp_path / "metrics.json").read_text()) == [0] * 16
    assert not list(tmp_path.glob(".*.tmp"))
