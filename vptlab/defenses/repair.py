"""Backdoor repairers: `(model, clean subset) -> model`, each a task of the one loop.

A repairer says what to train and how; `repair` trains it, with the one `fit` call every
repairer goes through. `prepare(model)` adds structure only (a pruning mask, a defensive prompt)
and is deterministic, so a defended run is rebuilt as `build model -> prepare -> load weights`;
an optional `before_fit` does what comes before training (pruning, a NAD teacher); `task` is the
loss `fit` optimises; `trains` says which parameters train.

Defenders are blind (docs/defense_protocol.md): a repairer's methods see the model, the
defender's clean data and its own recipe, nothing else. `clean.train` is the defender's clean
data (`clean_subset` of the train split, or its training part when a validation slice is held
out), `clean.test` the defender's own validation data (`defender_splits`: never the test split),
and `cfg` the defended config seen through `blind_config` (no `data.poison`, no `parent`). The
test-split evaluators that draw a defended run's curves go to `fit` alone.

Registry entries carry metadata (`REPAIRERS.meta(name)`): `repairs_pixel_prompts`, whether it
repairs a pixel-prompted run (adapt.mode pixel, vptlab/prompts/pixel.py: a frozen, shared
backbone behind the attacker's prompt and head) without touching that backbone, and
`needs_image_text`, whether it applies to image-text (CLIP) models only. The others are refused
for a pixel-prompted run at config time (`pixel_prompt_refusal`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits, TensorSplit, seeded_generator, split_labels
from vptlab.data.captions import CaptionSplit
from vptlab.engine.distributed import is_main_process
from vptlab.engine.evaluators import Evaluator
from vptlab.engine.loop import fit
from vptlab.engine.tasks import ClassificationTask, Task, contrastive_task
from vptlab.errors import ConfigError, DataError
from vptlab.models.base import ImageClassifier
from vptlab.registry import Registry
from vptlab.runs import METRICS_FILE, atomic_write_text

# Mixed into the clean subset's seed, so that it is drawn independently of anything else the
# run's seed draws (shuffling, the poisoned indices); the validation slice's seed likewise.
_CLEAN_STREAM = 0xC1EA
_VAL_STREAM = 0x5A1


# What a repairer trains (its `trains`): the whole model (a pixel-prompted one: its prompt and
# label-mapping head, what the attacker trained), or what `prepare` left trainable (a defensive
# prompt), with the whole model saved.
TRAINS_MODEL = "model"
TRAINS_PREPARED = "prepared"


@runtime_checkable
class Repairer(Protocol):
    """A backdoor defense that repairs a model with clean data, through `repair`.

    Optional members: `before_fit(model, clean, cfg, run_dir) -> dict | None` runs
    on the prepared model before training and returns metrics for the run's metrics.json (under
    their keys); `recipe(cfg) -> cfg` adjusts the training recipe (a prompt's own lr). A task
    with a `close()` method is closed after training.
    """

    name: str
    trains: str  # TRAINS_MODEL or TRAINS_PREPARED

    def prepare(self, model: nn.Module) -> nn.Module:
        """Structure only (pruning-mask buffers, prompt modules...), no training, deterministic:
        also applied when a defended run is reloaded, before its saved weights are loaded."""
        ...

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
        """The loss the one loop optimises on `clean.train` for the prepared `model`."""
        ...


REPAIRERS = Registry[Repairer](
    "defense", required=("repairs_pixel_prompts", "needs_image_text")
)


def create_repairer(name: str, **options: Any) -> Repairer:
    """Repairer `name` with its keyword options, checked against its factory's signature."""
    checked = REPAIRERS.check_options(name, options, where="defense.options")
    return REPAIRERS.create(name, **checked)


def clean_subset(
    split: TensorSplit | Dataset, fraction: float, seed: int
) -> TensorSplit | Dataset:
    """The defender's clean data: round(fraction x N) samples of `split`, stratified by class.

    Each class gives its share (fraction x its count), rounded so that the total is exact (the
    largest remainders get the extra samples); which samples is drawn from `seed` alone. Returns
    the samples in split order, as a TensorSplit (from a TensorSplit; a CaptionSplit keeps its
    captions) or a Subset (whose captions `split_captions` finds through it).
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"defense.clean_fraction must be in (0, 1], got {fraction!r}")
    return take(split, stratified_index(split_labels(split).cpu(), fraction, seed, _CLEAN_STREAM))


def stratified_index(labels: torch.Tensor, fraction: float, seed: int, stream: int) -> torch.Tensor:
    """Sorted indices of round(fraction x N) of `labels`, each class giving its share (the
    largest remainders get the extra samples), drawn from (`seed`, `stream`) alone."""
    n = len(labels)
    total = round(fraction * n)
    if total < 1:
        raise DataError(
            f"defense.clean_fraction {fraction:g} of {n} samples leaves no clean sample; "
            "raise defense.clean_fraction"
        )
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = counts.double() * total / n
    count = quota.floor().long()
    extra = torch.argsort(quota - count, descending=True, stable=True)[: total - int(count.sum())]
    count[extra] += 1
    # A random order, then grouped by class (stable): each class's members in random order; a
    # sample is kept when its rank inside its class is below the class's quota.
    order = torch.randperm(n, generator=seeded_generator(seed, stream))
    order = order[torch.argsort(inverse[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[inverse[order]]
    return order[rank < count[inverse[order]]].sort().values


def take(split: TensorSplit | Dataset, index: torch.Tensor) -> TensorSplit | Dataset:
    """The samples `index` of `split`, in that order (see `clean_subset` for the types)."""
    if isinstance(split, CaptionSplit):  # image-text data: the pairs keep their captions
        captions = [split.captions[i] for i in index.tolist()]
        index = index.to(split.y.device)
        return CaptionSplit(split.x[index], split.y[index], captions)
    if isinstance(split, TensorSplit):
        index = index.to(split.y.device)
        return TensorSplit(split.x[index], split.y[index])
    return Subset(split, index.tolist())


def clean_splits(data: DataSplits, fraction: float, seed: int) -> DataSplits:
    """`data` with its train split cut to the defender's `clean_subset`; the test split kept
    (for tests and evaluation: a repairer gets `defender_splits`)."""
    return replace(data, train=clean_subset(data.train, fraction, seed))


def defender_splits(
    data: DataSplits, fraction: float, seed: int, val_fraction: float = 0.0
) -> DataSplits:
    """What the defender holds, as the splits a repairer gets: its `clean_subset` of the train
    split; with `val_fraction`, a stratified validation slice of that subset (drawn apart from
    the subset's draw) is held out as `test` and the rest is `train`; without, `test` is the
    clean subset itself. The test split is never in it."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"defense.clean_fraction must be in (0, 1], got {fraction!r}")
    labels = split_labels(data.train).cpu()
    index = stratified_index(labels, fraction, seed, _CLEAN_STREAM)
    if not val_fraction:
        clean = take(data.train, index)
        return replace(data, train=clean, test=clean)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"defense.select.val_fraction must be in (0, 1), got {val_fraction!r}")
    val = stratified_index(labels[index], val_fraction, seed, _VAL_STREAM)
    rest = torch.ones(len(index), dtype=torch.bool)
    rest[val] = False
    return replace(data, train=take(data.train, index[rest]), test=take(data.train, index[val]))


def blind_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` as a defender may see it: the poisoning (trigger, target, rate) and the parent run's
    folder (where the poisoned indices are saved) removed."""
    data = cfg.data.model_copy(update={"poison": None})
    return cfg.model_copy(update={"data": data, "parent": None})


def pixel_repairers() -> list[str]:
    """The registered repairers that repair a pixel-prompted model (`repairs_pixel_prompts`)."""
    return REPAIRERS.names(repairs_pixel_prompts=True)


def pixel_prompt_refusal(name: str) -> str | None:
    """Why repairer `name` cannot repair a pixel-prompted run (adapt.mode pixel), or None."""
    if name not in REPAIRERS or REPAIRERS.meta(name)["repairs_pixel_prompts"]:
        return None
    return (
        f"defense {name} works on the backbone's layers, which a pixel-prompted run "
        f"(adapt.mode pixel) keeps frozen; repair it with {' or '.join(pixel_repairers())}"
    )


def is_pixel_prompted(model: nn.Module) -> bool:
    """Whether `model` is a pixel-prompted classifier (vptlab.prompts.PixelPrompted with a label
    mapping; the prompt defense's wrapper has none)."""
    return getattr(model, "mode", None) == "pixel" and getattr(model, "mapping", None) is not None


def backbone(model: nn.Module) -> nn.Module:
    """The net inside an ImageClassifier (adapted or not), where repairers find their layers."""
    if not isinstance(model, ImageClassifier):
        raise ConfigError(
            f"backdoor repairers work on vptlab ImageClassifiers, got {type(model).__name__}"
        )
    return model.net


def repair(
    repairer: Repairer,
    model: nn.Module,
    clean: DataSplits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    evaluators: list[Evaluator] | None = None,
) -> nn.Module:
    """`repairer` applied to `model`: prepare, `before_fit`, then the one `fit` of its task into
    `run_dir`; returns the repaired (prepared) model in eval mode.

    The repairer sees `clean` and `blind_config(cfg)` only; `evaluators` (which may hold the
    test split and the trigger, to draw the run's curves) go to `fit`, never to the repairer."""
    model = repairer.prepare(model)
    blind = blind_config(cfg)
    recipe = getattr(repairer, "recipe", None)
    if recipe is not None:
        blind = recipe(blind)
        cfg = cfg.model_copy(update={"train": blind.train})
    before_fit = getattr(repairer, "before_fit", None)
    extra = before_fit(model, clean, blind, Path(run_dir)) if before_fit else None
    trainable_only = select_trainable(model, repairer.trains)
    task = repairer.task(model, clean, blind)
    try:
        fit(model, clean, cfg, run_dir, task=task, evaluators=evaluators,
            trainable_only=trainable_only)  # fmt: skip
    finally:
        close = getattr(task, "close", None)
        if close is not None:
            close()
    for key, values in (extra or {}).items():
        record_metrics(run_dir, key, values)
    return model.eval()


def select_trainable(model: nn.Module, trains: str) -> bool:
    """Set which parameters of the prepared `model` train; returns `fit`'s `trainable_only`.

    TRAINS_MODEL: every parameter (a frozen prompt-tuned backbone included), the whole model
    saved; for a pixel-prompted model its prompt and label-mapping head alone, the backbone
    frozen and bit-identical, so only the trained tensors are saved, pinned to the backbone file
    like the parent's. TRAINS_PREPARED: as `prepare` left them, the whole model saved.
    """
    if trains == TRAINS_PREPARED:
        return False
    if trains != TRAINS_MODEL:
        raise ValueError(f"repairers train {TRAINS_MODEL!r} or {TRAINS_PREPARED!r}, not {trains!r}")
    if is_pixel_prompted(model):
        model.model.requires_grad_(False)
        model.prompt.requires_grad_(True)
        model.mapping.requires_grad_(True)
        return True
    for param in model.parameters():
        param.requires_grad_(True)
    return False


def clean_task(model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
    """The plain objective on the defender's clean data: cross-entropy with the recipe's label
    smoothing, or for an image-text model trained contrastively (`train.objective: clip`) CLIP's
    loss on the clean pairs' captions."""
    if cfg.train.objective == "clip":
        return contrastive_task(model, clean.train)
    return ClassificationTask(cfg.train.label_smoothing)


def record_metrics(run_dir: str | Path, key: str, values: dict[str, Any]) -> None:
    """Add `values` under `key` to the run's metrics.json (written by `fit`)."""
    if not is_main_process():
        return
    path = Path(run_dir) / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics[key] = values
    atomic_write_text(path, json.dumps(metrics, indent=2))


__all__ = [
    "REPAIRERS",
    "Repairer",
    "backbone",
    "clean_splits",
    "blind_config",
    "clean_subset",
    "clean_task",
    "defender_splits",
    "stratified_index",
    "take",
    "create_repairer",
    "TRAINS_MODEL",
    "TRAINS_PREPARED",
    "is_pixel_prompted",
    "pixel_prompt_refusal",
    "pixel_repairers",
    "record_metrics",
    "repair",
    "select_trainable",
]
