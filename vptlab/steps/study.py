"""A study: several runs sharing a base config (optionally on a cached pretrained backbone),
reported together as one Markdown table and one PNG of training curves; with `attacks:`, every
run is also attacked and a robust accuracy table and robust accuracy vs eps plots are added.

With `seeds: [0, 1, 2]` every run is trained once per seed (`<run>-s<seed>` folders, each
defended, detected and attacked as a single run is) and every number is reported as its mean ±
std over the seeds that finished, with their count n; the per-seed tables follow in an appendix."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vptlab.config import (
    AttackConfig,
    ChecksConfig,
    ExperimentConfig,
    Seeds,
    SelectConfig,
    apply_overrides,
    check_adaptive,
    load_yaml,
    recipe_changes,
    run_key,
)
from vptlab.defenses.detectors import DETECTORS
from vptlab.engine.distributed import is_main_process
from vptlab.errors import ConfigError, TrainingDiverged, format_validation_error
from vptlab.report.leaderboard import leaderboard_section, twin_label
from vptlab.report.plots import plot_curves, plot_robust_accuracy, seed_curve
from vptlab.report.tables import (
    BACKDOOR_COLUMNS,
    BACKDOOR_NOTE,
    DEFENSE_NOTE,
    DETECTION_COLUMNS,
    DETECTION_NOTE,
    RUN_COLUMNS,
    SUITE_NOTE,
    Column,
    Row,
    aggregate,
    at,
    defense_columns,
    finished,
    markdown_table,
    present,
    residual_asr,
    robust_columns,
    seed_columns,
    seed_rows,
    suite_columns,
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


class ReferenceFigures(BaseModel):
    """A published cell: CA, ASR and DER in % (None where not published)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ca: float | None = Field(None, ge=0, le=100)
    asr: float | None = Field(None, ge=0, le=100)
    der: float | None = Field(None, ge=0, le=100)


