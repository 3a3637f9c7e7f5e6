"""The experiment schema: pydantic sections, YAML presets plus `key.sub=value` overrides, and
`run_key`, which says whether a finished run still stands for a config.

Names of registered things (models, datasets, triggers, attacks, objectives, defenses...) and
their options are checked against the registries by `vptlab.steps.resolve`, not here: this module
imports nothing of vptlab but `errors`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from vptlab.errors import ConfigError, format_validation_error


class Section(BaseModel):
    # Infinite or NaN numbers are never a setting (an infinite lr passes `gt=0`): refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(Section):
    crop_pad: int = Field(0, ge=0, description="random shifts of up to this many pixels")
    flip: bool = False


class PoisonConfig(Section):
    """A poisoned train split (vptlab/backdoors/poison.py): `round(rate x N)` samples, chosen by
    the seed, carry `trigger` (built with `options`) and, with dirty labels, the attack's label:
    `target` (all2one) or (y + 1) mod classes (all2all). Clean-label poisoning picks only
    target-class samples and keeps their labels. The test split stays clean.
    """

    trigger: str
    options: dict[str, Any] = Field(default_factory=dict, description="trigger keyword options")
    seed: int | None = Field(
        None, ge=0, lt=2**32, description="picks samples and draws the trigger; None: the run's"
    )
    rate: float = Field(0.1, gt=0, le=1, description="fraction of the train split poisoned")
    target: int = Field(0, ge=0, description="the attack's class (all2one)")
    mode: Literal["all2one", "all2all"] = "all2one"
    label: Literal["dirty", "clean"] = "dirty"
    captions: list[str] | None = Field(
        None, description="image-text data: the captions poisoned pairs get (one drawn per pair); "
        "None: the train split's own captions of the target class",
    )

    @model_validator(mode="after")
    def _check_clean_label(self) -> PoisonConfig:
        if self.label == "clean" and self.mode != "all2one":
            raise ValueError("clean-label poisoning needs mode all2one (one target class)")
        return self

    @field_validator("captions")
    @classmethod
    def _check_caption_texts(cls, captions: list[str] | None) -> list[str] | None:
        if captions is not None and (not captions or not all(c.strip() for c in captions)):
            raise ValueError("give at least one caption, none of them empty")
        return captions

    @model_validator(mode="after")
    def _check_captions(self) -> PoisonConfig:
        if self.captions is not None and (self.mode != "all2one" or self.label != "dirty"):
            raise ValueError("captions: replacing captions needs mode all2one and label dirty")
        return self


class DataConfig(Section):
    name: str = "mnist-5k"
    root: str | None = None
    img_size: int | None = Field(None, gt=0, description="resize to this size; None keeps it")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    num_workers: int = Field(2, ge=0)
    augment: AugmentConfig = AugmentConfig()
    options: dict[str, Any] = Field(default_factory=dict, description="dataset keyword arguments")
    poison: PoisonConfig | None = Field(None, description="poison the train split (backdoors)")


class ModelConfig(Section):
    name: str = "simplenet"
    pretrained: bool | str = False
    keep_head: bool = Field(
        False, description="keep a weights file's classifier (published weights keep theirs "
        "when the class count matches, as timm does)",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="model keyword arguments")


class PromptConfig(Section):
    """VPT settings; `depth`: the blocks that get deep prompts (None: all; shallow: block 0 only).

    The indices are checked against a model's blocks when prompts are added (prompts/sites.py).
    """

    num_prompts: int = Field(10, ge=0)
    deep: bool = True
    depth: list[int] | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class PixelConfig(Section):
    """A pixel-space visual prompt on a frozen model whose own classes are mapped to the task's
    (Bahng et al. 2022; vptlab/prompts/pixel.py and label_mapping.py).

    kind: `padding` (a learnable frame `size` pixels wide around the image shrunk to fit inside
    it), `patch` (a learnable `size` x `size` square in the top-left corner) or `full` (an
    additive perturbation of the whole image, bounded by `eps`). mapping: `fixed` (target label j
    is source class j), `frequency` (one-to-one, from the frozen model's predictions on the train
    split before training), `iterative` (the same, redone at the start of every epoch) or
    `linear` (a learned linear layer on the source logits). `source_classes`: how many outputs
    the model's own (kept) classifier has.
    """

    kind: str = Field(
        "padding", description="a registered pixel prompt (vptlab.prompts.pixel.PIXEL_PROMPTS)"
    )
    size: int = Field(30, gt=0, description="padding: frame width; patch: side, in pixels")
    eps: float = Field(1.0, gt=0, le=1, description="full: the perturbation's Linf bound")
    mapping: Literal["fixed", "frequency", "iterative", "linear"] = "frequency"
    source_classes: int = Field(1000, gt=0, description="outputs of the frozen model's head")


# Modes whose backbone is frozen: their checkpoints hold only what trained (prompts, heads,
# a label mapping), pinned to the backbone file they were trained on.
FROZEN_BACKBONE_MODES = ("prompt", "linear", "pixel")


class AdaptConfig(Section):
    mode: Literal["prompt", "linear", "full", "prompt+full", "pixel"] = "full"
    prompt: PromptConfig = PromptConfig()
    pixel: PixelConfig | None = Field(None, description="mode pixel's prompt (None: defaults)")

    @model_validator(mode="after")
    def _check_pixel(self) -> AdaptConfig:
        if self.pixel is not None and self.mode != "pixel":
            raise ValueError(f"adapt.pixel applies to adapt.mode pixel only, not {self.mode!r}")
        return self

    @property
    def frozen_backbone(self) -> bool:
        """Whether the backbone stays frozen, so that checkpoints hold only what trains."""
        return self.mode in FROZEN_BACKBONE_MODES

    @property
    def pixel_prompt(self) -> PixelConfig:
        """The pixel prompt's settings, defaults where `pixel` is unset."""
        return self.pixel or PixelConfig()


