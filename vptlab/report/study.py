"""A study: several runs sharing a base config (optionally on a cached pretrained backbone),
reported together as one Markdown table and one PNG of training curves."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vptlab.config import ExperimentConfig, apply_overrides, build_config, load_yaml
from vptlab.engine.checkpoint import atomic_write_text
from vptlab.engine.loop import CONFIG_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE
from vptlab.engine.runner import resume, run_dir_of, train
from vptlab.errors import ConfigError, format_validation_error
from vptlab.report.plots import plot_curves
from vptlab.report.tables import RUN_COLUMNS, markdown_table


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study: str
    title: str = ""
    description: str = ""
    output: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict)
    backbone: dict[str, Any] | None = Field(
        None, description="a run config trained once and cached; the runs start from its weights"
    )
    runs: dict[str, dict[str, Any]]


def is_study(raw: dict[str, Any]) -> bool:
    return "runs" in raw


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("VPTLAB_CACHE", Path.home() / ".cache" / "vptlab"))


def cached_backbone(raw: dict[str, Any], overrides: list[str]) -> Path:
    """Train the backbone config once and return its weights; reused until the config changes."""
    cfg = build_config(raw, overrides)
    recipe = cfg.model_dump(mode="json", exclude={"device", "output"})
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{cfg.name}-{digest}"
    folder = cache_root() / "backbones"
    run_dir = folder / name
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("status") == "complete":
        return run_dir / MODEL_FILE
    cfg = build_config(raw, [*overrides, f"name={name}", f"output.dir={folder}"])
    train(cfg, force=True)
    return run_dir / MODEL_FILE


def _run_or_reuse(cfg: ExperimentConfig, fresh: bool) -> dict[str, Any]:
    """Train a study's run; unless `fresh`, a finished run of the same config is reused and an
    interrupted one resumed, so a stopped study picks up where it was."""
    run_dir = run_dir_of(cfg)
    saved = run_dir / CONFIG_FILE
    if not fresh and saved.is_file() and build_config(load_yaml(saved)) == cfg:
        metrics_path = run_dir / METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        if metrics.get("status") == "complete":
            return metrics
        if (run_dir / STATE_FILE).is_file():
            return resume(run_dir)
    return train(cfg, force=True)


def run_study(
    raw: dict[str, Any],
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    fresh: bool = False,
) -> Path:
    """Train every run of the study (overrides apply to each), then write its report; returns it.

    Finished runs with an unchanged config are reused unless `fresh`."""
    overrides = overrides or []
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    out_dir = Path(study.output) / study.study
    device_overrides = [o for o in overrides if o.startswith("device=")]
    pretrained = None
    if study.backbone is not None:
        pretrained = cached_backbone(study.backbone, device_overrides)
    results: dict[str, dict[str, Any]] = {}
    for label, spec in study.runs.items():
        if only and label not in only:
            continue
        merged = deep_merge(study.base, spec)
        merged = apply_overrides(merged, [f"name={label}", f"output.dir={out_dir}"])
        if pretrained is not None and not merged.get("model", {}).get("pretrained"):
            merged = apply_overrides(merged, [f"model.pretrained={pretrained}"])
        results[label] = _run_or_reuse(build_config(merged, overrides), fresh)
    return write_study_report(study, out_dir, results, backbone=pretrained)


def write_study_report(
    study: StudyConfig,
    out_dir: Path,
    results: dict[str, dict[str, Any]],
    backbone: Path | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(
        {label: m["history"] for label, m in results.items()},
        out_dir / "curves.png",
        title=study.title or study.study,
    )
    lines = [f"# {study.title or study.study}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    if backbone is not None:
        lines += [f"Backbone: pretrained once and cached (`{backbone.parent.name}`).", ""]
    # Rows are labelled by the study's run names, whatever name a reused run was saved under.
    rows = [{**metrics, "name": label} for label, metrics in results.items()]
    lines += [markdown_table(RUN_COLUMNS, rows)]
    lines += ["", "![training curves](curves.png)", ""]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    return report
