"""The metrics tests' shared fixture: a SimpleNet trained two epochs on digits, loaded back."""

from __future__ import annotations

import pytest
from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.steps import train as runner
from vptlab.steps.resolve import resolved


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentConfig, nn.Module, DataSplits]:
    out = tmp_path_factory.mktemp("runs")
    cfg = resolved({
        "name": "digits", "seed": 0, "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "num_workers": 0},
        "model": {"name": "simplenet"},
        "train": {"epochs": 2, "lr": 3e-3},
        "output": {"dir": str(out), "tensorboard": False, "progress": False},
    })  # fmt: skip
    runner.train(cfg)
    return runner.load_run(out / "digits", device="cpu")
