"""Optimizer construction: SGD's Nesterov is an explicit choice, off by default as in VPT."""

from __future__ import annotations

import pytest
from torch import nn

from vptlab.config import TrainConfig
from vptlab.engine.optim import build_optimizer
from vptlab.errors import ConfigError
from vptlab.steps.resolve import resolved


def test_sgd_is_plain_momentum_unless_nesterov_is_asked_for() -> None:
    model = nn.Linear(4, 2)
    plain = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.9))
    assert all(g["nesterov"] is False for g in plain.param_groups)
    nesterov = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.9, nesterov=True))
    assert all(g["nesterov"] is True for g in nesterov.param_groups)


def test_nesterov_without_momentum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train: .*nesterov"):
        resolved({"train": {"optimizer": "sgd", "momentum": 0, "nesterov": True}})