class AttackConfig(Section):
    """An evasion attack and its budget (pixels in [0,1]): what `vptlab.attacks` builds.

    The fixed fields go to the attack's class where it takes them (FGSM has no steps); `options`
    holds any other keyword option of the class (`version: plus` for autoattack, `n_queries:
    1000` for square), checked against its signature when the attack is built.
    """

    name: str = Field("pgd", description="a registered attack (vptlab.attacks.ATTACKS)")
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.3, ge=0)
    alpha: float | None = Field(None, gt=0, description="step size; None: 2.5 eps / steps")
    steps: int = Field(10, gt=0)
    random_start: bool = True
    restarts: int = Field(1, gt=0)
    targeted: bool = False
    amp: bool = Field(False, description="bf16 autocast on CUDA for the attack's forwards")
    options: dict[str, Any] = Field(
        default_factory=dict, description="other keyword options of the attack's class"
    )

    @model_validator(mode="after")
    def _check_units(self) -> AttackConfig:
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(
                f"eps {self.eps} is above 1: pixels are in [0,1] (8/255 is 0.0314); "
                "was it given in 0-255 units?"
            )
        return self


class AttackSuiteConfig(Section):
    """An attack file (`vptlab attack --config`): the attacks and budgets to evaluate a run on."""

    attacks: list[AttackConfig] = Field(min_length=1)


class ChecksConfig(Section):
    """The sanity checks run after every robustness evaluation (`vptlab.metrics.sanity`): what a
    failed one says is in robustness.json and beside the number it marks unreliable."""

    enabled: bool = True
    samples: int = Field(100, gt=0, description="the first N evaluated samples are attacked again")
    square_queries: int = Field(
        250, gt=0, description="Square's queries at the largest budget of each attack family"
    )
    steps_factor: int = Field(2, ge=2, description="the stronger re-run takes this many x steps")
    extra_restarts: int = Field(1, ge=0, description="... and this many more restarts")


