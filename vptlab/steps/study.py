"""A study: several runs sharing a base config (optionally on a cached pretrained backbone),
reported together as one Markdown table and one PNG of training curves; with `attacks:`, every
run is also attacked and a robust accuracy table and robust accuracy vs eps plots are added."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vptlab.config import (
    AttackConfig,
    ChecksConfig,
    ExperimentConfig,
    apply_overrides,
    load_yaml,
    recipe_changes,
    run_key,
)
from vptlab.defenses.detectors import DETECTORS
from vptlab.engine.distributed import is_main_process
from vptlab.errors import ConfigError, TrainingDiverged, format_validation_error
from vptlab.report.plots import plot_curves, plot_robust_accuracy
from vptlab.report.tables import (
    BACKDOOR_COLUMNS,
    BACKDOOR_NOTE,
    DEFENSE_COLUMNS,
    DEFENSE_NOTE,
    DETECTION_COLUMNS,
    DETECTION_NOTE,
    RUN_COLUMNS,
    markdown_table,
    robust_columns,
    unreliable_notes,
)
from vptlab.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    atomic_write_text,
    folder_lock,
)
from vptlab.steps.attack import (
    ROBUSTNESS_FILE,
    attack_run,
    build_attack,
    families,
    is_current,
)
from vptlab.steps.resolve import resolved
from vptlab.steps.train import resume, run_dir_of, train


class StudyDefense(BaseModel):
    """A backdoor defense applied to every poisoned run of a study (`vptlab defend`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    clean_fraction: float = Field(0.05, gt=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(
        default_factory=dict, description="the defense's recipe over vptlab defend's default"
    )
    train_by_model: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="recipe changes for runs of one model (a ViT needs gentler steps than a CNN)",
    )


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    study: str
    title: str = ""
    description: str = ""
    output: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict)
    backbone: dict[str, Any] | None = Field(
        None, description="a run config trained once and cached; the runs start from its weights"
    )
    runs: dict[str, dict[str, Any]] = Field(min_length=1)
    attacks: list[AttackConfig] = Field(
        default_factory=list, description="evaluated on every finished run (robustness.json)"
    )
    attack_limit: int | None = Field(None, gt=0, description="attack the first N test samples")
    checks: ChecksConfig = Field(
        default_factory=ChecksConfig, description="sanity checks on every run's robustness numbers"
    )
    defenses: dict[str, StudyDefense] = Field(
        default_factory=dict, description="applied to every poisoned run: <run>-<label> folders"
    )
    detectors: list[str] = Field(
        default_factory=list, description="backdoor detectors (vptlab.defenses.detectors."
        "DETECTORS) run on every poisoned run"
    )


def is_study(raw: dict[str, Any]) -> bool:
    return "runs" in raw


def deep_merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    """`update` merged over `base`, mappings key by key. A mapping over a value that is not one
    (`model: 5` in a base under a `model: {...}` entry) is an error naming the key: merged
    away, the bad value would never be checked."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        here = f"{path}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, f"{here}.")
        elif isinstance(value, dict) and out.get(key) is not None:
            raise ConfigError(f"{here}: expected a mapping, got {out[key]!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("VPTLAB_CACHE", Path.home() / ".cache" / "vptlab"))


def backbone_config(raw: dict[str, Any], overrides: list[str]) -> ExperimentConfig:
    """The backbone's run config, in the cache folder named by its run key (so a changed recipe
    trains into a new folder and never touches the old one). Validates it; trains nothing.
    Errors name the key under `backbone`."""
    try:
        cfg = resolved(raw, overrides)
    except ConfigError as error:
        raise ConfigError(f"backbone: {error}") from None
    folder = cache_root() / "backbones"
    name = f"{cfg.name}-{run_key(cfg)}"
    return resolved(raw, [*overrides, f"name={name}", f"output.dir={folder}"])


def backbone_path(raw: dict[str, Any], overrides: list[str]) -> Path:
    """Where the cached backbone's weights are (or will be), without training it."""
    return run_dir_of(backbone_config(raw, overrides)) / MODEL_FILE


