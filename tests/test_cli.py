"""The `vptlab` command: one-line errors, model listing, train then eval a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vptlab.cli import main


def write_config(tmp_path: Path) -> Path:
    cfg = {
        "name": "cli",
        "device": "cpu",
        "data": {"name": "digits", "img_size": 16, "num_workers": 0},
        "model": {"name": "simplenet"},
        "train": {"epochs": 2, "lr": 3e-3},
        "output": {"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr=-1"], "vptlab: error: train.lr: Input should be greater than 0"),
        (["model.name=resnet9000"], "vptlab: error: model.name: unknown model 'resnet9000'"),
        (["data.name=cifar10", "data.root=/nonexistent/cifar"], "vptlab: error: cifar10: "),
        (["data.name=miniplaces", "data.root=/nonexistent/mp"], "vptlab: error: miniplaces: "),
        # config values the factories or the seeding would choke on: named before any work
        (["seed=-1"], "vptlab: error: seed: Input should be greater than or equal to 0, got -1"),
        (["model.options.drop_rate=abc"], "vptlab: error: model.options.drop_rate: Input "),
        (["data.options.test_fraction=abc"], "vptlab: error: data.options.test_fraction: Input "),
        (["model.options.dropp=0.1"], "vptlab: error: model.options.dropp: unknown option"),
        (["data.options.limit=3"], "vptlab: error: data.options.limit: unknown option"),
        (["model.options.img_size=8"], "vptlab: error: model.options.img_size: not an option"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, capsys, overrides: list[str], expected: str) -> None:
    code = main(["train", "-c", str(write_config(tmp_path)), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_models_lists_the_registry(capsys) -> None:
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    for name in ("simplenet", "simplenet-customconv", "vit-scratch", "vit_base_patch16_224"):
        assert name in names


def test_train_then_eval(tmp_path: Path, capsys) -> None:
    assert main(["train", "-c", str(write_config(tmp_path)), "--gpu=-1"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(tmp_path / "runs" / "cli"), "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == pytest.approx(trained["test_top1"])
    assert evaluated["top1"] > 50.0
