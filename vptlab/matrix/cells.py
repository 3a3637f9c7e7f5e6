"""Planning the threat matrix: every (model, adaptation, threat, defense) becomes a cell, a chain
of steps (train, maybe poisoned or adversarial -> maybe defend -> evaluate), or a skipped cell with
the reason its combination makes no sense.

Steps and cells are content-addressed (shared/DESIGN.md): a training step's folder is named by its
run key, so cells that train the same thing (a clean run evaluated clean and under PGD) share it;
a cell's folder carries the hash of its whole chain, so a changed cell lands in a new folder and a
finished one is found again. Nothing is trained here.

With a seeds axis every cell is planned once per seed: its id gets a seed level
(`simplenet/full/clean/none/s0`), its training run and its folder a `-s<seed>` suffix
(`simplenet-full-<key>-s0`, where `<key>` is the run key of the recipe without the seed, so a
run's seeds share their stem as a study's do). The seed is in each run's key, so each seed's run
is reused or resumed on its own. Without the axis, names and ids are as they always were.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vptlab.config import ExperimentConfig, apply_overrides, run_key
from vptlab.errors import ConfigError
from vptlab.matrix.config import TRAINING_KINDS, DefenseSpec, MatrixConfig, ThreatSpec
from vptlab.steps.attack import build_attack
from vptlab.steps.resolve import resolved
from vptlab.steps.study import deep_merge

RUNS = "runs"  # training and defended runs, shared by the cells
CELLS = "cells"  # one folder per cell: its evaluation, grids and cell.json
PLAN_FILE = "matrix.json"


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: its labels, and either its chain or why it is skipped.

    `train` is the training step's resolved config (a dict, so a cell pickles to a Ray worker);
    `defend` is the repair step ({defense, train, name}) or None; `folder` is the cell's own."""

    model: str
    adaptation: str
    threat: str
    defense: str
    threat_spec: ThreatSpec
    defense_spec: DefenseSpec
    skip: str | None = None
    seed: int | None = None
    train: dict[str, Any] | None = None
    defend: dict[str, Any] | None = None
    key: str = ""
    folder: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        labels = (self.model, self.adaptation, self.threat, self.defense)
        return "/".join(labels if self.seed is None else (*labels, f"s{self.seed}"))

    @property
    def train_dir(self) -> Path:
        assert self.train is not None
        return Path(self.train["output"]["dir"]) / self.train["name"]

    def summary(self) -> dict[str, Any]:
        """What the plan file says of the cell (the report's skipped and pending rows); its
        `seed` only where the matrix has a seeds axis."""
        summary = {
            "id": self.id, "model": self.model, "adaptation": self.adaptation,
            "threat": self.threat, "threat_kind": self.threat_spec.kind,
            "defense": self.defense, "defense_kind": self.defense_spec.kind,
            "skip": self.skip, "key": self.key, "folder": self.folder,
            "train_run": self.train["name"] if self.train else None,
        }  # fmt: skip
        return summary if self.seed is None else {**summary, "seed": self.seed}