def cached_backbone(raw: dict[str, Any], overrides: list[str]) -> Path:
    """Train the backbone config once and return its weights; reused while its run key holds."""
    cfg = backbone_config(raw, overrides)
    run_or_reuse(cfg, fresh=False)
    return run_dir_of(cfg) / MODEL_FILE


def _saved_config(run_dir: Path) -> tuple[ExperimentConfig | None, str]:
    """The run folder's resolved config, or None and why not."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None, f"has no {CONFIG_FILE}"
    try:
        return resolved(load_yaml(path)), ""
    except ConfigError as err:  # written by an older vptlab, or edited by hand
        return None, f"its {CONFIG_FILE} no longer loads ({err})"


def run_or_reuse(cfg: ExperimentConfig, fresh: bool) -> dict[str, Any]:
    """Train a run unless its folder already stands for it: a finished run with the same run key
    is reused and an interrupted one resumed, so a stopped study picks up where it was. Keys
    such as `device` or `output.*` are not in the run key (see `config.NOT_IN_RUN_KEY`).

    A finished run is only ever replaced when `fresh`: if its key changed, this is an error that
    says so. An interrupted run with a changed key holds nothing finished and is trained anew."""
    run_dir = run_dir_of(cfg)
    if fresh:
        return train(cfg, force=True)
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    finished = metrics.get("status") == "complete"
    saved, why = _saved_config(run_dir)
    if saved is not None and run_key(saved) == run_key(cfg):
        if finished or metrics.get("status") == "diverged":
            return metrics  # a diverged run would diverge again: reported, retrained by --fresh
        if (run_dir / STATE_FILE).is_file():
            # The device is not in the run key: an interrupted GPU run may go on on the CPU.
            return resume(run_dir, [f"device={cfg.device}"])
        return train(cfg, force=True)
    if finished:
        if saved is not None:
            changes = recipe_changes(saved, cfg)
            why = "its config changed (" + "; ".join(changes[:3])
            why += f"; and {len(changes) - 3} more)" if len(changes) > 3 else ")"
        raise ConfigError(
            f"run '{cfg.name}' in {run_dir} is finished but {why}; "
            "pass --fresh to retrain it, or give the changed run another name"
        )
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
    for i, attack in enumerate(study.attacks):  # options checked before anything trains
        build_attack(attack, where=f"attacks.{i}")
    for i, name in enumerate(study.detectors):
        DETECTORS.require(name, f"detectors.{i}")
    out_dir = Path(study.output) / study.study
    device_overrides = [o for o in overrides if o.startswith("device=")]
    pretrained = None
    if study.backbone is not None:
        pretrained = backbone_path(study.backbone, device_overrides)
    # Every run's config (and every defense of it) is validated before anything trains: a bad
    # key in the last run must not be found after the first ones have run.
    configs = {
        label: _run_config(study, label, spec, out_dir, pretrained, overrides)
        for label, spec in study.runs.items() if not only or label in only
    }  # fmt: skip
    if study.backbone is not None:
        cached_backbone(study.backbone, device_overrides)
    with folder_lock(out_dir, "run"):
        return _run_all(study, configs, out_dir, fresh, pretrained)


def _run_all(study: StudyConfig, configs: dict[str, ExperimentConfig], out_dir: Path,
             fresh: bool, pretrained: Path | None) -> Path:  # fmt: skip
    """The study's runs, their attacks, defenses and detectors, then the report."""
    results: dict[str, dict[str, Any]] = {}
    for label, cfg in configs.items():
        results[label] = run_or_diverge(cfg, fresh)
        if study.attacks and is_main_process() and results[label].get("status") == "complete":
            results[label]["robustness"] = _robustness(cfg, study)
        if study.defenses and cfg.data.poison is not None:
            results[label]["defended"] = _defend_all(cfg, study, fresh)
        if study.detectors and cfg.data.poison is not None and is_main_process():
            results[label]["detection"] = _detect_all(cfg, study, fresh)
    if is_main_process():
        write_study_report(study, out_dir, results, backbone=pretrained)
    return out_dir / "report.md"


