"""The matrix's cells as steps: a cell's training step, then its defense or its evaluation,
written to `cells/<cell>/cell.json`; each is a module-level function an executor can ship.

`vptlab.matrix` plans the cells (matrix/cells.py) and hands them to an executor; what a cell
does is here, on the floor of the other steps it chains (train, defend, attack).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vptlab.errors import ConfigError
from vptlab.runs import CELL_FILE, METRICS_FILE, MODEL_FILE, atomic_write_text
from vptlab.steps.resolve import resolved

if TYPE_CHECKING:
    from vptlab.matrix.cells import Cell

# What a cell keeps of its training run's metrics.json (the report's curves and times).
TRAIN_KEYS = ("name", "status", "model", "mode", "dataset", "params", "final",
              "seconds_per_epoch", "wall_seconds", "history", "robust_probe", "best_robust",
              "catastrophic_overfitting", "backdoor")  # fmt: skip



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
                     train=cell.defend["train"], fresh=payload["fresh"],
                     adaptive=cell.evaluation.get("adaptive", True))  # fmt: skip
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
        "derived": {k: metrics["defense"][k] for k in
                    ("asr_drop", "ca_drop", "der", "residual_asr") if k in metrics["defense"]},
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
