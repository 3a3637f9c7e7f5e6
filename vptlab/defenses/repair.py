"""Backdoor repairers: `(model, clean subset) -> model`, each trained through the one loop.

A repairer has two halves. `prepare(model)` adds structure only (a pruning mask, say) and is
deterministic, so that a defended run is rebuilt as `build model -> prepare -> load weights`.
`repair(model, clean, cfg, run_dir)` prepares the model and trains it with `fit` into `run_dir`,
saving the whole model. `clean.train` is the defender's clean data (`clean_subset` of the train
split), `clean.test` the split evaluated after each epoch, `cfg.train` the defense's recipe.

Registered: `ft` (fine-tuning), `fp` (fine-pruning, Liu et al. 2018), `nad` (Neural Attention
Distillation, Li et al. 2021), `prompt` (ours, a defensive pixel prompt), and for image-text
models `cleanclip` (Bansal et al. 2023) and `clip-prompt` (ours for CLIP);
`create_repairer(name, **options)` builds one, and a config's `defense.options` are checked
against the factory's signature like `model.options`.

A pixel-prompted model (adapt.mode pixel, vptlab/prompts/pixel.py) is a frozen, shared backbone
behind what the attacker trained: its prompt (and label-mapping head). A repairer that says
`repairs_pixel_prompts` repairs that part alone (`ft` fine-tunes the prompt and head, `prompt`
puts its own prompt in front); the others work on the backbone's layers and are refused for such
a run at config time (`pixel_prompt_refusal`).
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
# run's seed draws (shuffling, the poisoned indices).
_CLEAN_STREAM = 0xC1EA


@runtime_checkable
class Repairer(Protocol):
    """A backdoor defense that repairs a model with clean data."""

    name: str
    # Whether it repairs a pixel-prompted model without touching its frozen backbone.
    repairs_pixel_prompts: bool

    def prepare(self, model: nn.Module) -> nn.Module:
        """Structure only (pruning-mask buffers, prompt modules...), no training, deterministic:
        also applied when a defended run is reloaded, before its saved weights are loaded."""
        ...

    def repair(
        self,
        model: nn.Module,
        clean: DataSplits,
        cfg: ExperimentConfig,
        run_dir: Path,
        evaluators: list[Evaluator] | None = None,
    ) -> nn.Module:
        """prepare(model), then train through vptlab.engine.loop.fit into run_dir (full model
        saved, trainable_only=False); clean.train is the defender's clean subset, clean.test the
        test split for per-epoch evaluation, cfg.train the defense's recipe (epochs, lr, ...)."""
        ...


REPAIRERS = Registry[Repairer]("defense")


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
    labels = split_labels(split).cpu()
    n = len(labels)
    total = round(fraction * n)
    if total < 1:
        raise DataError(
            f"defense.clean_fraction {fraction:g} of {n} samples leaves no clean sample; "
            "raise defense.clean_fraction"
        )
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = counts.double() * total / n
    take = quota.floor().long()
    extra = torch.argsort(quota - take, descending=True, stable=True)[: total - int(take.sum())]
    take[extra] += 1
    # A random order, then grouped by class (stable): each class's members in random order; a
    # sample is kept when its rank inside its class is below the class's quota.
    order = torch.randperm(n, generator=seeded_generator(seed, _CLEAN_STREAM))
    order = order[torch.argsort(inverse[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[inverse[order]]
    index = order[rank < take[inverse[order]]].sort().values
    if isinstance(split, CaptionSplit):  # image-text data: the pairs keep their captions
        captions = [split.captions[i] for i in index.tolist()]
        index = index.to(split.y.device)
        return CaptionSplit(split.x[index], split.y[index], captions)
    if isinstance(split, TensorSplit):
        index = index.to(split.y.device)
        return TensorSplit(split.x[index], split.y[index])
    return Subset(split, index.tolist())


def clean_splits(data: DataSplits, fraction: float, seed: int) -> DataSplits:
    """`data` with its train split cut to the defender's `clean_subset`; the test split kept."""
    return replace(data, train=clean_subset(data.train, fraction, seed))


def pixel_repairers() -> list[str]:
    """The registered repairers that repair a pixel-prompted model (`repairs_pixel_prompts`)."""
    return [n for n in REPAIRERS.names() if REPAIRERS.create(n).repairs_pixel_prompts]


def pixel_prompt_refusal(name: str) -> str | None:
    """Why repairer `name` cannot repair a pixel-prompted run (adapt.mode pixel), or None."""
    if name not in REPAIRERS or REPAIRERS.create(name).repairs_pixel_prompts:
        return None
    return (
        f"defense {name} works on the backbone's layers, which a pixel-prompted run "
        f"(adapt.mode pixel) keeps frozen; repair it with {' or '.join(pixel_repairers())}"
    )


def is_pixel_prompted(model: nn.Module) -> bool:
    """Whether `model` is a pixel-prompted classifier (vptlab.prompts.PixelPrompted)."""
    return getattr(model, "mode", None) == "pixel" and hasattr(model, "prompt")


def backbone(model: nn.Module) -> nn.Module:
    """The net inside an ImageClassifier (adapted or not), where repairers find their layers."""
    if not isinstance(model, ImageClassifier):
        raise ConfigError(
            f"backdoor repairers work on vptlab ImageClassifiers, got {type(model).__name__}"
        )
    return model.net


def fit_whole_model(
    model: nn.Module,
    clean: DataSplits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    task: Task | None = None,
    evaluators: list[Evaluator] | None = None,
) -> dict[str, Any]:
    """`fit` with every parameter trained (a frozen prompt-tuned backbone included) and the whole
    model saved; the task defaults to `clean_task`."""
    for param in model.parameters():
        param.requires_grad_(True)
    task = task or clean_task(model, clean, cfg)
    return fit(model, clean, cfg, run_dir, task=task, evaluators=evaluators, trainable_only=False)


def fit_pixel_prompt(
    model: nn.Module,
    clean: DataSplits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    evaluators: list[Evaluator] | None = None,
) -> dict[str, Any]:
    """`fit` of a pixel-prompted model's prompt and label-mapping head alone (what the attacker
    trained); the backbone stays frozen and in eval mode, bit-identical, so only the trained
    tensors (and the label mapping) are saved, pinned to the backbone file like the parent's."""
    if not is_pixel_prompted(model):
        raise TypeError(f"fit_pixel_prompt expects a PixelPrompted model, got {type(model)}")
    model.model.requires_grad_(False)
    model.prompt.requires_grad_(True)
    model.mapping.requires_grad_(True)
    task = ClassificationTask(cfg.train.label_smoothing)
    return fit(model, clean, cfg, run_dir, task=task, evaluators=evaluators, trainable_only=True)


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
    "clean_subset",
    "clean_task",
    "create_repairer",
    "fit_pixel_prompt",
    "fit_whole_model",
    "is_pixel_prompted",
    "pixel_prompt_refusal",
    "pixel_repairers",
    "record_metrics",
]