def _run_config(study: StudyConfig, label: str, spec: dict[str, Any], out_dir: Path,
                pretrained: Path | None, overrides: list[str]) -> ExperimentConfig:  # fmt: skip
    """Run `label`'s resolved config, and its defenses' configs checked; errors name the run."""
    from vptlab.steps.defend import defended_config

    # A study names each run by its label: a `name` in the base or a run would be overridden
    # without a word, so it is refused.
    for where, section in (("base", study.base), (f"runs.{label}", spec)):
        if "name" in section:
            raise ConfigError(f"{where}.name: a study names its runs by their labels; remove it")
    merged = deep_merge(study.base, spec)
    merged = apply_overrides(merged, [f"name={label}", f"output.dir={out_dir}"])
    if pretrained is not None and _takes_backbone(merged, study.backbone or {}):
        merged = apply_overrides(merged, [f"model.pretrained={pretrained}"])
    try:
        cfg = resolved(merged, overrides)
    except ConfigError as error:
        raise ConfigError(f"runs.{label}: {error}") from None
    if cfg.data.poison is not None:
        for name, defense in study.defenses.items():
            try:
                defended_config(run_dir_of(cfg), cfg, _defense_spec(defense), [],
                                train=_defense_train(defense, cfg))  # fmt: skip
            except ConfigError as error:
                raise ConfigError(f"defenses.{name} (run {label}): {error}") from None
    return cfg


def _defense_spec(spec: StudyDefense) -> dict[str, Any]:
    return {"name": spec.name, "clean_fraction": spec.clean_fraction, "options": spec.options}


def _defense_train(spec: StudyDefense, cfg: ExperimentConfig) -> dict[str, Any]:
    return {**spec.train, **spec.train_by_model.get(cfg.model.name, {})}


def _robustness(cfg: ExperimentConfig, study: StudyConfig) -> dict[str, Any]:
    """The run's robustness.json, evaluated unless it holds these attacks on these weights."""
    run_dir = run_dir_of(cfg)
    if is_current(run_dir, study.attacks, study.attack_limit, study.checks):
        return json.loads((run_dir / ROBUSTNESS_FILE).read_text())
    return attack_run(
        run_dir, study.attacks, device=cfg.device, limit=study.attack_limit,
        progress=cfg.output.progress, checks=study.checks,
    )  # fmt: skip


def _takes_backbone(run: dict[str, Any], backbone: dict[str, Any]) -> bool:
    """A run starts from the study's cached backbone unless it names its own `model.pretrained`
    (false included) or is another architecture (a study may mix a CNN with a prompted ViT)."""
    model, default = run.get("model", {}), ExperimentConfig().model.name
    same = model.get("name", default) == backbone.get("model", {}).get("name", default)
    return same and "pretrained" not in model


def _defend_all(cfg: ExperimentConfig, study: StudyConfig, fresh: bool) -> dict[str, Any]:
    """Every defense of the study on one poisoned run: its defended metrics by defense label,
    or the one-line error of a defense that failed (the study goes on)."""
    from vptlab.steps.defend import defend

    out: dict[str, Any] = {}
    for label, spec in study.defenses.items():
        defense = _defense_spec(spec)
        overrides = [f"name={cfg.name}-{label}", f"device={cfg.device}",
                     f"output.progress={str(cfg.output.progress).lower()}"]  # fmt: skip
        try:
            metrics = defend(run_dir_of(cfg), defense, overrides, train=_defense_train(spec, cfg),
                             fresh=fresh)
            out[label] = {k: metrics.get(k) for k in ("name", "defense", "history", "status")}
        except (ConfigError, TrainingDiverged) as error:
            print(f"vptlab: defense '{label}' of run '{cfg.name}' failed: {error}",
                  file=sys.stderr)  # fmt: skip
            out[label] = {"name": f"{cfg.name}-{label}", "status": "failed", "error": str(error)}
    return out


