"""Blind defenders (docs/defense_protocol.md): a repairer or a detector gets the model, the
defender's clean data and its own options, and can reach nothing of the attack: not the trigger,
the target, the poison's config, the poisoned samples or indices, nor the test split. Every
registered classifier repairer and every detector is run through the real steps with spies on
what it receives; and the one recipe-selection rule reads the validation slice only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vptlab.backdoors.metrics import BackdoorAccuracy, BackdoorThreat
from vptlab.backdoors.poison import PoisonRecord, load_poison_record
from vptlab.backdoors.triggers import Trigger
from vptlab.config import ExperimentConfig, PoisonConfig
from vptlab.data import load_dataset
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.defenses import detectors as detectors_module
from vptlab.defenses import repair as repair_module
from vptlab.defenses.detectors import DETECTORS
from vptlab.defenses.repair import REPAIRERS, defender_splits
from vptlab.steps.defend import defend
from vptlab.steps.detect import detect_run

FORBIDDEN_TYPES = (Trigger, BackdoorThreat, BackdoorAccuracy, PoisonRecord, PoisonConfig)


def row_keys(x: torch.Tensor) -> set[bytes]:
    """One key per image (its bytes), to find images of one set in another."""
    return {row.numpy().tobytes() for row in x.float().flatten(1).cpu()}


class Forbidden:
    """What no defender may see: the test split's images, the poisoned training samples as
    trained on, and objects of the attack. (A clean copy of a sample the attacker poisoned may be
    in the defender's clean subset, drawn from the clean train split as BackdoorBench draws it.)"""

    def __init__(self, run_dir: Path) -> None:
        data = load_dataset("mnist-5k", seed=0)
        record = load_poison_record(run_dir)
        clean = data.train.x[record.poisoned]
        self.images = row_keys(data.test.x) | row_keys(record.trigger.apply(clean))
        self.train = row_keys(data.train.x)

    def check(self, value: Any, where: str, depth: int = 0) -> None:
        """Walk `value` (containers, dataclasses, plain objects) for anything forbidden."""
        assert not isinstance(value, FORBIDDEN_TYPES), f"{where}: a {type(value).__name__}"
        if depth > 4 or isinstance(value, (str, bytes, int, float, bool, type(None), nn.Module)):
            return
        if isinstance(value, ExperimentConfig):
            assert value.data.poison is None, f"{where}: the config holds data.poison"
            assert value.parent is None, f"{where}: the config names the parent run"
            return
        if isinstance(value, TensorSplit):
            seen = row_keys(value.x)
            assert seen <= self.train, f"{where}: images that are not clean train samples"
            assert not seen & self.images, f"{where}: test-split or poisoned images"
            return
        if isinstance(value, torch.Tensor):
            if value.dim() == 4:
                assert not row_keys(value) & self.images, f"{where}: test or poisoned images"
            return
        if isinstance(value, dict):
            for key, item in value.items():
                self.check(item, f"{where}[{key!r}]", depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self.check(item, f"{where}[{i}]", depth + 1)
        elif dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                self.check(getattr(value, field.name), f"{where}.{field.name}", depth + 1)
        elif hasattr(value, "__dict__"):
            for key, item in vars(value).items():
                self.check(item, f"{where}.{key}", depth + 1)


class Spy:
    """A repairer whose members record their arguments before doing their work."""

    def __init__(self, inner: Any, seen: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._inner, self._seen = inner, seen
        self.name, self.trains = inner.name, inner.trains
        for member in ("recipe", "before_fit"):
            if hasattr(inner, member):
                setattr(self, member, self._recorded(member))

    def _recorded(self, member: str) -> Any:
        def call(*args: Any) -> Any:
            self._seen.append((member, args))
            return getattr(self._inner, member)(*args)

        return call

    def prepare(self, model: nn.Module) -> nn.Module:
        self._seen.append(("prepare", (model,)))
        return self._inner.prepare(model)

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Any:
        self._seen.append(("task", (model, clean, cfg)))
        task = self._inner.task(model, clean, cfg)
        self._seen.append(("the task", (task,)))
        return task


CLASSIFIER_REPAIRERS = REPAIRERS.names(needs_image_text=False)


@pytest.mark.parametrize("select", [False, True], ids=["defaults", "selected"])
@pytest.mark.parametrize("name", CLASSIFIER_REPAIRERS)
def test_a_repairer_reaches_nothing_of_the_attack(
    name: str, select: bool, poisoned_runs: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    seen: list[tuple[str, tuple[Any, ...]]] = []
    create = repair_module.create_repairer
    monkeypatch.setattr(repair_module, "create_repairer",
                        lambda n, **o: Spy(create(n, **o), seen))  # fmt: skip
    defense: dict[str, Any] = {"name": name}
    if select:
        defense["select"] = {"lr_scales": [1.0], "val_fraction": 0.25}
    metrics = defend(poisoned_runs["poisoned"], defense,
                     [f"name=blind-{name}-{select}", f"output.dir={tmp_path}", "train.epochs=1",
                      "device=cpu"])  # fmt: skip
    members = {member for member, _ in seen}
    assert {"prepare", "task"} <= members, members
    forbidden = Forbidden(poisoned_runs["poisoned"])
    for member, args in seen:
        forbidden.check(args, f"{name}.{member}")
    assert metrics["defense"]["asr_after"] >= 0  # the run itself was measured, outside


def test_the_walk_finds_what_a_leaky_defender_would_see(poisoned_runs: dict[str, Path]) -> None:
    """The check above can fail: handed the test split, the trigger or the poisoned config, it
    says so."""
    forbidden = Forbidden(poisoned_runs["poisoned"])
    data = load_dataset("mnist-5k", seed=0)
    record = load_poison_record(poisoned_runs["poisoned"])
    stamped = record.trigger.apply(data.train.x[record.poisoned[:5]])
    leaks = [data.test, record.trigger, {"cfg": record.config},
             TensorSplit(stamped, data.train.y[:5])]  # fmt: skip
    for leak in leaks:
        with pytest.raises(AssertionError):
            forbidden.check(leak, "leak")
    forbidden.check(defender_splits(data, 0.05, 0, 0.2), "clean")  # the defender's own: fine


@pytest.mark.parametrize("name", DETECTORS.names())
def test_a_detector_is_built_from_the_defenders_data_only(
    name: str, poisoned_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[dict[str, Any]] = []
    create = DETECTORS.create

    def spy(detector: str, **kwargs: Any) -> Any:
        built.append(kwargs)
        return create(detector, **kwargs)

    monkeypatch.setattr(detectors_module.DETECTORS, "create", spy)
    detect_run(poisoned_runs["poisoned"], name, device="cpu", overlays=2)
    assert built
    forbidden = Forbidden(poisoned_runs["poisoned"])
    for kwargs in built:
        # The training labels (spectral) are the data it inspects; what else it holds is checked.
        forbidden.check({k: v for k, v in kwargs.items() if k != "labels"}, name)
        assert set(kwargs) <= {"pool", "labels", "seed", "overlays", "cache"}, kwargs
        # A detector that keeps its work (nc) gets the study's folder for it, not the run's,
        # where the poison record lies.
        assert kwargs.get("cache", poisoned_runs["poisoned"].parent) == (
            poisoned_runs["poisoned"].parent)  # fmt: skip


def test_the_defender_splits_hold_out_a_stratified_validation_slice() -> None:
    data = load_dataset("mnist-5k", seed=0)
    plain = defender_splits(data, 0.05, seed=3)
    assert plain.test is plain.train and len(plain.train) == 200
    held = defender_splits(data, 0.05, seed=3, val_fraction=0.25)
    train, val = row_keys(held.train.x), row_keys(held.test.x)
    assert len(held.train) == 150 and len(held.test) == 50 and not train & val
    assert train | val == row_keys(plain.train.x)  # the same 200 samples, split
    assert torch.bincount(held.test.y, minlength=10).min() >= 4  # every class in the slice


def test_selection_keeps_the_largest_step_within_the_drop(
    poisoned_runs: dict[str, Path], tmp_path: Path
) -> None:
    """lr x 300 wrecks the model on the validation slice and is refused; lr x 0.01 barely moves
    it and is kept, and its trial is the run."""
    defense = {"name": "ft", "select": {"lr_scales": [0.01, 300.0], "max_drop": 2.0}}
    metrics = defend(poisoned_runs["poisoned"], defense,
                     [f"output.dir={tmp_path}", "train.epochs=2", "device=cpu"])  # fmt: skip
    selection = metrics["defense"]["selection"]
    first, second = selection["trials"]
    assert first["scale"] == 300.0 and not first["accepted"] and first["drop"] > 2.0
    assert second["scale"] == 0.01 and second["accepted"], selection
    assert selection["lr"] == pytest.approx(second["lr"]) and selection["val_samples"] == 40
    assert selection["max_drop"] == 2.5  # one sample of 40 is more than 2 points
    saved = json.loads((tmp_path / metrics["name"] / "metrics.json").read_text())
    assert saved["history"][-1]["val_top1"] == pytest.approx(second["val_top1"])
