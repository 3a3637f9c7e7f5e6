"""Tampered checkpoints: a model file with wrong shapes, missing keys or cut short, a state file
holding a pickle that would run code, or cut short: `vptlab train --resume`, `eval` and `attack`
each exit 2 with one line naming the file (and the key), and nothing in the file runs."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vptlab import cli
from vptlab.engine.checkpoint import read_metadata
from vptlab.runs import MODEL_FILE, STATE_FILE
from vptlab.steps import train as runner

CONFIG: dict[str, Any] = {
    "name": "tiny", "seed": 0, "device": "cpu",
    "data": {"name": "digits", "img_size": 16, "batch_size": 256, "num_workers": 0},
    "model": {"name": "simplenet"}, "train": {"epochs": 1, "lr": 3e-3},
    "output": {"tensorboard": False, "progress": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (about a second), copied by each test before tampering."""
    from vptlab.steps.resolve import resolved

    out = tmp_path_factory.mktemp("runs")
    runner.train(resolved(CONFIG, [f"output.dir={out}"]))
    return out / "tiny"


@pytest.fixture()
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(trained, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["output"]["dir"] = str(tmp_path)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


class Payload:
    """A pickle whose loading would create the sentinel file (plain pickle runs __reduce__)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vptlab: error: "), (code, err)
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _model_commands(run: Path) -> list[list[str]]:
    return [["eval", str(run)], ["attack", str(run), "--eps", "0.1", "--steps", "1",
                                 "--limit", "8", "--no-progress", "--examples", "0"]]  # fmt: skip


def test_wrong_shape_names_file_and_key(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = load_file(str(run / MODEL_FILE))
    key = next(k for k, v in state.items() if v.ndim == 2)
    state[key] = torch.zeros(3, 3)
    save_file(state, str(run / MODEL_FILE), metadata=read_metadata(run / MODEL_FILE))
    before = _snapshot(run)
    for argv in _model_commands(run):
        line = one_error(capsys, argv)
        assert str(run / MODEL_FILE) in line and key in line and "shape" in line, line
    assert _snapshot(run) == before


def test_missing_key_names_file_and_key(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = load_file(str(run / MODEL_FILE))
    key = sorted(state)[-1]
    del state[key]
    save_file(state, str(run / MODEL_FILE), metadata=read_metadata(run / MODEL_FILE))
    for argv in [*_model_commands(run), ["train", "--resume", str(run), "train.epochs=2"]]:
        line = one_error(capsys, argv)
        assert str(run / MODEL_FILE) in line and key in line, line


@pytest.mark.parametrize("cut", [0, 7, 100, -16])
def test_truncated_model_file(run: Path, cut: int, capsys: pytest.CaptureFixture[str]) -> None:
    data = (run / MODEL_FILE).read_bytes()
    (run / MODEL_FILE).write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    for argv in [*_model_commands(run), ["train", "--resume", str(run), "train.epochs=2"]]:
        line = one_error(capsys, argv)
        assert str(run / MODEL_FILE) in line and "damaged" in line, line


def test_state_with_code_is_refused_unrun(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = tmp_path / "pwned"
    state = torch.load(run / STATE_FILE, weights_only=True)
    state["hook"] = Payload(sentinel)
    torch.save(state, run / STATE_FILE)
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()  # the payload is live: a plain pickle.load runs it
    line = one_error(capsys, ["train", "--resume", str(run), "train.epochs=2"])
    assert str(run / STATE_FILE) in line and "refused unread: it references" in line, line
    assert not sentinel.exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 1


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"\x80\x04K\x01.", b"junk"])
def test_damaged_state(run: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    (run / STATE_FILE).write_bytes(content)
    line = one_error(capsys, ["train", "--resume", str(run), "train.epochs=2"])
    assert str(run / STATE_FILE) in line, line


def test_state_without_its_keys(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"epoch": 1}, run / STATE_FILE)
    line = one_error(capsys, ["train", "--resume", str(run), "train.epochs=2"])
    assert str(run / STATE_FILE) in line and "optimizer" in line, line