def _detect_all(cfg: ExperimentConfig, study: StudyConfig, fresh: bool) -> dict[str, Any]:
    """The study's detectors on one finished poisoned run, read back from its detection.json
    when it already holds them (unless `fresh`)."""
    from vptlab.steps.detect import DETECTION_FILE, detect_run

    run_dir = run_dir_of(cfg)
    path = run_dir / DETECTION_FILE
    saved = json.loads(path.read_text()) if path.is_file() and not fresh else {}
    out: dict[str, Any] = {}
    for name in study.detectors:
        out[name] = saved.get(name) or detect_run(run_dir, name, device=cfg.device)
    return out


def run_or_diverge(cfg: ExperimentConfig, fresh: bool) -> dict[str, Any]:
    """One run of a study; a run that diverges is recorded as such and the study goes on."""
    try:
        return run_or_reuse(cfg, fresh)
    except TrainingDiverged as error:
        metrics_path = run_dir_of(cfg) / METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        print(f"vptlab: run '{cfg.name}' diverged: {error}", file=sys.stderr)
        return {"name": cfg.name, "status": "diverged", "error": str(error), **metrics}


def write_study_report(
    study: StudyConfig,
    out_dir: Path,
    results: dict[str, dict[str, Any]],
    backbone: Path | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(
        {label: m.get("history", []) for label, m in results.items()},
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
    poisoned = [row for row in rows if "backdoor" in row]
    if poisoned:
        table = markdown_table(BACKDOOR_COLUMNS, poisoned)
        lines += ["## Backdoor", "", table, "", BACKDOOR_NOTE, ""]
    if any("defended" in m for m in results.values()):
        lines += defense_section(results)
    if any("detection" in m for m in results.values()):
        lines += detection_section(results)
    if study.attacks:
        lines += robustness_section(out_dir, results)
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    return report


def defense_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every defense against every poisoned run: CA and ASR before and after, RA, ASR drop, DER;
    a defense that failed is listed with its error."""
    rows, failed = [], []
    for label, metrics in results.items():
        for defense, result in metrics.get("defended", {}).items():
            if result.get("status") == "failed":
                failed.append(f"- `{label}` / `{defense}`: {result['error']}")
            else:
                rows.append({**result, "name": label, "defense": {**result["defense"],
                                                                  "name": defense}})  # fmt: skip
    lines = ["## Backdoor defenses", "", markdown_table(DEFENSE_COLUMNS, rows), "", DEFENSE_NOTE,
             ""]  # fmt: skip
    if failed:
        lines += ["Failed defenses:", "", *failed, ""]
    return lines


def detection_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """STRIP AUROC and spectral-signature precision / recall of each poisoned run."""
    rows = [{"name": label, "detection": m["detection"]} for label, m in results.items()
            if "detection" in m]  # fmt: skip
    lines = ["## Backdoor detection", "", markdown_table(DETECTION_COLUMNS, rows), "",
             DETECTION_NOTE, ""]  # fmt: skip
    return lines


def robustness_section(out_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
    """Robust top-1 per run (rows) and attack (columns), a number that failed a sanity check
    marked and its reasons below, and per attack family a plot of robust accuracy vs eps with one
    line per run; runs without results show n/a."""
    attacked = {label: m["robustness"] for label, m in results.items() if "robustness" in m}
    names: list[str] = []
    for result in attacked.values():
        names += [a["metric"] for a in result["attacks"] if a["metric"] not in names]
    rows = [{"name": label, "robustness": m.get("robustness", {}).get("metrics", {}),
             "unreliable": m.get("robustness", {}).get("unreliable", {})}
            for label, m in results.items()]  # fmt: skip
    lines = ["## Robustness", "", markdown_table(robust_columns(names), rows), ""]
    notes = unreliable_notes((row["name"], metric, reasons) for row in rows
                             for metric, reasons in row["unreliable"].items())  # fmt: skip
    if notes:
        lines += ["\n".join(f"- {note}" for note in notes), ""]
    plots: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, result in attacked.items():
        for family, points in families(result).items():
            plots.setdefault(family, {})[label] = points
    for family, lines_per_run in plots.items():
        name = f"robustness-{family}.png"
        plot_robust_accuracy(lines_per_run, out_dir / name, title=f"robust accuracy: {family}")
        lines += [f"![robust accuracy vs eps, {family}]({name})", ""]
    return lines
