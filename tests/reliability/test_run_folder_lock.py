"""Two commands on one folder: while a `vptlab train` (or any verb that writes a folder) holds
it, a second command on that folder is refused with one line naming the holder's pid and host,
and writes nothing; the first finishes as if alone. A lock left by a killed process (its pid not
alive on this host) is stale: the next command takes it over.

The holders are forked copies of the test process, paused at a chosen moment (a training step,
or right after taking the lock) while the second command runs here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vptlab import runs as lock_mod
from vptlab.errors import FolderLocked
from vptlab.runs import LOCK_FILE, MODEL_FILE, acquire, folder_lock

from .helpers import (
    TINY,
    Child,
    Reference,
    check_complete,
    ok,
    one_error,
    read_metrics,
    same_weights,
    tiny_config,
    write_yaml,
)

HOST = socket.gethostname()


def holder(folder: Path, verb: str = "train") -> Child:
    """A process that takes `folder`'s lock and then waits (until killed or told to go on)."""

    def body(pause: Callable[[], None]) -> None:
        with folder_lock(folder, verb):
            pause()

    child = Child(body)
    child.wait_paused()
    return child


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def copy_run(run: Path, folder: Path) -> Path:
    """A copy of a finished run whose config writes into `folder`."""
    copy = folder / run.name
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["output"]["dir"] = str(folder)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def test_second_train_is_refused_while_the_first_trains_on(
    reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first `vptlab train` is paused after step 12 (its first checkpoint written); a second
    `vptlab train` and a `vptlab train --resume` of that folder are refused and change nothing;
    the first then finishes with the numbers of a run that was alone."""
    from vptlab import cli
    from vptlab.engine import loop

    config = tiny_config(tmp_path)
    run = tmp_path / TINY["name"]

    def first(pause: Callable[[], None]) -> None:
        build = loop.build_optimizer

        def pausing(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            optimizer = build(*args, **kwargs)
            steps = iter(range(1, 1000))
            optimizer.register_step_post_hook(lambda *_: next(steps) == 12 and pause())
            return optimizer

        loop.build_optimizer = pausing  # this forked process only
        assert cli.main(["train", "-c", str(config)]) == 0

    child = Child(first)
    child.wait_paused()
    before = snapshot(run)
    holder_record = json.loads((run / LOCK_FILE).read_text())
    assert holder_record["pid"] == child.pid and holder_record["host"] == HOST
    assert holder_record["verb"] == "train"
    for argv in (["train", "-c", str(config)], ["train", "--resume", str(run)]):
        line = one_error(capsys, argv)
        assert f"{run} is in use by `vptlab train` (pid {child.pid} on {HOST}" in line, line
        assert f"remove {run / LOCK_FILE} if that process is gone" in line, line
    assert snapshot(run) == before  # the refused commands wrote nothing
    child.go_on()
    assert child.join() == 0
    assert read_metrics(run) == reference.metrics
    assert same_weights(run / MODEL_FILE, reference.run / MODEL_FILE)
    check_complete(run)  # the lock went with its holder


def matrix_config(out: Path) -> dict[str, Any]:
    return {"matrix": "m", "output": str(out), "base": {k: TINY[k] for k in ("seed", "device")},
            "models": {"simplenet": {"model": TINY["model"]}},
            "threats": {"clean": {"kind": "clean"}}}  # fmt: skip


def study_config(out: Path) -> dict[str, Any]:
    base = {k: v for k, v in TINY.items() if k not in ("name", "output")}
    return {"study": "s", "output": str(out), "base": base, "runs": {"a": {}}}


def test_every_verb_that_writes_a_folder_is_refused_while_it_is_held(
    reference: Reference, poisoned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train, train --resume, attack, detect (the run's folder), defend (the defended run's),
    run (a matrix's or a study's folder) and report (a matrix folder)."""
    run = copy_run(reference.run, tmp_path)
    parent = copy_run(poisoned, tmp_path)
    matrix = write_yaml(tmp_path / "matrix.yaml", matrix_config(tmp_path))
    study = write_yaml(tmp_path / "study.yaml", study_config(tmp_path))
    attack = ["--eps", "0.1", "--steps", "1", "--limit", "8", "--no-progress", "--examples", "0"]
    cases = [
        (run, "train", ["train", "-c", str(tiny_config(tmp_path))]),
        (run, "train --resume", ["train", "--resume", str(run), "train.epochs=3"]),
        (run, "attack", ["attack", str(run), *attack]),
        (parent, "detect", ["detect", str(parent), "--detector", "spectral"]),
        (tmp_path / "poisoned-ft", "defend", ["defend", str(parent), "--defense", "ft"]),
        (tmp_path / "m", "run", ["run", "-c", str(matrix), "--no-progress"]),
        (tmp_path / "m", "report", ["report", str(tmp_path / "m")]),
        (tmp_path / "s", "run", ["run", "-c", str(study)]),
    ]
    for folder, verb, argv in cases:
        child = holder(folder, verb)
        before = snapshot(tmp_path)
        line = one_error(capsys, argv)
        assert f"{folder} is in use by `vptlab {verb}` (pid {child.pid} on {HOST}" in line, line
        assert snapshot(tmp_path) == before, argv  # nothing written, nothing lost
        child.go_on()
        assert child.join() == 0
        assert not (folder / LOCK_FILE).exists()


def test_stale_lock_of_a_killed_process_is_taken_over(
    reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of the holder leaves its lock (and a temp file of a write it had begun); the next
    `vptlab train` sees the pid is gone, takes the folder and trains the same run."""
    run = tmp_path / TINY["name"]
    child = holder(run)
    (run / ".metrics.json.abcd1234.tmp").write_text('{"half": ')
    child.kill()
    assert child.join() == -signal.SIGKILL
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == child.pid
    ok(capsys, ["train", "-c", str(tiny_config(tmp_path))])
    assert read_metrics(run) == reference.metrics
    check_complete(run)


def test_lock_is_created_exclusively_with_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags: list[int] = []
    real_open = os.open

    def recording(path: Any, mode: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(LOCK_FILE):
            flags.append(mode)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    with folder_lock(tmp_path, "defend"):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert flags and all(f & os.O_CREAT and f & os.O_EXCL for f in flags)
    assert record["pid"] == os.getpid() and record["host"] == HOST and record["verb"] == "defend"
    assert not (tmp_path / LOCK_FILE).exists()


def test_locks_of_other_hosts_half_written_and_reused_pids(tmp_path: Path) -> None:
    """A lock from another host cannot be checked from here: refused, naming that host. A lock
    file without its record is being written (young: refused) or was left by a holder killed
    while writing it (older than a few seconds: stale, taken over)."""
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "verb": "train", "since": "x"}))
    with pytest.raises(FolderLocked, match=r"in use by `vptlab train` \(pid 1 on elsewhere"):
        acquire(tmp_path, "train")
    lock.write_text("")
    with pytest.raises(FolderLocked, match="not written yet"):
        acquire(tmp_path, "train")
    old = time.time() - 2 * lock_mod.UNREADABLE_STALE_SECONDS
    os.utime(lock, (old, old))
    with folder_lock(tmp_path, "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    # A lock naming this very pid that this process does not hold: an earlier process of the
    # same number (a restarted container) left it.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": HOST, "verb": "train"}))
    with folder_lock(tmp_path, "attack"):
        assert json.loads(lock.read_text())["verb"] == "attack"
    assert not lock.exists()


def test_nested_verbs_share_the_lock_and_failed_commands_leave_no_folder(tmp_path: Path) -> None:
    """A verb calling another on the same folder (a matrix writing its report) holds one lock;
    a command refused before writing anything leaves no empty folder behind."""
    with folder_lock(tmp_path / "m", "run"):
        with folder_lock(tmp_path / "m", "report"):
            pass
        assert (tmp_path / "m" / LOCK_FILE).exists()
    assert not (tmp_path / "m").exists()
