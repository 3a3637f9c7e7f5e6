"""One torch thread per test: the tiny models here run several times faster on one thread than on
two that wait for each other on a busy machine. And the suite's one backdoored SimpleNet
(`backdoored`, built once per session through `vptlab.backdoors.poison` and the one loop), which
the repairers and the prompt defense repair and the trigger search looks into, with the trigger
and an ASR evaluator, and its clean twin (`clean_model`). Tests must not change their models: take
`backdoored.copy()`."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vptlab.backdoors.metrics import BackdoorAccuracy, BackdoorThreat
from vptlab.backdoors.poison import poison_data, poison_trigger
from vptlab.config import ExperimentConfig, PoisonConfig
from vptlab.data import load_dataset
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import to_rgb
from vptlab.engine.evaluators import Evaluator, TestAccuracy
from vptlab.engine.loop import fit
from vptlab.models import create_model
from vptlab.steps import train as runner
from vptlab.steps.resolve import load_resolved, resolved


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- A backdoored SimpleNet for the repairer tests --------------------------------------------
# BadNets, all-to-one: a 3x3 white patch in the bottom-right corner of 10% of the mnist-5k train
# digits, relabeled to class 0, through vptlab.backdoors' own poisoning wrapper.
TARGET = 0
POISON = PoisonConfig(trigger="badnets", options={"size": 3, "location": "bottom-right"},
                      rate=0.1, target=TARGET)  # fmt: skip
TRIGGER = poison_trigger(POISON, seed=0)


def stamp(x: torch.Tensor) -> torch.Tensor:
    """The trigger: a copy of `x` whose bottom-right 3x3 pixels are white."""
    return TRIGGER.apply(x)


def AttackSuccessRate(test: TensorSplit) -> BackdoorAccuracy:  # noqa: N802 (an evaluator)
    """Evaluator: `badnets/asr` (and `badnets/ra`) on the triggered non-target test digits."""
    return BackdoorAccuracy(test, BackdoorThreat(TRIGGER, TARGET))


def repair_config(out_dir: Path, name: str, **sections: Any) -> ExperimentConfig:
    """A CPU config for short runs on mnist-5k; `train` / `defense` sections as keyword dicts."""
    raw: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "device": "cpu",
        "data": {"name": "mnist-5k", "batch_size": 64, "num_workers": 0},
        "model": {"name": "simplenet"},
        "output": {"dir": str(out_dir), "tensorboard": False, "progress": False},
    }
    train = {"weight_decay": 0.01, **sections.pop("train", {})}
    train.setdefault("eval_every", train.get("epochs", 1))  # evaluate the last epoch only
    return resolved({**raw, "train": train, **sections})


@dataclass
class Backdoored:
    """The clean mnist-5k splits, a SimpleNet trained on their poisoned copy, and its numbers."""

    data: DataSplits
    model: nn.Module
    ca: float
    asr: float
    seconds: float

    target: int = TARGET

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.model)

    @staticmethod
    def stamp(x: torch.Tensor) -> torch.Tensor:
        return stamp(x)

    @staticmethod
    def config(out_dir: Path, name: str, **sections: Any) -> ExperimentConfig:
        return repair_config(out_dir, name, **sections)

    def evaluators(self) -> list[Evaluator]:
        return [TestAccuracy(self.data.test), AttackSuccessRate(self.data.test)]

    def test_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean test split, 3 channels."""
        return to_rgb(self.data.test.x).contiguous(), self.data.test.y

    def triggered_test(self) -> torch.Tensor:
        """The stamped test images whose true label is not the target (what the ASR counts)."""
        x, y = self.test_images()
        return stamp(x[y != self.target])

    def measure(self, model: nn.Module) -> tuple[float, float]:
        """(clean accuracy, attack success rate) in % of `model` on the test split, as
        `evaluators()` count them."""
        x, y = self.test_images()
        training = model.training
        model.eval()
        with torch.no_grad():
            ca = (model(x).argmax(1) == y).float().mean()
            asr = (model(self.triggered_test()).argmax(1) == self.target).float().mean()
        model.train(training)
        return 100.0 * float(ca), 100.0 * float(asr)


@pytest.fixture(scope="session")
def backdoored(tmp_path_factory: pytest.TempPathFactory) -> Backdoored:
    """One epoch of SimpleNet on mnist-5k with 10% poisoned digits: ~92% CA, ~99% ASR."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_dataset("mnist-5k", seed=0)
        cfg = repair_config(tmp_path_factory.mktemp("backdoor"), "backdoor",
                            train={"epochs": 1, "lr": 3e-3})  # fmt: skip
        torch.manual_seed(0)
        model = create_model("simplenet", num_classes=10, img_size=28)
        poisoned_data = poison_data(data, POISON, seed=0)
        start = time.perf_counter()
        evaluators = [TestAccuracy(data.test), AttackSuccessRate(data.test)]
        metrics = fit(model, poisoned_data, cfg, cfg.output.dir + "/backdoor",
                      evaluators=evaluators)  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    final = metrics["final"]
    return Backdoored(data, model.eval(), final["test_top1"], final["badnets/asr"], seconds)


@pytest.fixture(scope="session")
def clean_model(backdoored: Backdoored, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """A SimpleNet trained as the backdoored one (same data, recipe and seed), unpoisoned:
    the reference of the trigger searches (adaptive attacker, Neural Cleanse)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = backdoored.config(tmp_path_factory.mktemp("clean"), "clean",
                                train={"epochs": 1, "lr": 3e-3})  # fmt: skip
        torch.manual_seed(0)
        model = create_model("simplenet", num_classes=10, img_size=28)
        fit(model, backdoored.data, cfg, cfg.output.dir + "/clean")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


# --- Run folders for `vptlab defend` / `vptlab detect` ----------------------------------------
PRESET = Path(__file__).resolve().parents[2] / "configs" / "backdoor_mnist_badnets.yaml"


@pytest.fixture(scope="session")
def poisoned_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BadNets-poisoned and a clean SimpleNet, 2 epochs each on mnist-5k."""
    out = tmp_path_factory.mktemp("runs")
    common = [f"output.dir={out}", "output.progress=false", "output.tensorboard=false",
              "device=cpu", "data.num_workers=0", "train.epochs=2"]  # fmt: skip
    runner.train(load_resolved(PRESET, common))
    runner.train(load_resolved(PRESET, [*common, "name=clean", "data.poison=null"]))
    return {"poisoned": out / "backdoor-mnist-badnets", "clean": out / "clean"}
