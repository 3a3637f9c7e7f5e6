"""The threat matrix's config: axes of models, adaptations, threats and defenses, validated like
every vptlab config (unknown keys rejected with their dotted path, one line per error).

Models and adaptations are run-config fragments (`model:`, `train:`, `adapt:` ...) merged over
`base`; they are validated when the cells' configs are built, where a bad key names the axis entry
it came from. Threats and defenses have a `kind` that says which step of a cell's chain they change:

- threat `clean`: nothing; `evasion`: evaluation under `attacks` (budgets); `backdoor`: training on
  a train split poisoned by `poison` (a `data.poison` section), evaluation of CA / ASR / RA.
- defense `none`; `adversarial`: training changed by `train` (an objective such as pgd or trades);
  `training`: a training-time backdoor defense, the training changed by `train` as well (objective
  abl); `repair`: a backdoor repairer (`vptlab defend`) applied to the trained model.

`seeds: [0, 1, 2]` (optional) does every training run and every cell once per seed, as a study's
seeds axis does; the seed is then the axis's alone, so a `seed` in `base`, a model or an
adaptation is refused.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vptlab.config import AttackConfig, ChecksConfig, PoisonConfig, Seeds, check_adaptive
from vptlab.errors import ConfigError, format_validation_error

ThreatKind = Literal["clean", "evasion", "backdoor"]
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# What each kind of defense is for unless its `against` says otherwise: a repairer needs a trigger
# to remove, adversarial training answers evasion attacks (and is measured clean too).
DEFAULT_AGAINST: dict[str, tuple[ThreatKind, ...]] = {
    "none": ("clean", "evasion", "backdoor"),
    "adversarial": ("clean", "evasion"),
    "training": ("backdoor",),
    "repair": ("backdoor",),
}
TRAINING_KINDS = ("adversarial", "training")  # the defenses that change a cell's training


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ThreatSpec(Strict):
    """One threat of the matrix; see the module docstring for the kinds."""

    kind: ThreatKind
    attacks: list[AttackConfig] = Field(default_factory=list, description="evasion budgets")
    poison: PoisonConfig | None = Field(None, description="backdoor: the poisoned train split")

    @model_validator(mode="after")
    def _check_kind(self) -> ThreatSpec:
        if self.kind == "evasion" and not self.attacks:
            raise ValueError("an evasion threat needs at least one entry in attacks")
        if self.kind != "evasion" and self.attacks:
            raise ValueError(f"attacks belong to evasion threats, not {self.kind}")
        if self.kind == "backdoor" and self.poison is None:
            raise ValueError("a backdoor threat needs poison: {trigger, rate, target ...}")
        if self.kind != "backdoor" and self.poison is not None:
            raise ValueError(f"poison belongs to backdoor threats, not {self.kind}")
        return self


class DefenseSpec(Strict):
    """One defense of the matrix; see the module docstring for the kinds."""

    kind: Literal["none", "adversarial", "training", "repair"]
    name: str | None = Field(None, description="repair: the repairer (ft, fp, nad, prompt)")
    clean_fraction: float = Field(0.05, gt=0, le=1, description="repair: clean data held")
    options: dict[str, Any] = Field(default_factory=dict, description="repair: its options")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="adversarial: the training changes (objective, attack ...); repair: its recipe",
    )
    train_by_model: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="`train` changes for one model of the matrix"
    )
    against: list[ThreatKind] | None = Field(
        None, description="threat kinds it is run against (default: by kind)"
    )

    @model_validator(mode="after")
    def _check_kind(self) -> DefenseSpec:
        if self.kind == "repair" and not self.name:
            raise ValueError("a repair defense needs name: ft, fp, nad or prompt")
        if self.kind != "repair" and (self.name or self.options):
            raise ValueError(f"name and options belong to repair defenses, not {self.kind}")
        if self.kind == "none" and (self.train or self.train_by_model):
            raise ValueError("defense kind none changes no training: drop train")
        if self.kind == "adversarial" and self.train.get("objective", "standard") == "standard":
            raise ValueError("an adversarial defense needs train.objective: pgd, fgsm_rs or trades")
        if self.kind == "training" and not (self.train or self.train_by_model):
            raise ValueError("a training defense changes the training: give train, e.g. "
                             "{objective: abl}")  # fmt: skip
        return self

    @property
    def threat_kinds(self) -> tuple[ThreatKind, ...]:
        return tuple(self.against) if self.against is not None else DEFAULT_AGAINST[self.kind]

    def train_for(self, model: str) -> dict[str, Any]:
        return {**self.train, **self.train_by_model.get(model, {})}


class EvaluationSpec(Strict):
    limit: int | None = Field(None, gt=0, description="evasion: attack the first N test samples")
    examples: int = Field(8, ge=0, description="samples in each cell's example grid")
    checks: ChecksConfig = Field(
        default_factory=ChecksConfig, description="evasion: sanity checks on the robust accuracies"
    )
    adaptive: bool | dict[str, Any] = Field(
        True, description="repairs: the adaptive attacker's residual ASR on each defended model "
        "(true: defenses/adaptive.py's defaults; false; or residual_asr options {steps: 30, ...})",
    )  # fmt: skip

    @field_validator("adaptive")
    @classmethod
    def _search_options(cls, adaptive: bool | dict[str, Any]) -> bool | dict[str, Any]:
        return check_adaptive(adaptive)


class ResourceSpec(Strict):
    """What one cell asks of an executor (Ray schedules by it; the local executor ignores it)."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class MatrixConfig(Strict):
    matrix: str = Field(description="the matrix's name: its folder under `output`")
    title: str = ""
    description: str = ""
    output: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict, description="run config shared by all")
    models: dict[str, dict[str, Any]] = Field(min_length=1)
    adaptations: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"full": {"adapt": {"mode": "full"}}}, min_length=1,
        description="run-config fragments; `backbone:` a run config trained once and cached",
    )  # fmt: skip
    threats: dict[str, ThreatSpec] = Field(min_length=1)
    defenses: dict[str, DefenseSpec] = Field(
        default_factory=lambda: {"none": DefenseSpec(kind="none")}, min_length=1
    )
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourceSpec = ResourceSpec()
    seeds: Seeds | None = Field(
        None, description="do every training run and cell once per seed, in "
        "-s<seed> folders, and report mean ± std over them"
    )

    @field_validator("matrix")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not LABEL.match(name):
            raise ValueError("must be a plain folder name (letters, digits, _ . + -)")
        return name

    @field_validator("models", "adaptations", "threats", "defenses")
    @classmethod
    def _check_labels(cls, axis: dict[str, Any]) -> dict[str, Any]:
        for label in axis:
            if not LABEL.match(str(label)):
                raise ValueError(
                    f"entry {label!r}: labels name folders (letters, digits, _ . + -)"
                )
        return axis


def is_matrix(raw: dict[str, Any]) -> bool:
    return "matrix" in raw


def parse_matrix(raw: dict[str, Any]) -> MatrixConfig:
    """The validated matrix config; an error is one line naming its key (`threats.pgd...`)."""
    try:
        matrix = MatrixConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    _check_seed_keys(matrix)
    return matrix


def _check_seed_keys(matrix: MatrixConfig) -> None:
    """With a seeds axis, a `seed` in the base or an axis entry would be overridden without a
    word (or would split one cell's seeds apart): it is refused, naming where it is."""
    if matrix.seeds is None:
        return
    sections = [("base", matrix.base)]
    sections += [(f"models.{label}", spec) for label, spec in matrix.models.items()]
    sections += [(f"adaptations.{label}", spec) for label, spec in matrix.adaptations.items()]
    for where, section in sections:
        if "seed" in section:
            raise ConfigError(f"{where}.seed: the matrix's seeds axis sets each run's seed; "
                              "remove one of them")  # fmt: skip
