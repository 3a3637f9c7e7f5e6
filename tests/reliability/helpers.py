"""Shared by the reliability tests: a tiny run's config, real process deaths by fork at counted
steps and writes, and checks that a folder's files are complete (conftest.py trains the tiny run's
uninterrupted reference once per session).

The tiny run: SimpleNet (stem stride 2) on scikit-learn's 8x8 digits (1,438 train images), 2
epochs of 23 steps with a checkpoint every 10 steps, dropout and random crops, so that an inexact
resume (RNG, data order, running sums) would show in the numbers; under a second on one core.
One thread: the reference and every resumed run must do the same float operations in the same
order.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vptlab import cli
from vptlab.engine.checkpoint import load_state
from vptlab.runs import LOCK_FILE

TINY: dict[str, Any] = {
    "name": "tiny", "seed": 0, "device": "cpu",
    "data": {"name": "digits", "img_size": 8, "batch_size": 64, "num_workers": 0,
             "augment": {"crop_pad": 1}},
    "model": {"name": "simplenet", "options": {"drop_rate": 0.3, "stem_stride": 2}},
    "train": {"epochs": 2, "lr": 3e-3, "checkpoint_every_steps": 10},
    "output": {"tensorboard": False, "progress": False},
}  # fmt: skip


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_config(folder: Path, name: str = "tiny") -> Path:
    """TINY as `folder/<name>.yaml`, its run writing into `folder/<name>`."""
    raw = {**TINY, "name": name, "output": {**TINY["output"], "dir": str(folder)}}
    return write_yaml(folder / f"{name}.yaml", raw)


def without_timing(value: Any) -> Any:
    """`value` with every key that holds a duration (`seconds`, `wall_seconds` ...) removed."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def read_metrics(run: Path) -> dict[str, Any]:
    return without_timing(json.loads((run / "metrics.json").read_text()))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def check_complete(folder: Path, killed: bool = False) -> int:
    """Every file below `folder` opens as what its name says; returns how many were checked.

    Temp files of atomic writes and lock files fail the check (a finished command leaves none),
    unless the folder was `killed`: then they are skipped, as the dead writer left them."""
    checked = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith(".tmp") or name.startswith(LOCK_FILE):
            if killed:
                continue
            raise AssertionError(f"left behind: {path}")
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".pt":
            load_state(path)
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix in (".md", ".html"):
            path.read_text(encoding="utf-8")
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        else:
            raise AssertionError(f"unexpected file {path}")
        checked += 1
    return checked


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr: `vptlab: error: ...`."""
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vptlab: error: "), (code, err)
    return err[0]


def ok(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    capsys.readouterr()
    code = cli.main(argv)
    assert code == 0, capsys.readouterr().err[-2000:]


def die() -> None:
    """End this process as `kill -9` would: no cleanup, no finally, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)


class Child:
    """`body(pause)` in a forked copy of this process (torch already imported: no start-up
    cost). `pause()` in the child blocks it until the parent calls `go_on()`; `wait_paused()`
    waits for that moment. The child never returns into pytest: it exits 0 when `body` returns,
    3 (traceback printed) when it raises."""

    def __init__(self, body: Callable[[Callable[[], None]], Any]) -> None:
        to_parent, self._from_child = os.pipe()[::-1]
        self._to_child, from_parent = os.pipe()[::-1]
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                body(lambda: (os.write(to_parent, b"p"), os.read(from_parent, 1)))
            except BaseException:
                traceback.print_exc()
                code = 3
            os._exit(code)
        os.close(to_parent)
        os.close(from_parent)

    def wait_paused(self) -> None:
        assert os.read(self._from_child, 1) == b"p", "the child ended before it paused"

    def go_on(self) -> None:
        os.write(self._to_child, b"g")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def join(self) -> int:
        """The child's exit code, or minus the signal that ended it."""
        _, status = os.waitpid(self.pid, 0)
        os.close(self._from_child)
        os.close(self._to_child)
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        code = os.WEXITSTATUS(status)
        assert code != 3, "the child raised (traceback above)"
        return code


@dataclass(frozen=True)
class KillPoint:
    """Where a process is killed: after its `n`th optimizer step, or in its `n`th atomic write,
    `inside` it (temp file written and flushed, not yet renamed) or `after` it (renamed, the folder
    not yet flushed)."""

    kind: str  # "step" or "write"
    n: int
    phase: str = ""

    def __str__(self) -> str:
        return f"step {self.n}" if self.kind == "step" else f"write {self.n} ({self.phase})"


class _CountingOs:
    """The atomic writer's `os` module, with `replace` (its rename) reported to `faults`."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        self._faults.write(Path(dst), "inside")
        os.replace(src, dst)
        self._faults.write(Path(dst), "after")


class Faults:
    """Counts this process's optimizer steps and atomic writes; dies at `point` when given.

    Writes are seen through vptlab.runs's `os` (every atomic write of vptlab goes through
    `atomic_write` there), steps through a step hook on every optimizer the loop builds.
    """

    def __init__(self, point: KillPoint | None = None) -> None:
        self.point = point
        self.steps = 0
        self.writes: list[str] = []  # file names, in order

    def install(self, patch: pytest.MonkeyPatch) -> None:
        from vptlab import runs
        from vptlab.engine import loop

        build = loop.build_optimizer

        def build_counted(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            optimizer = build(*args, **kwargs)
            optimizer.register_step_post_hook(lambda *_: self.step())
            return optimizer

        patch.setattr(loop, "build_optimizer", build_counted)
        patch.setattr(runs, "os", _CountingOs(self))

    def points(self) -> list[KillPoint]:
        """Every kill point of the counted run."""
        steps = [KillPoint("step", n) for n in range(1, self.steps + 1)]
        writes = [KillPoint("write", n, phase) for n in range(1, len(self.writes) + 1)
                  for phase in ("inside", "after")]  # fmt: skip
        return steps + writes

    def step(self) -> None:
        self.steps += 1
        if self.point == KillPoint("step", self.steps):
            die()

    def write(self, path: Path, phase: str) -> None:
        if phase == "inside":
            self.writes.append(path.name)
        if self.point == KillPoint("write", len(self.writes), phase):
            die()


def killed(point: KillPoint, argv: list[str]) -> None:
    """`vptlab ARGV` in a forked child killed at `point`; asserts that it died there."""

    def body(pause: Callable[[], None]) -> None:
        with pytest.MonkeyPatch.context() as patch:
            Faults(point).install(patch)
            cli.main(argv)

    code = Child(body).join()
    assert code == -signal.SIGKILL, f"the child ended with {code} before its kill point {point}"


def counted(argv: list[str]) -> Faults:
    """`vptlab ARGV` in this process, its steps and writes counted; it must succeed."""
    faults = Faults()
    with pytest.MonkeyPatch.context() as patch:
        faults.install(patch)
        assert cli.main(argv) == 0
    return faults


@dataclass(frozen=True)
class Reference:
    """The uninterrupted tiny run: its folder, config file, metrics (timing aside), and the
    steps and writes it made."""

    run: Path
    config: Path
    metrics: dict[str, Any]
    faults: Faults
