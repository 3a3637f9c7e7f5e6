"""The one loop: learns, resumes exactly, guards against NaN, writes pickle-free files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vptlab.config import ExperimentConfig
from vptlab.engine.checkpoint import load_state
from vptlab.engine.tasks import ClassificationTask
from vptlab.errors import ConfigError, TrainingDiverged, VptlabError
from vptlab.steps import train as runner
from vptlab.steps.resolve import resolved


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
    return resolved(base, list(overrides))


def test_learns_digits(tmp_path: Path) -> None:
    metrics = runner.train(digits_config(tmp_path))
    assert metrics["status"] == "complete"
    assert metrics["final"]["test_top1"] > 85.0  # chance is 10%
    run = tmp_path / "digits"
    for name in ("config.yaml", "model.safetensors", "state.pt", "metrics.json", "report.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["epochs_done"] == 4


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


def _same_weights(a_dir: Path, b_dir: Path) -> bool:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Dropout draws from the global RNG, so only an exact RNG restore gives the same run.
RESUME_OPTS = ("data.augment.crop_pad=1", "train.epochs=3", "model.options.drop_rate=0.3")


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = runner.train(digits_config(tmp_path / "a", *RESUME_OPTS))
    stopped = runner.train(digits_config(tmp_path / "b", *RESUME_OPTS), stop_after_epochs=1)
    assert stopped["status"] == "stopped" and stopped["epochs_done"] == 1
    resumed = runner.resume(tmp_path / "b" / "digits")
    assert resumed["status"] == "complete"
    assert _strip(resumed["history"]) == _strip(full["history"])
    assert _same_weights(tmp_path / "a" / "digits", tmp_path / "b" / "digits")


@pytest.mark.slow
def test_resume_without_rng_restore_would_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test above can catch a broken RNG restore: with it skipped, the run comes out different.
    full = runner.train(digits_config(tmp_path / "a", *RESUME_OPTS))
    runner.train(digits_config(tmp_path / "b", *RESUME_OPTS), stop_after_epochs=1)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    torch.manual_seed(1234)
    resumed = runner.resume(tmp_path / "b" / "digits")
    assert _strip(resumed["history"]) != _strip(full["history"])


class KilledAt(ClassificationTask):
    """Raises after `steps` optimizer steps, as a kill would end the process there."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.calls, self.steps = 0, steps

    def loss(self, model, batch, raw_model):
        if self.calls == self.steps:
            raise KeyboardInterrupt
        self.calls += 1
        return super().loss(model, batch, raw_model)


def _killed_run(cfg: ExperimentConfig, steps: int) -> Path:
    from vptlab.engine.loop import fit
    from vptlab.steps.build import build_experiment

    data, model = build_experiment(cfg)
    run_dir = tmp_run = Path(cfg.output.dir) / cfg.name
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, cfg, tmp_run, task=KilledAt(steps))
    return run_dir