class Reference(BaseModel):
    """Published figures to set beside the study's leaderboard (vptlab/report/leaderboard.py):
    by run label, then by defense label (`none` for the undefended model)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str = Field(min_length=1, description="where the figures are published")
    cells: dict[str, dict[str, ReferenceFigures]] = Field(min_length=1)


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
    select: SelectConfig | None = Field(
        None, description="the one recipe-selection rule, applied alike to every defense "
        "(docs/defense_protocol.md)",
    )  # fmt: skip
    adaptive: bool | dict[str, Any] = Field(
        True, description="the adaptive attacker's residual ASR on every defended run: true "
        "(defenses/adaptive.py's defaults), false, or residual_asr options ({steps: 50, ...})",
    )  # fmt: skip
    detectors: list[str] = Field(
        default_factory=list, description="backdoor detectors (vptlab.defenses.detectors."
        "DETECTORS) run on every poisoned run (model detectors on the clean runs too)"
    )
    training_defenses: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="training-time defenses ({abl: {train: {objective: "
        "abl}}}): run-config fragments merged over every poisoned run, trained as "
        "<run>+<label> and reported as that run's defense",
    )  # fmt: skip
    reference: Reference | None = Field(
        None, description="published figures beside the leaderboard (BackdoorBench's)"
    )

    @field_validator("adaptive")
    @classmethod
    def _search_options(cls, adaptive: bool | dict[str, Any]) -> bool | dict[str, Any]:
        return check_adaptive(adaptive)

    seeds: Seeds | None = Field(
        None, description="train every run once per seed, in <run>-s<seed> "
        "folders, and report mean ± std over them"
    )

    def run_specs(self) -> dict[str, dict[str, Any]]:
        """Every run to train by label: the `runs`, then per poisoned run and training-time
        defense its twin `<run>+<defense>` (the run's spec with the defense's merged over it)."""
        specs = dict(self.runs)
        for label in self.poisoned_runs():
            for defense, fragment in self.training_defenses.items():
                specs[twin_label(label, defense)] = deep_merge(self.runs[label], fragment)
        return specs

    def poisoned_runs(self) -> list[str]:
        """The labels of the `runs` (not their twins) trained on a poisoned split."""
        merged = {label: deep_merge(self.base, spec) for label, spec in self.runs.items()}
        return [label for label, raw in merged.items()
                if (raw.get("data") or {}).get("poison") is not None]  # fmt: skip

    def run_names(self, label: str) -> dict[str, int | None]:
        """The folder of each seed of run `label` (`<label>-s<seed>`), or `label` alone (seed
        None: the run's own) without a seeds axis."""
        if self.seeds is None:
            return {label: None}
        return {f"{label}-s{seed}": seed for seed in self.seeds}


def _check_labels(study: StudyConfig) -> None:
    """Training-time defenses and repairs share the report's columns, so their labels must
    differ; a reference names runs and defenses of the study."""
    both = set(study.defenses) & set(study.training_defenses)
    if both:
        raise ConfigError(f"training_defenses.{sorted(both)[0]}: a repair defense has that "
                          "label too; rename one")  # fmt: skip
    if study.reference is None:
        return
    columns = {"none", *study.defenses, *study.training_defenses}
    for run, row in study.reference.cells.items():
        if run not in study.runs:
            raise ConfigError(f"reference.cells.{run}: not a run of the study")
        for defense in row:
            if defense not in columns:
                raise ConfigError(f"reference.cells.{run}.{defense}: not a defense of the study "
                                  f"(none, {', '.join(sorted(columns - {'none'}))})")  # fmt: skip


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
    _check_labels(study)
    out_dir = Path(study.output) / study.study
    device_overrides = [o for o in overrides if o.startswith("device=")]
    pretrained = None
    if study.backbone is not None:
        pretrained = backbone_path(study.backbone, device_overrides)
    # Every run's config (and every defense of it) is validated before anything trains: a bad
    # key in the last run must not be found after the first ones have run.
    if study.seeds is not None and any(o.startswith("seed=") for o in overrides):
        raise ConfigError("seed: the study's seeds axis sets each run's seed; "
                          "override seeds instead")  # fmt: skip
    # `only` names runs; a training-time defense's twin comes with its poisoned run.
    of_run = {twin_label(run, defense): run for run in study.poisoned_runs()
              for defense in study.training_defenses}  # fmt: skip
    configs = {
        name: _run_config(study, label, spec, out_dir, pretrained, overrides, name, seed)
        for label, spec in study.run_specs().items()
        if not only or of_run.get(label, label) in only or label in only
        for name, seed in study.run_names(label).items()
    }  # fmt: skip
    if study.backbone is not None:
        cached_backbone(study.backbone, device_overrides)
    with folder_lock(out_dir, "run"):
        return _run_all(study, configs, out_dir, fresh, pretrained)


def _run_all(study: StudyConfig, configs: dict[str, ExperimentConfig], out_dir: Path,
             fresh: bool, pretrained: Path | None) -> Path:  # fmt: skip
    """The study's runs, their attacks, defenses and detectors, then the report."""
    results: dict[str, dict[str, Any]] = {}
    twins = {name for label in study.run_specs() if label not in study.runs
             for name in study.run_names(label)}  # fmt: skip
    for label, cfg in configs.items():  # a label is a run's folder name (with its seed)
        results[label] = run_or_diverge(cfg, fresh)
        done = results[label].get("status") == "complete"
        if study.attacks and is_main_process() and done:
            results[label]["robustness"] = _robustness(cfg, study)
        if label in twins:  # a defense's own model: not defended or detected again
            continue
        if study.defenses and cfg.data.poison is not None:
            results[label]["defended"] = _defend_all(cfg, study, fresh)
        detectors = [name for name in study.detectors if cfg.data.poison is not None
                     or DETECTORS.meta(name).get("setting") == "model"]  # fmt: skip
        if detectors and done and is_main_process():
            results[label]["detection"] = _detect_all(cfg, detectors, fresh)
    if is_main_process():
        write_study_report(study, out_dir, results, backbone=pretrained)
    return out_dir / "report.md"


def _run_config(study: StudyConfig, label: str, spec: dict[str, Any], out_dir: Path,
                pretrained: Path | None, overrides: list[str], name: str | None = None,
                seed: int | None = None) -> ExperimentConfig:  # fmt: skip
    """Run `label`'s resolved config (in folder `name`, label by default, with `seed` where
    given), and its defenses' configs checked; errors name the run."""
    from vptlab.steps.defend import defended_config

    # A study names each run by its label: a `name` in the base or a run would be overridden
    # without a word, so it is refused; so is a `seed` beside the seeds axis.
    for where, section in (("base", study.base), (f"runs.{label}", spec)):
        if "name" in section:
            raise ConfigError(f"{where}.name: a study names its runs by their labels; remove it")
        if "seed" in section and study.seeds is not None:
            raise ConfigError(f"{where}.seed: the study's seeds axis sets each run's seed; "
                              "remove one of them")  # fmt: skip
    merged = deep_merge(study.base, spec)
    merged = apply_overrides(merged, [f"name={name or label}", f"output.dir={out_dir}"])
    if seed is not None:
        merged = apply_overrides(merged, [f"seed={seed}"])
    if pretrained is not None and _takes_backbone(merged, study.backbone or {}):
        merged = apply_overrides(merged, [f"model.pretrained={pretrained}"])
    try:
        cfg = resolved(merged, overrides)
    except ConfigError as error:
        raise ConfigError(f"runs.{label}: {error}") from None
    if cfg.data.poison is not None:
        for name, defense in study.defenses.items():
            try:
                defended_config(run_dir_of(cfg), cfg, _defense_spec(defense, study.select), [],
                                train=_defense_train(defense, cfg))  # fmt: skip
            except ConfigError as error:
                raise ConfigError(f"defenses.{name} (run {label}): {error}") from None
    return cfg


def _defense_spec(spec: StudyDefense, select: SelectConfig | None) -> dict[str, Any]:
    out = {"name": spec.name, "clean_fraction": spec.clean_fraction, "options": spec.options}
    return out if select is None else {**out, "select": select.model_dump()}


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
        defense = _defense_spec(spec, study.select)
        overrides = [f"name={cfg.name}-{label}", f"device={cfg.device}",
                     f"output.progress={str(cfg.output.progress).lower()}"]  # fmt: skip
        try:
            metrics = defend(run_dir_of(cfg), defense, overrides, train=_defense_train(spec, cfg),
                             fresh=fresh, adaptive=study.adaptive)
            out[label] = {k: metrics.get(k) for k in ("name", "defense", "history", "status")}
            if "residual" in metrics:  # an adaptive attacker's, where one was run
                out[label]["residual"] = metrics["residual"]
        except (ConfigError, TrainingDiverged) as error:
            print(f"vptlab: defense '{label}' of run '{cfg.name}' failed: {error}",
                  file=sys.stderr)  # fmt: skip
            out[label] = {"name": f"{cfg.name}-{label}", "status": "failed", "error": str(error)}
    return out


def _detect_all(cfg: ExperimentConfig, detectors: Sequence[str], fresh: bool) -> dict[str, Any]:
    """`detectors` on one finished run, read back from its detection.json when it already holds
    them (unless `fresh`)."""
    from vptlab.steps.detect import DETECTION_FILE, detect_run

    run_dir = run_dir_of(cfg)
    path = run_dir / DETECTION_FILE
    saved = json.loads(path.read_text()) if path.is_file() and not fresh else {}
    out: dict[str, Any] = {}
    for name in detectors:
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
    """report.md, curves.png (and robustness plots) and results.json of a study's `results` (the
    metrics of each run folder); with a seeds axis every table is over each run's seeds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = Tables(seeded=study.seeds is not None)
    where = {name: (label, seed) for label in study.run_specs()
             for name, seed in study.run_names(label).items()}  # fmt: skip
    labelled = {name: {"label": where[name][0], "seed": where[name][1], **metrics}
                if name in where else metrics for name, metrics in results.items()}  # fmt: skip
    if tables.seeded:  # each seed's row says which run and seed it is (results.json too)
        results = labelled
    plot_curves(_curves(results, tables.seeded), out_dir / "curves.png",
                title=study.title or study.study)  # fmt: skip
    lines = [f"# {study.title or study.study}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    if backbone is not None:
        lines += [f"Backbone: pretrained once and cached (`{backbone.parent.name}`).", ""]
    if tables.seeded:
        seeds = ", ".join(map(str, study.seeds or []))
        lines += [f"Seeds: {seeds}. Each number is the mean ± sample std over the seeds that "
                  "finished (n); the per-seed tables are in the appendix.", ""]  # fmt: skip
    # Rows are labelled by the study's run names, whatever name a reused run was saved under.
    rows = [{**metrics, **_names(name, metrics)} for name, metrics in results.items()]
    lines += [tables.table("Runs", RUN_COLUMNS, rows, RUN_AVERAGED)]
    lines += ["", "![training curves](curves.png)", ""]
    poisoned = [row for row in rows if "backdoor" in row]
    if poisoned:
        table = tables.table("Backdoor", BACKDOOR_COLUMNS, poisoned, BACKDOOR_AVERAGED)
        lines += ["## Backdoor", "", table, "", BACKDOOR_NOTE, ""]
    if any("defended" in m for m in results.values()):
        lines += defense_section(results, tables)
    if any("detection" in m for m in results.values()):
        lines += detection_section(results, tables)
        lines += model_detection_section(labelled, study.detectors)
    if study.defenses or study.training_defenses:
        ran = {m.get("label") for m in labelled.values()}
        lines += leaderboard_section(
            labelled, [r for r in study.poisoned_runs() if r in ran], list(study.defenses),
            list(study.training_defenses),
            None if study.reference is None else study.reference.model_dump(),
        )
    if study.attacks:
        lines += robustness_section(out_dir, results, tables)
    if tables.appendix:
        lines += ["## Appendix: per-seed results", "", "<details>",
                  "<summary>every seed's run, as trained</summary>", "", *tables.appendix,
                  "</details>", ""]  # fmt: skip
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    return report


# The numbers a table over seeds gives as mean ± std (by column title); the others are shared
# by a run's seeds (its model, its trigger) or listed (its seeds' statuses).
RUN_AVERAGED = ("top-1", "top-5", "s / epoch", "wall s")
BACKDOOR_AVERAGED = ("CA %", "ASR %", "RA %")
DEFENSE_AVERAGED = ("CA before %", "CA after %", "ASR before %", "ASR after %", "RA after %",
                    "ASR drop", "DER", "residual ASR %")  # fmt: skip
DETECTION_AVERAGED = ("STRIP AUROC", "spectral precision %", "spectral recall %",
                      "spectral flagged", "AC precision %", "AC recall %", "AC flagged",
                      "NC anomaly index")  # fmt: skip


@dataclass
class Tables:
    """How a study draws its tables: one row per run, or with a seeds axis (`seeded`) one row per
    run over its seeds, each per-seed table kept for the report's `appendix`."""

    seeded: bool = False
    appendix: list[str] = field(default_factory=list)

    def table(self, title: str, columns: Sequence[Column], rows: Sequence[Row],
              averaged: Collection[str],
              key: Callable[[Row], Hashable] | None = None) -> str:  # fmt: skip
        """Rows (a row's `name` is its run label, `run` its folder) as a Markdown table; seeded,
        the rows sharing `key` (by default their `name`) are one row of means (`averaged`
        columns) over the seeds."""
        if not self.seeded:
            return markdown_table(columns, rows)
        per_seed = [{**row, "name": row["run"]} for row in rows]
        self.appendix += [f"### {title}", "", markdown_table(columns, per_seed), ""]
        return markdown_table(seed_columns(columns, averaged), seed_rows(rows, key))


def _names(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's names in a table row: `name` its study label, `run` its folder."""
    return {"name": metrics.get("label", name), "run": name}


def _curves(results: dict[str, dict[str, Any]], seeded: bool) -> dict[str, list[dict[str, Any]]]:
    """The training history per run label; seeded, the mean (and std) over its finished seeds
    (all of them where none finished)."""
    if not seeded:
        return {label: m.get("history", []) for label, m in results.items()}
    runs: dict[str, list[dict[str, Any]]] = {}
    for metrics in results.values():
        runs.setdefault(metrics["label"], []).append(metrics)
    return {label: seed_curve([m.get("history", []) for m in
                               [m for m in group if finished_run(m)] or group])
            for label, group in runs.items()}  # fmt: skip


def finished_run(metrics: dict[str, Any]) -> bool:
    return metrics.get("status") == "complete"


def defense_section(results: dict[str, dict[str, Any]], tables: Tables | None = None) -> list[str]:
    """Every defense against every poisoned run: CA and ASR before and after, RA, ASR drop, DER
    (and the residual ASR where measured); a defense that failed is listed with its error. Over
    several poisoned runs, a summary of each defense over the trigger suite follows."""
    tables = tables or Tables()
    rows, failed = [], []
    for name, metrics in results.items():
        for defense, result in metrics.get("defended", {}).items():
            if result.get("status") == "failed":
                failed.append(f"- `{name}` / `{defense}`: {result['error']}")
            else:
                rows.append({**result, **_names(name, metrics),
                             "defense": {**result["defense"], "name": defense}})  # fmt: skip
    table = tables.table("Backdoor defenses", defense_columns(rows), rows, DEFENSE_AVERAGED,
                         key=lambda row: (row["name"], row["defense"]["name"]))  # fmt: skip
    lines = ["## Backdoor defenses", "", table, "", DEFENSE_NOTE, ""]
    if failed:
        lines += ["Failed defenses:", "", *failed, ""]
    suite = suite_rows(rows)
    if len({row["name"] for row in rows}) > 1:
        lines += ["## Defenses over the trigger suite", "",
                  markdown_table(suite_columns(suite), suite), "", SUITE_NOTE, ""]  # fmt: skip
    return lines


def suite_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per defense, over the poisoned runs it finished on (each run its mean over seeds): mean
    and worst ASR after, mean CA cost (CA before - CA after), mean DER, the number of runs, and
    mean and worst residual ASR where measured."""
    per_run: dict[str, dict[str, list[Row]]] = {}
    for row in rows:
        if finished(row):
            per_run.setdefault(row["defense"]["name"], {}).setdefault(row["name"], []).append(row)
    out = []
    for defense, runs in per_run.items():
        means: dict[str, list[float]] = {"asr_after": [], "ca_cost": [], "der": [],
                                         "residual_asr": []}  # fmt: skip
        for seeds in runs.values():
            for key, value in _suite_values(seeds).items():
                if value is not None:
                    means[key].append(value)
        summary: dict[str, Any] = {"defense": defense, "triggers": len(runs)}
        for key, values in means.items():
            stat = aggregate(values)
            summary[key] = {} if stat is None else {"mean": stat.mean, "worst": max(values)}
        out.append(summary)
    return out


def _suite_values(seeds: Sequence[Row]) -> dict[str, float | None]:
    """One poisoned run's defense numbers, each its mean over the run's seeds."""

    def mean(value: Callable[[Row], Any]) -> float | None:
        stat = aggregate(value(row) for row in seeds)
        return None if stat is None else stat.mean

    def ca_cost(row: Row) -> Any:
        before, after = at("defense", "ca_before")(row), at("defense", "ca_after")(row)
        return None if before is None or after is None else before - after

    return {"asr_after": mean(at("defense", "asr_after")), "ca_cost": mean(ca_cost),
            "der": mean(at("defense", "der")), "residual_asr": mean(residual_asr)}  # fmt: skip


def model_detection_section(results: dict[str, dict[str, Any]],
                            detectors: Sequence[str]) -> list[str]:  # fmt: skip
    """Each model detector over the study's models (every seed's run one model; training-time
    defenses' runs left out): AUROC of its score, backdoored against clean models, and the
    shares its verdict flags (`steps.detect.model_detection`)."""
    from vptlab.steps.detect import model_detection

    rows = []
    for name in detectors:
        score = DETECTORS.meta(name).get("score")
        if DETECTORS.meta(name).get("setting") != "model" or score is None:
            continue
        verdicts = [m["detection"][name] for m in results.values()
                    if name in (m.get("detection") or {})]  # fmt: skip
        judged = model_detection(verdicts, score)
        if judged is not None:
            rows.append(f"| {name} | {score} | {judged['auroc']:.3f} | "
                        f"{judged['backdoored_models']} | {judged['clean_models']} | "
                        f"{judged['tpr']:.1f} | {judged['fpr']:.1f} |")  # fmt: skip
    if not rows:
        return []
    return ["## Model-level detection", "",
            "| detector | score | AUROC | backdoored models | clean models | flagged backdoored "
            "% | flagged clean % |", "|---|---|---:|---:|---:|---:|---:|", *rows, "",
            "Every run (each seed) is one model: the poisoned runs are the positives, the clean "
            "runs the negatives. AUROC: the chance that a backdoored model scores above a clean "
            "one (0.5 is chance); flagged: the share of each kind the detector's own verdict "
            "calls backdoored (its threshold, not tuned here).", ""]  # fmt: skip


def detection_section(results: dict[str, dict[str, Any]],
                      tables: Tables | None = None) -> list[str]:  # fmt: skip
    """Each poisoned run's detection: STRIP AUROC, spectral-signature and activation-clustering
    precision / recall, NC's anomaly index (a detector no run has: no column)."""
    tables = tables or Tables()
    rows = [{**_names(name, m), "detection": m["detection"]} for name, m in results.items()
            if "detection" in m]  # fmt: skip
    columns = present(DETECTION_COLUMNS, rows)
    table = tables.table("Backdoor detection", columns, rows, DETECTION_AVERAGED)
    return ["## Backdoor detection", "", table, "", DETECTION_NOTE, ""]


def robustness_section(out_dir: Path, results: dict[str, dict[str, Any]],
                       tables: Tables | None = None) -> list[str]:  # fmt: skip
    """Robust top-1 per run (rows) and attack (columns), a number that failed a sanity check
    marked and its reasons below, and per attack family a plot of robust accuracy vs eps with one
    line per run (seeded: its mean with ± std error bars); runs without results show n/a."""
    tables = tables or Tables()
    attacked = {name: m["robustness"] for name, m in results.items() if "robustness" in m}
    names: list[str] = []
    for result in attacked.values():
        names += [a["metric"] for a in result["attacks"] if a["metric"] not in names]
    rows = [{**_names(name, m), **{k: m[k] for k in ("status",) if k in m},
             "robustness": m.get("robustness", {}).get("metrics", {}),
             "unreliable": m.get("robustness", {}).get("unreliable", {})}
            for name, m in results.items()]  # fmt: skip
    columns = robust_columns(names)
    table = tables.table("Robustness", columns, rows, [c.title for c in columns[1:]])
    lines = ["## Robustness", "", table, ""]
    where = "run" if tables.seeded else "name"  # a seed's number is flagged by its folder
    notes = unreliable_notes((row[where], metric, reasons) for row in rows
                             for metric, reasons in row["unreliable"].items())  # fmt: skip
    if notes:
        lines += ["\n".join(f"- {note}" for note in notes), ""]
    plots: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    for name, result in attacked.items():
        label = _names(name, results[name])["name"]
        for family, points in families(result).items():
            plots.setdefault(family, {}).setdefault(label, []).append(points)
    for family, lines_per_run in plots.items():
        name = f"robustness-{family}.png"
        points = {label: _seed_points(seeds) if tables.seeded else seeds[0]
                  for label, seeds in lines_per_run.items()}  # fmt: skip
        plot_robust_accuracy(points, out_dir / name, title=f"robust accuracy: {family}")
        lines += [f"![robust accuracy vs eps, {family}]({name})", ""]
    return lines


def _seed_points(seeds: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, ...]]:
    """Robust accuracy vs eps over a run's seeds: (eps, mean, std) per eps (std 0 from one)."""
    by_eps: dict[float, list[float]] = {}
    for points in seeds:
        for eps, acc in points:
            by_eps.setdefault(eps, []).append(acc)
    out = []
    for eps, accs in sorted(by_eps.items()):
        stat = aggregate(accs)
        assert stat is not None
        out.append((eps, stat.mean, stat.std or 0.0))
    return out
