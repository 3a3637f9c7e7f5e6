"""The one loop: learns, resumes exactly, guards against NaN, writes pickle-free files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vptlab.config import ExperimentConfig, build_config
from vptlab.engine import runner
from vptlab.engine.checkpoint import load_state
from vptlab.engine.tasks import ClassificationTask
from vptlab.errors import ConfigError, TrainingDiverged


def digits_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    base = {
        "name": "digits",
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "img_size": 16, "num_workers": 0},
        "model": {"name": "simplenet"},
        "train": {"epochs": 4, "lr": 3e-3, "weight_decay": 0.01, "warmup_epochs": 0.5},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    }
    return build_config(base, list(overrides))


def test_learns_digits(tmp_path: Path) -> None:
    metrics = runner.train(digits_config(tmp_path))
    assert metrics["status"] == "complete"
    assert metrics["final"]["test_top1"] > 85.0  # chance is 10%
    run = tmp_path / "digits"
    for name in ("config.yaml", "model.safetensors", "state.pt", "metrics.json", "report.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["epochs_done"] == 4


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    # augmentation and dropout-free shuffling both depend on RNG state that resume must restore
    opts = ("data.augment.crop_pad=1", "train.epochs=3")
    full = runner.train(digits_config(tmp_path / "a", *opts))
    stopped = runner.train(digits_config(tmp_path / "b", *opts), stop_after_epochs=1)
    assert stopped["status"] == "stopped" and stopped["epochs_done"] == 1
    resumed = runner.resume(tmp_path / "b" / "digits")
    assert resumed["status"] == "complete"

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]

    assert strip(resumed["history"]) == strip(full["history"])
    a = load_file(str(tmp_path / "a" / "digits" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "digits" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, "train.epochs=1")
    runner.train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        runner.train(cfg)


class ExplodingTask(ClassificationTask):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.calls, self.after = 0, after

    def loss(self, model, x, y):
        loss, logits = super().loss(model, x, y)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.after else loss), logits


def test_nan_guard_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    from vptlab.engine.build import build_experiment
    from vptlab.engine.loop import fit

    cfg = digits_config(tmp_path, "train.epochs=3")
    data, model = build_experiment(cfg)
    steps_per_epoch = -(-len(data.train) // cfg.data.batch_size)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        fit(model, data, cfg, run_dir, task=ExplodingTask(after=steps_per_epoch + 3))
    state = load_state(run_dir / "state.pt")
    assert state["epoch"] == 1  # the epoch that went bad was not saved
    saved = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_checkpoints_need_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner.train(digits_config(tmp_path, "train.epochs=1"))

    def refuse(*args, **kwargs):
        raise AssertionError("plain pickle loading used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    cfg, model, _ = runner.load_run(tmp_path / "digits", device="cpu")
    assert cfg.name == "digits"
    state = load_state(tmp_path / "digits" / "state.pt")  # torch.load(weights_only=True)
    assert state["epoch"] == 1


def test_state_file_with_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "state.pt"
    torch.save({"epoch": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_state(path)