@pytest.mark.slow
def test_mid_epoch_checkpoints_resume_exactly(tmp_path: Path) -> None:
    # digits: 1,438 train images / 64 = 23 steps an epoch; killed in epoch 2 at step 30,
    # checkpoints every 4 steps: resumes at step 28 of 69.
    opts = (*RESUME_OPTS, "train.checkpoint_every_steps=4")
    full = runner.train(digits_config(tmp_path / "a", *opts))
    run_dir = _killed_run(digits_config(tmp_path / "b", *opts), steps=30)
    state = load_state(run_dir / "state.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 5, 28)
    resumed = runner.resume(run_dir)
    assert _strip(resumed["history"]) == _strip(full["history"])
    assert _same_weights(tmp_path / "a" / "digits", run_dir)


def test_folder_killed_before_its_first_checkpoint_resumes_from_the_start(
    tmp_path: Path,
) -> None:
    full = runner.train(digits_config(tmp_path / "a", "train.epochs=1"))
    run_dir = _killed_run(digits_config(tmp_path / "b", "train.epochs=1"), steps=3)
    assert not (run_dir / "state.pt").exists() and (run_dir / "config.yaml").is_file()
    resumed = runner.resume(run_dir)
    assert resumed["status"] == "complete"
    assert _strip(resumed["history"]) == _strip(full["history"])


@pytest.mark.slow
def test_kill_between_model_and_state_write_is_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vptlab.engine import loop

    full = runner.train(digits_config(tmp_path / "a", *RESUME_OPTS))
    real_save_state, calls = loop.save_state, []

    def dies_on_second_epoch(state, path):
        calls.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # model.safetensors of epoch 2 is already written
        real_save_state(state, path)

    monkeypatch.setattr(loop, "save_state", dies_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        runner.train(digits_config(tmp_path / "b", *RESUME_OPTS))
    monkeypatch.setattr(loop, "save_state", real_save_state)
    run_dir = tmp_path / "b" / "digits"
    assert load_state(run_dir / "state.pt")["epoch"] == 1
    from vptlab.engine.checkpoint import read_metadata

    assert read_metadata(run_dir / "model.safetensors")["epoch"] == "2"  # one write ahead
    resumed = runner.resume(run_dir)
    assert _strip(resumed["history"]) == _strip(full["history"])
    assert _same_weights(tmp_path / "a" / "digits", run_dir)


@pytest.mark.slow
def test_mismatched_model_and_state_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vptlab.engine import loop

    def dies_on_second_epoch(state, path):
        if state["epoch"] == 2:
            raise KeyboardInterrupt
        torch.save(state, path)

    monkeypatch.setattr(loop, "save_state", dies_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        runner.train(digits_config(tmp_path, *RESUME_OPTS))
    run_dir = tmp_path / "digits"
    (run_dir / loop.PREVIOUS_MODEL_FILE).unlink()  # nothing left to repair from
    with pytest.raises(VptlabError, match="epoch 2.*epoch 1.*not a pair"):
        runner.resume(run_dir)


@pytest.mark.slow
def test_resume_takes_only_overrides_that_keep_the_results(tmp_path: Path) -> None:
    runner.train(digits_config(tmp_path, "train.epochs=2"), stop_after_epochs=1)
    run_dir = tmp_path / "digits"
    with pytest.raises(ConfigError, match="train.lr cannot change when resuming"):
        runner.resume(run_dir, ["train.lr=0.5"])
    metrics = runner.resume(run_dir, ["train.epochs=3", "output.progress=false"])
    assert metrics["status"] == "complete" and metrics["epochs_done"] == 3
    assert "epochs: 3" in (run_dir / "config.yaml").read_text()


def test_cli_resume_passes_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vptlab.cli import main

    runner.train(digits_config(tmp_path, "train.epochs=2"), stop_after_epochs=1)
    assert main(["train", "--resume", str(tmp_path / "digits"), "seed=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "seed cannot change when resuming" in err


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, "train.epochs=1")
    runner.train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        runner.train(cfg)


class ExplodingTask(ClassificationTask):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.calls, self.after = 0, after

    def loss(self, model, batch, raw_model):
        loss, logits = super().loss(model, batch, raw_model)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.after else loss), logits


def test_nan_guard_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    from vptlab.engine.loop import fit
    from vptlab.steps.build import build_experiment

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
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and "loss became nan" in metrics["error"]


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
    with pytest.raises(VptlabError, match="refused unread: it references .*print"):
        load_state(path)


def test_training_off_a_terminal_logs_one_line_per_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner.train(digits_config(tmp_path, "train.epochs=2", "output.progress=true"))
    lines = capsys.readouterr().out.splitlines()
    assert "" not in lines
    epochs = [line for line in lines if line.startswith("digits epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["digits epoch 1/2", "digits epoch 2/2"]
    assert all(" 100% 23/23 " in line for line in epochs), epochs