def digest(value: Any, size: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def plan(matrix: MatrixConfig, overrides: list[str] | None = None,
         backbones: dict[str, Path] | None = None) -> list[Cell]:  # fmt: skip
    """Every cell of the matrix, in axis order (models, adaptations, threats, defenses).

    `overrides` (key=value) apply to every training step; `backbones` maps an adaptation label to
    its cached backbone's weights. A fragment that does not validate is a ConfigError naming its
    axis entry; a combination that makes no sense is a skipped cell. With a seeds axis each cell
    comes once per seed, its seeds one after another; a `seed=` override is then refused."""
    overrides = overrides or []
    if matrix.seeds is not None and any(o.startswith("seed=") for o in overrides):
        raise ConfigError("seed: the matrix's seeds axis sets each run's seed; "
                          "override seeds instead")  # fmt: skip
    out = Path(matrix.output) / matrix.matrix
    for name, spec in matrix.threats.items():  # attack options checked before anything trains
        for i, attack in enumerate(spec.attacks):
            build_attack(attack, where=f"threats.{name}.attacks.{i}")
    cells = []
    for model in matrix.models:
        for adaptation in matrix.adaptations:
            for threat, threat_spec in matrix.threats.items():
                for defense, defense_spec in matrix.defenses.items():
                    for seed in matrix.seeds or [None]:
                        cell = Cell(model, adaptation, threat, defense, threat_spec,
                                    defense_spec, seed=seed)  # fmt: skip
                        cells.append(_resolve(cell, matrix, out, overrides, backbones or {}))
    return cells


def _resolve(cell: Cell, matrix: MatrixConfig, out: Path, overrides: list[str],
             backbones: dict[str, Path]) -> Cell:  # fmt: skip
    threat, defense = cell.threat_spec, cell.defense_spec
    if threat.kind not in defense.threat_kinds:
        return _skipped(cell, f"defense '{cell.defense}' ({defense.kind}) answers "
                        f"{' / '.join(defense.threat_kinds)} threats; '{cell.threat}' is "
                        f"{threat.kind}")  # fmt: skip
    cfg = _train_config(cell, matrix, out, overrides, backbones)
    reason = _nonsense(cfg)
    if reason is not None:
        return _skipped(cell, reason)
    train = cfg.model_dump(mode="json")
    defend = None
    if defense.kind == "repair":
        refusal = _repair_refusal(cfg, defense)
        if refusal is not None:
            return _skipped(cell, refusal)
        spec = {"name": defense.name, "clean_fraction": defense.clean_fraction,
                "options": defense.options}  # fmt: skip
        recipe = defense.train_for(cell.model)
        name = f"{cfg.name}-{cell.defense}-{digest([spec, recipe], 8)}"
        _check_defended(cell, cfg, spec, recipe, name, out)
        defend = {"defense": spec, "train": recipe, "name": name}
    evaluation = matrix.evaluation.model_dump(mode="json")
    if threat.kind != "evasion":
        # Only attacks are checked: other cells keep their key (and their finished results).
        evaluation.pop("checks")
    if defend is None:  # only repairs meet the adaptive attacker
        evaluation.pop("adaptive")
    chain = {
        "train": run_key(cfg),
        "defend": defend and {k: defend[k] for k in ("defense", "train")},
        "threat": threat.model_dump(mode="json"),
        "evaluation": evaluation,
    }
    key = digest(chain)
    name = f"{cell.model}-{cell.adaptation}-{cell.threat}-{cell.defense}-{key}"
    folder = str(out / CELLS / (name + seed_suffix(cell.seed)))
    return Cell(cell.model, cell.adaptation, cell.threat, cell.defense, threat, defense,
                seed=cell.seed, train=train, defend=defend, key=key, folder=folder,
                evaluation=evaluation)  # fmt: skip


def seed_suffix(seed: int | None) -> str:
    """`-s<seed>`, the end of a seeded run's or cell's folder name; nothing without a seed."""
    return "" if seed is None else f"-s{seed}"


def _check_defended(cell: Cell, cfg: ExperimentConfig, spec: dict[str, Any],
                    recipe: dict[str, Any], name: str, out: Path) -> None:  # fmt: skip
    """The repair step's config built as `vptlab defend` will build it, so a bad defense name,
    option or recipe key fails at planning (naming the defense), not after training."""
    from vptlab.steps.defend import defended_config

    parent = out / RUNS / cfg.name
    try:
        defended_config(parent, cfg, spec, [f"name={name}"], train=recipe)
    except ConfigError as error:
        raise ConfigError(f"defenses.{cell.defense} (cell {cell.id}): {error}") from None


def _repair_refusal(cfg: ExperimentConfig, defense: DefenseSpec) -> str | None:
    """Why the repair cannot work on this training step's model (a repairer of backbone layers
    on a pixel-prompted run), or None."""
    from vptlab.defenses.repair import pixel_prompt_refusal

    if cfg.adapt.mode != "pixel" or defense.name is None:
        return None
    return pixel_prompt_refusal(defense.name)


def _skipped(cell: Cell, reason: str) -> Cell:
    return Cell(cell.model, cell.adaptation, cell.threat, cell.defense, cell.threat_spec,
                cell.defense_spec, skip=reason, seed=cell.seed)  # fmt: skip


def _train_config(cell: Cell, matrix: MatrixConfig, out: Path, overrides: list[str],
                  backbones: dict[str, Path]) -> ExperimentConfig:  # fmt: skip
    """The training step: base, then the model's and the adaptation's fragments, the threat's
    poison, an adversarial or training-time defense's training; named by its run key so equal
    steps share a folder (with a seed: by the key of its recipe without the seed, then
    `-s<seed>`)."""
    adaptation = {k: v for k, v in matrix.adaptations[cell.adaptation].items() if k != "backbone"}
    raw = deep_merge(deep_merge(matrix.base, matrix.models[cell.model]), adaptation)
    stem = [cell.model, cell.adaptation]
    if cell.threat_spec.poison is not None:
        raw = deep_merge(raw, {"data": {"poison": cell.threat_spec.poison.model_dump()}})
        stem.append(cell.threat)
    without_defense = raw
    if cell.defense_spec.kind in TRAINING_KINDS:
        raw = deep_merge(raw, {"train": cell.defense_spec.train_for(cell.model)})
        stem.append(cell.defense)
    if cell.adaptation in backbones and "pretrained" not in raw.get("model", {}):
        raw = apply_overrides(raw, [f"model.pretrained={backbones[cell.adaptation]}"])
    where = f"cell {cell.id}: "
    try:
        cfg = resolved(raw, [*overrides, f"output.dir={out / RUNS}"])
    except ConfigError as error:
        if cell.defense_spec.kind in TRAINING_KINDS and _builds(without_defense, overrides):
            where = f"defenses.{cell.defense} (cell {cell.id}): "  # its `train` is to blame
        raise ConfigError(where + str(error)) from None
    name = f"{'-'.join(stem)}-{run_key(cfg)}{seed_suffix(cell.seed)}"
    if cell.seed is None:
        return cfg.model_copy(update={"name": name})
    return cfg.model_copy(update={"name": name, "seed": cell.seed})


def _builds(raw: dict[str, Any], overrides: list[str]) -> bool:
    try:
        resolved(raw, overrides)
    except ConfigError:
        return False
    return True


def _nonsense(cfg: ExperimentConfig) -> str | None:
    """Why this training makes no sense, or None: prompts on a net with no place for them. (Pixel
    prompts act on the input: every model takes one.)"""
    if cfg.adapt.mode in ("prompt", "prompt+full") and not _promptable(
        cfg.model.name, json.dumps(cfg.model.options, sort_keys=True), cfg.data.img_size or 32
    ):
        return (f"model {cfg.model.name} has no prompt adapter (no token sequence): "
                f"adaptation mode {cfg.adapt.mode} does not apply")  # fmt: skip
    return None


@functools.cache
def _promptable(name: str, options: str, img_size: int) -> bool:
    """Whether the model has a prompt adapter; built on the meta device (no memory, no time)."""
    from vptlab.models import create_model
    from vptlab.prompts.sites import find_prompt_adapter

    with torch.device("meta"):
        net = create_model(name, num_classes=2, img_size=img_size, **json.loads(options))
    return find_prompt_adapter(getattr(net, "net", net)) is not None
