"""Kill -9 at seeded moments: a training run, a defense and a small threat matrix are each killed
(SIGKILL, in a forked copy of the test process) at points drawn with a fixed seed from all of
their optimizer steps and atomic writes (inside the write: temp file flushed, not renamed; and
just after its rename), then resumed or run again as a user would: the final metrics equal the
uninterrupted run's (timing keys aside), the weights are the same, and every file in every
folder is complete (weights load, JSON parses, no temp or lock file is left).

Right after each kill, before anything repairs the folder, every file but the dead process's temp
files and lock must already be complete: that is what the atomic writes promise.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from vptlab.engine.checkpoint import load_state, read_metadata
from vptlab.runs import CELL_FILE, MODEL_FILE, PREVIOUS_MODEL_FILE

from .helpers import (
    TINY,
    Faults,
    KillPoint,
    Reference,
    check_complete,
    counted,
    killed,
    ok,
    read_metrics,
    same_weights,
    tiny_config,
    without_timing,
    write_yaml,
)

SEED = 18  # the number: the kill points are drawn from each run's own steps and writes
TRAIN_KILLS, DEFENSE_KILLS, MATRIX_KILLS = 12, 4, 4


def draw(faults: Faults, count: int, salt: str) -> list[KillPoint]:
    """`count` kill points drawn with the fixed seed from those of a counted run, in run order."""
    points = faults.points()
    chosen = random.Random(f"{SEED}-{salt}").sample(range(len(points)), count)
    return [points[i] for i in sorted(chosen)]


def test_kill_points_cover_steps_and_writes(reference: Reference) -> None:
    """The training points are drawn from all 46 steps and all writes, and the writes include
    every kind of file the run holds (config, model, state, metrics, report), so a kill can land
    in any of them."""
    names = set(reference.faults.writes)
    assert {"config.yaml", "model.safetensors", "state.pt", "metrics.json", "report.md"} <= names
    assert reference.faults.steps == 46
    kinds = {p.kind for p in draw(reference.faults, TRAIN_KILLS, "train")}
    assert kinds == {"step", "write"}


@pytest.mark.parametrize("index", range(TRAIN_KILLS))
def test_killed_training_resumes_to_the_uninterrupted_run(
    index: int, reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point = draw(reference.faults, TRAIN_KILLS, "train")[index]
    config = tiny_config(tmp_path)
    run = tmp_path / TINY["name"]
    killed(point, ["train", "-c", str(config)])
    check_complete(run, killed=True)
    # As a user would go on: --resume once the folder holds a config, else the same command.
    started = (run / "config.yaml").is_file()
    ok(capsys, ["train", "--resume", str(run)] if started else ["train", "-c", str(config)])
    assert read_metrics(run) == reference.metrics, f"killed at {point}"
    assert same_weights(run / MODEL_FILE, reference.run / MODEL_FILE), f"killed at {point}"
    check_complete(run)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(
    name: str, reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed between the temp file and the rename of epoch 1's last checkpoint (step 23): the
    step-20 checkpoint survives whole, as model.safetensors + state.pt, or, when the model file
    was already replaced, as the kept previous model file + state.pt; resume takes it."""
    writes = reference.faults.writes
    epoch_end = writes.index("metrics.json")  # the epoch-1 checkpoint's two writes come before
    fail_at = epoch_end - 1 if name == "model.safetensors" else epoch_end
    assert writes[fail_at - 1] == name
    run = tmp_path / TINY["name"]
    killed(KillPoint("write", fail_at, "inside"), ["train", "-c", str(tiny_config(tmp_path))])
    state = load_state(run / "state.pt")
    kept = run / (MODEL_FILE if name == "model.safetensors" else PREVIOUS_MODEL_FILE)
    meta = read_metadata(kept)
    assert (state["step"], meta["step"], meta["digest"]) == (20, "20", state["model_digest"])
    assert len(list(run.glob(f".{name}.*.tmp"))) == 1  # the new file, never renamed
    ok(capsys, ["train", "--resume", str(run)])
    assert read_metrics(run) == reference.metrics
    check_complete(run)


# A defense: fine-tuning a poisoned tiny run, each attempt under its own name beside the parent.

def defend_argv(parent: Path, name: str) -> list[str]:
    return ["defend", str(parent), "--defense", "ft", "--clean-fraction", "0.3", "--no-adaptive",
            "train.epochs=2", "train.lr=0.01", f"name={name}"]  # fmt: skip


