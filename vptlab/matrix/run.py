"""Running the threat matrix: cached backbones, then every distinct training step, then every cell
(defend, evaluate), each stage handed to an executor; then the report.

Everything a cell finishes is in its folders (`runs/<step>`, `cells/<cell>/cell.json`), written
atomically, so a matrix killed at any moment and run again reuses what finished, resumes the
interrupted training steps from their checkpoints and redoes only the rest: the same table as one
uninterrupted run. A failed step or cell is recorded with its one-line error and the others go on.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vptlab.errors import ConfigError
from vptlab.matrix.cells import CELL_FILE, PLAN_FILE, Cell, plan
from vptlab.matrix.config import MatrixConfig, parse_matrix
from vptlab.matrix.executors import Executor, Outcome, Resources, create_executor
from vptlab.runs import METRICS_FILE, MODEL_FILE, atomic_write_text, folder_lock
from vptlab.steps.resolve import resolved

# What a cell keeps of its training run's metrics.json (the report's curves and times).
TRAIN_KEYS = ("name", "status", "model", "mode", "dataset", "params", "final",
              "seconds_per_epoch", "wall_seconds", "history", "robust_probe", "best_robust",
              "catastrophic_overfitting", "backdoor")  # fmt: skip


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
    print(f"vptlab: matrix '{matrix.matrix}': {len(cells)} cells "
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
    it to know which cells belong to the matrix (old cell folders of a changed config do not)."""
    out.mkdir(parents=True, exist_ok=True)
    plan_doc = {"config": matrix.model_dump(mode="json"),
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


def train_step(payload: dict[str, Any]) -> dict[str, Any]:
    """One training step (an executor task): trained, resumed or reused (study.run_or_reuse).

    Returns the run's status only: the cells read its folder."""
    from vptlab.steps.study import run_or_reuse

    cfg = resolved(payload["config"])
    metrics = run_or_reuse(cfg, fresh=payload["fresh"])
    if metrics.get("status") != "complete":
        raise ConfigError(f"run {cfg.name} ended {metrics.get('status')}")
    return {"name": cfg.name, "status": metrics["status"]}


def read_cell(folder: Path) -> dict[str, Any] | None:
    path = folder / CELL_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def record_failure(cell: Cell, error: str) -> None:
    """A failed cell's cell.json: its one-line error, so the report lists it."""
    folder = Path(cell.folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = {**cell.summary(), "status": "failed", "error": error.splitlines()[0]}
    atomic_write_text(folder / CELL_FILE, json.dumps(result, indent=2) + "\n")
    print(f"vptlab: cell {cell.id} failed: {result['error']}", file=sys.stderr)


def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """One cell after its training step (an executor task): defend and evaluate, write cell.json.

    A complete cell.json with the same key is reused unless `fresh`."""
    cell: Cell = payload["cell"]
    folder = Path(cell.folder)
    saved = read_cell(folder)
    if (not payload["fresh"] and saved is not None and saved.get("status") == "complete"
            and saved.get("key") == cell.key):  # fmt: skip
        return saved
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or failed attempt, or --fresh: nothing finished
    folder.mkdir(parents=True)
    train_metrics = json.loads((cell.train_dir / METRICS_FILE).read_text())
    result: dict[str, Any] = {
        **cell.summary(), "status": "complete",
        "train": {k: train_metrics[k] for k in TRAIN_KEYS if k in train_metrics},
        "config": {"train": cell.train, "defend": cell.defend,
                   "threat": cell.threat_spec.model_dump(mode="json")},
    }  # fmt: skip
    seconds = {"train": float(train_metrics.get("wall_seconds") or 0.0)}
    start = time.perf_counter()
    if cell.defend is not None:
        result.update(_defend(cell, payload))
        seconds["defend"] = float(result["defended"].get("wall_seconds") or 0.0)
        start = time.perf_counter()  # the defense evaluated before and after itself
    else:
        result.update(_evaluate(cell, payload["progress"]))
    seconds["evaluate"] = time.perf_counter() - start
    result["seconds"] = seconds
    result["wall_seconds"] = sum(seconds.values())
    atomic_write_text(folder / CELL_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _defend(cell: Cell, payload: dict[str, Any]) -> dict[str, Any]:
    """The repair step: `vptlab defend` on the trained run; the before / after suites."""
    from vptlab.steps.defend import EXAMPLES_FILE, defend

    assert cell.defend is not None and cell.train is not None
    overrides = [f"name={cell.defend['name']}", f"output.dir={cell.train_dir.parent}",
                 f"device={cell.train['device']}",
                 f"output.progress={str(payload['progress']).lower()}"]  # fmt: skip
    metrics = defend(cell.train_dir, cell.defend["defense"], overrides,
                     train=cell.defend["train"], fresh=payload["fresh"])  # fmt: skip
    defended = cell.train_dir.parent / cell.defend["name"]
    grids = []
    if (defended / EXAMPLES_FILE).is_file():
        shutil.copyfile(defended / EXAMPLES_FILE, Path(cell.folder) / "backdoor_examples.png")
        grids.append("backdoor_examples.png")
    keep = ("name", "status", "wall_seconds", "seconds_per_epoch", "history", "params")
    return {
        "defended": {k: metrics[k] for k in keep if k in metrics},
        "before": metrics["before"],
        "metrics": metrics["after"],
        "derived": {k: metrics["defense"][k] for k in ("asr_drop", "ca_drop", "der")},
        "grids": grids,
    }


def _evaluate(cell: Cell, progress: bool) -> dict[str, Any]:
    """The evaluation step on the trained model: clean, under the attacks, or with the trigger."""
    from vptlab.config import ChecksConfig
    from vptlab.metrics.suite import evaluate_suite
    from vptlab.steps.attack import evaluate_attacks, file_sha256
    from vptlab.steps.defend import suite, threat_of, write_examples
    from vptlab.steps.train import load_run

    assert cell.train is not None
    folder, spec = Path(cell.folder), cell.threat_spec
    cfg, model, splits = load_run(cell.train_dir, device=cell.train["device"])
    limit = cell.evaluation
    if spec.kind == "evasion":
        result = evaluate_attacks(
            cfg, model, splits, spec.attacks, folder, limit=limit["limit"],
            examples=limit["examples"], progress=progress,
            model_sha256=file_sha256(cell.train_dir / MODEL_FILE),
            checks=ChecksConfig.model_validate(limit.get("checks", {})),
        )  # fmt: skip
        grids = [result["grid"]] if result.get("grid") else []
        return {"metrics": result["metrics"], "attacks": result["attacks"],
                "samples": result["samples"], "grids": grids, "checks": result["checks"],
                "unreliable": result["unreliable"]}  # fmt: skip
    if spec.kind == "backdoor":
        threat = threat_of(cell.train_dir, cfg, splits)
        metrics = suite(model, splits, threat, cfg, progress)
        grids = []
        if limit["examples"] > 0:
            write_examples({"poisoned": model}, splits, threat, folder / "backdoor_examples.png",
                           count=limit["examples"], title=f"{threat.name}: clean / triggered",
                           img_size=cfg.data.img_size)  # fmt: skip
            grids.append("backdoor_examples.png")
        return {"metrics": metrics, "grids": grids}
    out = evaluate_suite(model, splits.test, [], progress=progress,
                         batch_size=cfg.data.eval_batch_size, img_size=cfg.data.img_size)
    return {"metrics": {k: v for k, v in out.items() if not k.endswith("/loss")}, "grids": []}