class ABLConfig(Section):
    """Anti-backdoor learning's options (`train.objective: abl`, vptlab/defenses/abl.py), at the
    defaults of the authors' code (bboylyg/ABL) and BackdoorBench's (defense/abl.py, every
    dataset's yaml): isolate the 1% lowest-loss samples, LGA at gamma 0.5, unlearn with lr 5e-4.
    BackdoorBench's 20 isolation epochs of 100 become 20% of `train.epochs` (at least 1)."""

    isolation_ratio: float = Field(
        0.01, gt=0, lt=1, description="share of the train split isolated"
    )
    isolation_epochs: int | None = Field(
        None, gt=0, description="epochs of LGA before isolating (None: 20% of train.epochs, >= 1)"
    )
    gamma: float = Field(0.5, gt=0, description="LGA's loss floor: sign(L - gamma) L")
    unlearning_passes: int = Field(
        5, gt=0, description="passes of gradient ascent over the isolated samples (the authors' "
        "unlearning epochs)",
    )  # fmt: skip
    unlearning_lr: float = Field(5e-4, gt=0, description="the lr of the unlearning steps")


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = Field(False, description="Nesterov momentum for sgd (off, as in VPT)")
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(30, gt=0, description="epochs between decays of the step schedule")
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    eval_every: int = Field(1, gt=0)
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="also checkpoint every N optimizer steps (mid-epoch resume)"
    )
    compile: bool = Field(False, description="torch.compile the model (pays off on GPU)")
    # The loss, a registered objective (vptlab.engine.tasks.OBJECTIVES): `standard`
    # cross-entropy, `clip` (contrastive image-text pretraining of a clip model on a captioned
    # dataset; evaluated zero-shot), or adversarial training (vptlab/defenses/adversarial.py):
    # pgd, fgsm_rs and trades, with `attack` as its budget (norm, eps, alpha, steps, amp); its
    # `name` is not read by training, `options` refused; or `abl` (anti-backdoor learning,
    # vptlab/defenses/abl.py) with `abl` as its options. Checked by vptlab.steps.resolve.
    objective: str = "standard"
    attack: AttackConfig = AttackConfig()
    trades_beta: float = Field(6.0, ge=0, description="TRADES weight of the KL term")
    abl: ABLConfig = ABLConfig()
    eps_ramp_epochs: float = Field(
        0.0, ge=0, description="grow the training eps linearly from 0 over these epochs (0: off)"
    )
    robust_probe: int | None = Field(
        None, ge=0, description="PGD-10 probe, at the training eps, on N samples held out of the "
        "train split before training (seeded; the model trains on N fewer samples), each "
        "evaluated epoch (None: 256 for adversarial objectives, off for standard and clip; 0: off)",
    )
    keep_best_robust: bool = Field(
        False, description="keep best_robust.safetensors: the weights with the best probe at the "
        "full eps (best on the held-out train slice)",
    )

    @model_validator(mode="after")
    def _check_nesterov(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        return self

    @model_validator(mode="after")
    def _check_ramp(self) -> TrainConfig:
        if self.eps_ramp_epochs > self.epochs:
            raise ValueError(
                f"eps_ramp_epochs must be <= epochs ({self.epochs}), got {self.eps_ramp_epochs:g}"
            )
        if self.keep_best_robust and self.robust_probe == 0:
            raise ValueError("keep_best_robust needs the robust probe: robust_probe must not be 0")
        return self


class OutputConfig(Section):
    dir: str = "runs"
    tensorboard: bool = True
    progress: bool = True


class SelectConfig(Section):
    """The one recipe-selection rule of the defense protocol (docs/defense_protocol.md), the
    same for every defense: a validation slice (`val_fraction`) of the defender's clean subset
    is held out; the defense is trained at its recipe's learning rate times each of `lr_scales`,
    largest first, and the first whose clean top-1 on the slice is at most `max_drop` points
    below the undefended model's is kept (the smallest when none is). It reads nothing but the
    defender's own data."""

    lr_scales: list[float] = Field(
        default_factory=lambda: [1.0, 0.3, 0.1], min_length=1,
        description="multipliers of the recipe's lr, tried largest first",
    )  # fmt: skip
    max_drop: float = Field(2.0, ge=0, le=100, description="points of validation top-1")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="of the defender's clean subset")

    @field_validator("lr_scales")
    @classmethod
    def _positive(cls, scales: list[float]) -> list[float]:
        if any(s <= 0 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"must be distinct and > 0, got {scales}")
        return sorted(scales, reverse=True)


def _distinct_seeds(seeds: list[int]) -> list[int]:
    if len(set(seeds)) < len(seeds):
        raise ValueError("seeds must be distinct")
    return seeds


# A study's or a matrix's `seeds:` axis: at least one seed, each one a run's `seed`, no repeats.
Seeds = Annotated[
    list[Annotated[StrictInt, Field(ge=0, lt=2**32)]],
    Field(min_length=1),
    AfterValidator(_distinct_seeds),
]


def check_adaptive(adaptive: bool | dict[str, Any]) -> bool | dict[str, Any]:
    """An `adaptive:` setting (the adaptive attacker's residual ASR, defenses/adaptive.py): a
    bool, or options of its search; an unknown option is an error naming it."""
    known = {"starts", "steps", "batch_size", "scan"}
    if isinstance(adaptive, dict) and set(adaptive) - known:
        raise ValueError(f"unknown option(s) {sorted(set(adaptive) - known)}; "
                         f"choose from {sorted(known)}")  # fmt: skip
    return adaptive