def defended_metrics(run: Path) -> dict[str, Any]:
    return {k: v for k, v in read_metrics(run).items() if k != "name"}


@pytest.fixture(scope="module")
def defense(poisoned: Path) -> tuple[Path, Faults]:
    """The poisoned parent and the counted uninterrupted defense of it (`ref`)."""
    faults = counted(defend_argv(poisoned, "ref"))
    assert read_metrics(poisoned.parent / "ref")["status"] == "complete"
    return poisoned, faults


@pytest.mark.parametrize("index", range(DEFENSE_KILLS))
def test_killed_defense_run_again_gives_the_same_repair(
    index: int, defense: tuple[Path, Faults], capsys: pytest.CaptureFixture[str]
) -> None:
    parent, faults = defense
    point = draw(faults, DEFENSE_KILLS, "defense")[index]
    name = f"killed{index}"
    killed(point, defend_argv(parent, name))
    run = parent.parent / name
    if run.exists():
        check_complete(run, killed=True)
    ok(capsys, defend_argv(parent, name))
    reference = parent.parent / "ref"
    assert defended_metrics(run) == defended_metrics(reference), f"killed at {point}"
    assert same_weights(run / MODEL_FILE, reference / MODEL_FILE), f"killed at {point}"
    check_complete(run)
    check_complete(parent)


# A small threat matrix: two training runs (clean, BadNets), a fine-tuning repair, three cells.

def matrix_config(out: Path) -> dict[str, Any]:
    base = {k: TINY[k] for k in ("seed", "device", "output")}
    return {
        "matrix": "m",
        "output": str(out),
        "base": {**base, "data": {k: v for k, v in TINY["data"].items() if k != "augment"},
                 "train": {"epochs": 1, "lr": 3e-3}},
        "models": {"simplenet": {"model": TINY["model"]}},
        "threats": {
            "clean": {"kind": "clean"},
            "badnets": {"kind": "backdoor", "poison": {
                "trigger": "badnets", "rate": 0.1, "target": 0, "options": {"size": 3}}},
        },
        "defenses": {
            "none": {"kind": "none"},
            "ft": {"kind": "repair", "name": "ft", "clean_fraction": 0.2,
                   "train": {"epochs": 1, "lr": 1e-2}},
        },
        # No adaptive search: this test is about resuming the steps; a killed subprocess would
        # also run the search at its full size (~25 s a call).
        "evaluation": {"limit": 64, "examples": 0, "adaptive": False},
    }  # fmt: skip


def matrix_argv(out: Path) -> list[str]:
    config = write_yaml(out / "matrix.yaml", matrix_config(out))
    return ["run", "-c", str(config), "--no-progress"]


def matrix_results(out: Path) -> dict[str, Any]:
    """Each cell's status, metrics and derived numbers, and the report's threat tables."""
    cells = {}
    for path in sorted((out / "cells").glob(f"*/{CELL_FILE}")):
        cell = json.loads(path.read_text())
        cells[cell["id"]] = without_timing([cell["status"], cell.get("metrics"),
                                            cell.get("derived")])  # fmt: skip
    text = (out / "report.md").read_text()
    start = text.index("## Threat: ")
    tables = text[start:text.index("\n## ", text.rindex("## Threat: ") + 1)]
    return {"cells": cells, "tables": tables}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[Path, Faults]:
    out = tmp_path_factory.mktemp("matrix")
    faults = counted(matrix_argv(out))
    plan = json.loads((out / "m" / "matrix.json").read_text())
    assert sum(not c["skip"] for c in plan["cells"]) == 3
    return out / "m", faults


@pytest.mark.parametrize("index", range(MATRIX_KILLS))
def test_killed_matrix_run_again_gives_the_same_tables(
    index: int, matrix: tuple[Path, Faults], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, faults = matrix
    point = draw(faults, MATRIX_KILLS, "matrix")[index]
    argv = matrix_argv(tmp_path)
    killed(point, argv)
    out = tmp_path / "m"
    check_complete(out, killed=True)
    ok(capsys, argv)
    assert matrix_results(out) == matrix_results(reference), f"killed at {point}"
    check_complete(out)
    assert yaml.safe_load((tmp_path / "matrix.yaml").read_text())["matrix"] == "m"
