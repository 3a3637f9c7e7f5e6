"""Running the threat matrix: cached backbones, then every distinct training step, then every cell
(defend, evaluate), each stage handed to an executor; then the report.

Everything a cell finishes is in its folders (`runs/<step>`, `cells/<cell>/cell.json`), written
atomically, so a matrix killed at any moment and run again reuses what finished, resumes the
interrupted training steps from their checkpoints and redoes only the rest: the same table as one
uninterrupted run. A failed step or cell is recorded with its one-line error and the others go on.

With a seeds axis each (training run, seed) and each (cell, seed) is its own executor task: the
seed is in the run's name and key and in the cell's id and folder (matrix/cells.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vptlab.errors import ConfigError
from vptlab.matrix.cells import PLAN_FILE, Cell, plan
from vptlab.matrix.config import MatrixConfig, parse_matrix
from vptlab.matrix.executors import Executor, Outcome, Resources, create_executor
from vptlab.runs import atomic_write_text, folder_lock
from vptlab.steps.cells import record_failure, run_cell, train_step


def run_matrix(
    raw: dict[str, Any],
    overrides: list[str] | None = None,
    *,
    fresh: bool = False,
    executor: str = "local",
    address: str | None = None,
    ray_cpus: int | None = None,
    progress: bool = True,
) -> Path:
    """Run every cell of the matrix config `raw` and write its report; returns report.html.

    `overrides` (key=value) apply to every training step (`device=cpu`); `fresh` retrains and
    re-evaluates everything; `executor` is local (in-process, sequential) or ray (`address`:
    join that cluster; else a local Ray with `ray_cpus` CPUs, default all)."""
    from vptlab.matrix.report import write_matrix_report
    from vptlab.steps.study import backbone_path, cached_backbone

    matrix = parse_matrix(raw)
    overrides = [*(overrides or []), f"output.progress={str(progress).lower()}"]
    out = Path(matrix.output) / matrix.matrix
    device = [o for o in overrides if o.startswith("device=")]
    with_backbone = {label: spec["backbone"] for label, spec in matrix.adaptations.items()
                     if spec.get("backbone") is not None}  # fmt: skip
    backbones = {}
    for label, spec in with_backbone.items():
        try:
            backbones[label] = backbone_path(spec, device)
        except ConfigError as error:
            raise ConfigError(f"adaptations.{label}.{error}") from None
    # The whole plan is validated (every cell's config built) before a backbone trains.
    cells = plan(matrix, overrides, backbones)
    for spec in with_backbone.values():
        cached_backbone(spec, device)
    with folder_lock(out, "run"):
        write_plan(out, matrix, cells)
        runner = create_executor(executor, address=address, num_cpus=ray_cpus)
        try:
            execute(runner, matrix, cells, fresh, progress)
        finally:
            runner.close()
        return write_matrix_report(out)


def execute(runner: Executor, matrix: MatrixConfig, cells: list[Cell], fresh: bool,
            progress: bool) -> None:  # fmt: skip
    """The distinct training steps, then the cells whose step finished; failures recorded."""
    resources = Resources(matrix.resources.num_cpus, matrix.resources.num_gpus)
    steps = distinct_steps(cells)
    seeds = "" if matrix.seeds is None else f" over {len(matrix.seeds)} seeds"
    print(f"vptlab: matrix '{matrix.matrix}': {len(cells)} cells{seeds} "
          f"({sum(c.skip is not None for c in cells)} skipped), {len(steps)} training runs, "
          f"executor {runner.name}", flush=True)  # fmt: skip
    trained = runner.map(train_step, [(name, {"config": cfg, "fresh": fresh})
                                      for name, cfg in steps.items()],
                         resources, on_done=_report_step("train", len(steps)))  # fmt: skip
    failed_steps = {o.label: o.error for o in trained if not o.ok}
    todo = [c for c in cells if c.skip is None and c.train is not None]
    for cell in todo:
        if cell.train["name"] in failed_steps:  # type: ignore[index]
            record_failure(cell, f"training {cell.train['name']} failed: "  # type: ignore[index]
                           f"{failed_steps[cell.train['name']]}")  # type: ignore[index]
    todo = [c for c in todo if c.train["name"] not in failed_steps]  # type: ignore[index]
    by_id = {c.id: c for c in todo}
    counter = _report_step("cell", len(todo))

    def done(outcome: Outcome) -> None:
        if not outcome.ok:
            record_failure(by_id[outcome.label], outcome.error or "failed")
        counter(outcome)

    runner.map(run_cell, [(c.id, {"cell": c, "fresh": fresh, "progress": progress})
                          for c in todo], resources, on_done=done)  # fmt: skip


def write_plan(out: Path, matrix: MatrixConfig, cells: list[Cell]) -> None:
    """matrix.json: the config and every cell (skipped ones with their reason); the report reads
    it to know which cells belong to the matrix (old cell folders of a changed config do not).
    Without a seeds axis the config has no `seeds` key, as before the axis existed."""
    out.mkdir(parents=True, exist_ok=True)
    config = matrix.model_dump(mode="json", exclude={"seeds"} if matrix.seeds is None else None)
    plan_doc = {"config": config,
                "cells": [c.summary() for c in cells]}  # fmt: skip
    atomic_write_text(out / PLAN_FILE, json.dumps(plan_doc, indent=2) + "\n")


def distinct_steps(cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """The training steps of the cells that run, each once (cells share them by run key)."""
    steps: dict[str, dict[str, Any]] = {}
    for cell in cells:
        if cell.skip is None and cell.train is not None:
            steps.setdefault(cell.train["name"], cell.train)
    return steps


def _report_step(what: str, total: int) -> Any:
    count = 0

    def on_done(outcome: Outcome) -> None:
        nonlocal count
        count += 1
        state = "done" if outcome.ok else f"FAILED: {outcome.error}"
        print(f"vptlab: [{what} {count}/{total}] {outcome.label}: {state} "
              f"({outcome.seconds:.1f} s)", flush=True)  # fmt: skip

    return on_done
