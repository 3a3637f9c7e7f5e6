"""`resolve(cfg)`: a config checked against the registries before any folder is written.

`vptlab.config` is the schema only; the names it holds (model, dataset, trigger, objective,
attack, pixel prompt, defense) and their `options` are checked here, each against its registry
entry's factory signature, so that a bad config is one line naming its key (exit 2) and nothing
is loaded or written. Options come back in their validated JSON form, which is what the run key
hashes and what the factories receive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm

from vptlab.attacks import ATTACKS
from vptlab.backdoors.triggers import TRIGGERS
from vptlab.config import (
    DefenseConfig,
    ExperimentConfig,
    PoisonConfig,
    TrainConfig,
    build_config,
    load_config,
)
from vptlab.data import DATASETS
from vptlab.data.captions import CAPTIONED
from vptlab.data.datasets import DATA_SUPPLIED
from vptlab.defenses.adversarial import is_adversarial, probe_size
from vptlab.defenses.repair import REPAIRERS
from vptlab.engine.tasks import OBJECTIVES
from vptlab.errors import ConfigError
from vptlab.models import MODEL_SUPPLIED, MODELS, timm_models
from vptlab.prompts.pixel import PIXEL_PROMPTS
from vptlab.registry import check_factory_options


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with every registered name checked and every `options` validated (in place)."""
    check_model(cfg)
    DATASETS.require(cfg.data.name, "data.name")
    cfg.data.options = DATASETS.check_options(
        cfg.data.name, cfg.data.options, where="data.options", supplied=DATA_SUPPLIED
    )
    if cfg.data.poison is not None:
        check_poison(cfg.data.poison)
        if cfg.data.poison.captions is not None and cfg.data.name not in CAPTIONED:
            raise ConfigError(
                f"data.poison.captions: {cfg.data.name} is not an image-text dataset; its "
                "samples have no captions to replace"
            )
    if cfg.adapt.pixel is not None:
        PIXEL_PROMPTS.require(cfg.adapt.pixel.kind, "adapt.pixel.kind")
    check_train(cfg.train)
    if cfg.defense is not None:
        check_defense(cfg.defense)
    return cfg


def resolved(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """`build_config` (the schema) then `resolve` (the registries)."""
    return resolve(build_config(raw, overrides))


def load_resolved(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """`load_config` (a YAML file and overrides) then `resolve`."""
    return resolve(load_config(path, overrides))


def check_model(cfg: ExperimentConfig) -> None:
    """A registered model or any name timm knows, its options against its factory."""
    name = cfg.model.name
    factory = MODELS.get(name) if name in MODELS else None
    if factory is None and timm.is_model(name):
        factory = timm_models.timm_factory(name)
    if factory is None:
        raise ConfigError(
            f"model.name: unknown model {name!r}; choose from: {', '.join(MODELS.names())} "
            "(or any name in timm.list_models())"
        )
    cfg.model.options = check_factory_options(
        factory, cfg.model.options, where="model.options", owner=f"model '{name}'",
        supplied=MODEL_SUPPLIED,
    )  # fmt: skip


def check_train(train: TrainConfig) -> None:
    """The objective is registered and its attack fits it (an adversarial objective trains on
    its own untargeted attack of norm, eps, alpha and steps)."""
    OBJECTIVES.require(train.objective, "train.objective")
    attack = train.attack
    ATTACKS.require(attack.name, "train.attack.name")
    if is_adversarial(train.objective):
        meta = OBJECTIVES.meta(train.objective)
        norms = meta.get("norms", ("linf", "l2"))
        if attack.norm not in norms:
            raise ConfigError(
                f"train.attack.norm must be {' or '.join(norms)} for objective "
                f"{train.objective}, got {attack.norm!r}"
            )
        if attack.name not in ATTACKS.names(trains=True):
            raise ConfigError(
                f"train.attack.name {attack.name} cannot train; the objective sets the attack"
            )
        if attack.targeted or attack.restarts != 1:
            raise ConfigError("train.attack: training attacks are untargeted, restarts 1")
        if attack.options:
            raise ConfigError(
                f"train.attack.options: the {train.objective} objective takes no attack options "
                f"(got {', '.join(map(str, attack.options))}); it reads norm, eps, alpha, steps "
                "and amp"
            )
        if attack.eps == 0:
            raise ConfigError(f"train.attack.eps must be > 0 for objective {train.objective}")
    if train.keep_best_robust and probe_size(train) == 0:
        raise ConfigError(
            "train.keep_best_robust needs the robust probe: set train.robust_probe "
            f"(objective {train.objective} has none by default)"
        )


def check_poison(poison: PoisonConfig) -> None:
    """The trigger's name and options: validated against its factory, then built once, so a bad
    value (a patch size of 0, a missing blend image) fails here and names its key."""
    TRIGGERS.require(poison.trigger, "data.poison.trigger")
    poison.options = TRIGGERS.check_options(
        poison.trigger, poison.options, where="data.poison.options",
        supplied={"seed": "set it as data.poison.seed"},
    )  # fmt: skip
    try:
        TRIGGERS.create(poison.trigger, **poison.options)
    except ConfigError as error:
        raise ConfigError(f"data.poison.options: {error}") from None


def check_defense(defense: DefenseConfig) -> None:
    """The repairer must exist (unlike models, no other library can supply one) and its options
    fit its factory's signature, checked before any model is loaded."""
    REPAIRERS.require(defense.name, "defense.name")
    defense.options = REPAIRERS.check_options(
        defense.name, defense.options, where="defense.options"
    )
