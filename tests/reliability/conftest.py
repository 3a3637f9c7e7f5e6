"""Fixtures of the reliability tests: one thread, the tiny run's uninterrupted reference (trained
once per session, its steps and writes counted) and a poisoned tiny run; see helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .helpers import TINY, Reference, counted, read_metrics, tiny_config, write_yaml


@pytest.fixture(scope="session")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Reference:
    folder = tmp_path_factory.mktemp("reference")
    config = tiny_config(folder)
    faults = counted(["train", "-c", str(config)])
    run = folder / TINY["name"]
    metrics = read_metrics(run)
    assert metrics["status"] == "complete" and metrics["final"]["test_top1"] > 50
    return Reference(run, config, metrics, faults)


@pytest.fixture(scope="session")
def poisoned(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A finished tiny run trained with BadNets (10% of the train split): what `vptlab defend`
    and `vptlab detect` take. Tests write beside it, never into it."""
    folder = tmp_path_factory.mktemp("poisoned")
    raw = {**TINY, "name": "poisoned", "output": {**TINY["output"], "dir": str(folder)},
           "train": {"epochs": 2, "lr": 3e-3},
           "data": {**TINY["data"], "poison": {"trigger": "badnets", "rate": 0.1, "target": 0,
                                                "options": {"size": 3}}}}  # fmt: skip
    counted(["train", "-c", str(write_yaml(folder / "poisoned.yaml", raw))])
    assert read_metrics(folder / "poisoned")["status"] == "complete"
    return folder / "poisoned"