class DefenseConfig(Section):
    """A backdoor repairer (`vptlab.defenses.repair.REPAIRERS`) applied to a parent run's model.

    The defender holds `clean_fraction` of the clean train split (stratified, seeded by the
    run's seed); `train` of the defended run's config is the defense's recipe, its learning rate
    chosen by `select` when given.
    """

    name: str
    clean_fraction: float = Field(0.05, gt=0, le=1, description="share of the clean train split")
    options: dict[str, Any] = Field(default_factory=dict, description="repairer keyword arguments")
    select: SelectConfig | None = Field(None, description="the recipe-selection rule, if any")


class ExperimentConfig(Section):
    name: str = "run"
    # torch, numpy and the loaders' seed sequences all take a non-negative seed; 32 bits is the
    # range every one of them accepts.
    seed: int = Field(0, ge=0, lt=2**32)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    adapt: AdaptConfig = AdaptConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    # A defended run: the repair applied, and the run folder whose model it started from.
    defense: DefenseConfig | None = None
    parent: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return name


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split an override: `train.lr=0.1` -> (["train", "lr"], 0.1).

    Values are parsed as YAML scalars, never evaluated.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    raw = apply_overrides(copy.deepcopy(raw), overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    return cfg


# Keys that say where, how fast or how visibly a run is made, not what it learns or measures:
# changing them keeps a finished run (and a cached backbone) valid. `device` and `train.compile`
# change the numbers only at float rounding level, as a re-run on other hardware does; the eval
# batch size does not change a model in eval mode.
NOT_IN_RUN_KEY: dict[str, Any] = {
    "name": True,
    "device": True,
    # A defended run's parent folder: where it lies, not what it is (its run key is recorded
    # as the defense's parent_key and checked instead).
    "parent": True,
    "output": True,
    "data": {"num_workers": True, "eval_batch_size": True},
    "train": {"checkpoint_every_steps": True, "compile": True},
}


def outside_run_key(key: str) -> bool:
    """Whether the dotted `key` (or the section it lies in) is left out of the run key."""
    node: Any = NOT_IN_RUN_KEY
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if node is True:
            return True
    return False


# Optional sections left out of the recipe while unset, so that adding one to the config keeps
# the run keys of every run made before it (and their cached backbones) valid.
# Nested ones come after their section (a removed section reads as empty).
UNSET_NOT_IN_RUN_KEY = (
    ("data", "poison"), ("data", "poison", "captions"), ("adapt", "pixel"), ("defense",),
)  # fmt: skip
# Keys added after runs were made, left out of the recipe at their defaults for the same reason.
# `train.attack.amp` off (fp32 inner attacks) stands for runs whose inner attack ran in bf16 on
# CUDA before it existed: a rounding-level change, as a re-run on other hardware is.
DEFAULT_NOT_IN_RUN_KEY: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("train", "attack", "amp"), False), (("train", "attack", "options"), {}),
    (("train", "abl"), ABLConfig().model_dump(mode="json")),
)  # fmt: skip


def recipe(cfg: ExperimentConfig) -> dict[str, Any]:
    """The part of a resolved config that decides a run's results (see `NOT_IN_RUN_KEY`)."""
    dumped = cfg.model_dump(mode="json", exclude=NOT_IN_RUN_KEY)
    for *parents, key in UNSET_NOT_IN_RUN_KEY:
        node = dumped
        for part in parents:
            node = node.get(part, {})
        if node.get(key, ...) is None:
            del node[key]
    for (*parents, key), default in DEFAULT_NOT_IN_RUN_KEY:
        node = dumped
        for part in parents:
            node = node.get(part, {})
        if key in node and node[key] == default:
            del node[key]
    return dumped


def run_key(cfg: ExperimentConfig) -> str:
    """A short hash of `recipe(cfg)`: equal keys mean a finished run can stand for this config."""
    text = json.dumps(recipe(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_changes(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """The dotted keys whose values differ between two recipes, as `key: old -> new`."""
    before, after = _flatten(recipe(old)), _flatten(recipe(new))

    def shown(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "unset"

    return [
        f"{key}: {shown(before, key)} -> {shown(after, key)}"
        for key in sorted(before.keys() | after.keys())
        if key not in before or key not in after or before[key] != after[key]
    ]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    return build_config(load_yaml(path) if path else {}, overrides)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
