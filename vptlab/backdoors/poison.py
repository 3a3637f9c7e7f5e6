"""Poisoned train splits and triggered test splits, built beside the clean data, never over it.

`poison_split` picks exactly round(rate x N) samples with the seed (clean-label: only from the
target class; dirty-label all2one: only from the other classes, as BackdoorBench), stamps them
with the trigger and, for dirty labels, gives them the attack's label: `target` (all2one) or
(y + 1) mod classes (all2all). The poisoned samples are fixed (and recorded); WaNet's "cross"
samples are not: as in the authors' code and BackdoorBench, every training batch warps
int(cross_ratio x its poisoned samples) of its other samples, drawn anew, by the trigger's noise
mode with fresh noise, labels kept (`CrossNoise`, the split's `train_transform`, which the train
loader applies; evaluation and the test split never see it).
A TensorSplit becomes a new TensorSplit (`PoisonedTensorSplit`, the original's tensors untouched
and kept as `.clean`); a streaming Dataset is wrapped (`PoisonedDataset`) and stamped per item.
A fitted trigger (TrojanNN, label-consistent ...) is first fitted on the clean split's tensors
(`Trigger.fit`; a streaming split cannot be), and poisoned samples become `trigger.poison(x, y)`.
Both carry a `PoisonRecord` (`.poison`): the config, the trigger and the chosen indices, which
`save_poison` writes into a run folder (poison.json + poison.safetensors) and `load_poison`
reads back, so detection and defenses know what was poisoned.

`backdoor_test_split` stamps every test sample whose true label is not the target (all2one;
all of them for all2all) and keeps the true labels: top-1 on it is the robust accuracy (RA),
and the ASR counts predictions of `target_labels(y)` (see backdoors/metrics.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Subset

from vptlab.backdoors.triggers import Trigger, create_trigger, trigger_from_spec
from vptlab.config import PoisonConfig
from vptlab.data.base import DataSplits, TensorSplit, seeded_generator, split_labels
from vptlab.errors import ConfigError, VptlabError
from vptlab.runs import atomic_write, atomic_write_text

POISON_FILE = "poison.json"
POISON_INDICES_FILE = "poison.safetensors"
_SELECT_STREAM = 2  # seeded streams, apart from the trigger's pattern draws (stream 1)
_CHUNK = 4096  # images stamped at a time: bounds the temporary memory of a large split
_STATE_PREFIX = "trigger."  # a fitted trigger's learnt tensors in poison.safetensors


def target_labels(
    y: torch.Tensor, target: int, mode: str, num_classes: int | None = None
) -> torch.Tensor:
    """The attack's label for samples of true label y: `target` (all2one), (y + 1) mod classes
    (all2all)."""
    if mode == "all2one":
        return torch.full_like(y, target)
    if mode == "all2all":
        if num_classes is None:
            raise ValueError("all2all needs the number of classes")
        return (y + 1) % num_classes
    raise ValueError(f"mode must be all2one or all2all, got {mode!r}")


def stored_channels(split: TensorSplit | Dataset) -> int:
    """The channels a split's images are stored with (1 for gray, before the loader's repeat)."""
    x = split.x if isinstance(split, TensorSplit) else split[0][0]
    return int(x.shape[-3])


def stored_size(split: TensorSplit | Dataset) -> tuple[int, int]:
    """The (height, width) a split's images are stored at (before any `data.img_size`)."""
    x = split.x if isinstance(split, TensorSplit) else split[0][0]
    return int(x.shape[-2]), int(x.shape[-1])


@dataclass(frozen=True)
class PoisonRecord:
    """What a poisoning did: its config (seed resolved), trigger, and the sorted indices of the
    poisoned samples in the train split, with their true labels. Cross samples (WaNet) have no
    fixed indices: they are drawn per batch, `cross_ratio` x the batch's poisoned samples."""

    config: PoisonConfig
    trigger: Trigger
    poisoned: torch.Tensor  # (n,) int64, sorted
    original_labels: torch.Tensor  # (n,) int64: true labels of `poisoned`
    num_samples: int
    num_classes: int
    # A fitted trigger's poisoned train samples as trained ((n, C, H, W), else None): a reload
    # of the run (defend, detect, resume) takes them instead of fitting the trigger again.
    images: torch.Tensor | None = None

    def counts(self) -> dict[str, int | float]:
        """Samples, classes, poisoned samples, and cross samples per poisoned one in a batch."""
        return {
            "samples": self.num_samples,
            "classes": self.num_classes,
            "poisoned": len(self.poisoned),
            "cross_ratio": self.trigger.cross_ratio,
        }

    def labels(self, clean: torch.Tensor) -> torch.Tensor:
        """The labels trained on, from the split's true labels: poisoned samples relabelled to
        the attack's label for dirty-label poisoning, unchanged for clean-label."""
        cfg, labels = self.config, clean.clone()
        if cfg.label == "dirty":
            labels[self.poisoned] = target_labels(
                clean[self.poisoned], cfg.target, cfg.mode, self.num_classes
            )
        return labels


def poison_trigger(cfg: PoisonConfig, seed: int = 0) -> Trigger:
    """The trigger of a poison config; its seed is `cfg.seed`, else `seed` (the run's)."""
    return create_trigger(cfg.trigger, seed=_seed(cfg, seed), **cfg.options)


def _seed(cfg: PoisonConfig, seed: int) -> int:
    return cfg.seed if cfg.seed is not None else seed


def poison_candidates(labels: torch.Tensor, cfg: PoisonConfig) -> torch.Tensor:
    """The samples poisoning may pick: clean-label, the target class only (their labels already
    say the target); dirty-label all2one, every sample NOT of the target class (as BackdoorBench:
    relabelling a target sample to its own label would plant nothing); all2all, every sample."""
    if cfg.label == "clean":
        return torch.nonzero(labels == cfg.target).flatten()
    if cfg.mode == "all2one":
        return torch.nonzero(labels != cfg.target).flatten()
    return torch.arange(len(labels))


def select_poison(labels: torch.Tensor, cfg: PoisonConfig, seed: int) -> torch.Tensor:
    """The sorted poisoned indices: round(rate x N) samples drawn by `seed` among the
    `poison_candidates`."""
    n = len(labels)
    count = round(cfg.rate * n)
    if count == 0:
        raise ConfigError(
            f"data.poison.rate: {cfg.rate:g} of {n} train samples poisons none; raise the rate"
        )
    g = seeded_generator(seed, _SELECT_STREAM)
    candidates = poison_candidates(labels, cfg)
    if len(candidates) < count:
        which = "clean-label" if cfg.label == "clean" else "dirty-label all2one"
        kind = "samples of target class" if cfg.label == "clean" else "samples not of class"
        raise ConfigError(
            f"data.poison.rate: {which} poisoning needs {count} {kind} {cfg.target}, the train "
            f"split has {len(candidates)} (rate at most "
            f"{len(candidates) / n:.4g})"
        )
    poisoned = candidates[torch.randperm(len(candidates), generator=g)[:count]]
    return poisoned.sort().values


@dataclass(frozen=True)
class CrossNoise:
    """WaNet's noise mode as the authors' code and BackdoorBench train it: in every batch,
    num_cross = int(num_bd x cross_ratio) samples (num_bd: the batch's poisoned samples), drawn
    anew among its other samples, are warped by the trigger's grid plus fresh random noise,
    their labels kept; the rest of the batch stays as it is.

    A train split's `train_transform`: the train loader calls it on each batch, at the stored
    size and before augmentation (where the poisoned samples were stamped), with a generator
    seeded by (run seed, epoch, batch), so a run, and a run resumed mid-epoch, draws the same.
    """

    trigger: Trigger
    poisoned: torch.Tensor  # (N,) bool over the split: which samples carry the trigger

    def cross(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch positions (CPU int64) of the cross samples of a batch of split `index`."""
        is_poisoned = self.poisoned[index.cpu()]
        count = int(int(is_poisoned.sum()) * self.trigger.cross_ratio)
        others = torch.nonzero(~is_poisoned).flatten()
        return others[torch.randperm(len(others), generator=generator)[:count]]

    def __call__(
        self, x: torch.Tensor, index: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        picked = self.cross(index, generator)
        if len(picked) == 0:
            return x
        picked = picked.to(x.device)
        out = x.clone()
        out[picked] = self.trigger.noise(x[picked], generator)
        return out


def cross_noise(record: PoisonRecord) -> CrossNoise | None:
    """The per-batch cross samples of a poisoning whose trigger has a noise mode, else None."""
    if record.trigger.cross_ratio <= 0:
        return None
    poisoned = torch.zeros(record.num_samples, dtype=torch.bool)
    poisoned[record.poisoned] = True
    return CrossNoise(record.trigger, poisoned)


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]) if len(x) else x


@dataclass
class PoisonedTensorSplit(TensorSplit):
    """A poisoned copy of a TensorSplit: `x`, `y` new tensors, `clean` the untouched original,
    `poison` what was done, `train_transform` the per-batch cross samples (WaNet; else None).
    Loaders see a plain TensorSplit, and train loaders its `train_transform`."""

    clean: TensorSplit
    poison: PoisonRecord
    train_transform: CrossNoise | None = None


class PoisonedDataset(Dataset):
    """A streaming Dataset with a poisoning applied per item: poisoned samples stamped (and, for
    dirty labels, relabelled), the rest as the base gives them. `targets` are the labels as
    trained on; `train_transform` the per-batch cross samples (WaNet; else None)."""

    def __init__(self, base: Dataset, record: PoisonRecord, labels: torch.Tensor) -> None:
        self.base = base
        self.poison = record
        self.train_transform = cross_noise(record)
        self.is_poisoned = torch.zeros(len(labels), dtype=torch.bool)
        self.is_poisoned[record.poisoned] = True
        self.targets = record.labels(labels).tolist()

    def __len__(self) -> int:
        return len(self.is_poisoned)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[index]
        if self.is_poisoned[index]:
            y = torch.tensor([int(y)])
            return self.poison.trigger.poison(x[None], y)[0], self.targets[index]
        return x, int(y)


def poison_split(
    split: TensorSplit | Dataset,
    cfg: PoisonConfig,
    num_classes: int,
    seed: int = 0,
    saved: PoisonRecord | None = None,
) -> PoisonedTensorSplit | PoisonedDataset:
    """`split` poisoned as `cfg` says (trigger and sample draws seeded by `cfg.seed`, else
    `seed`); the input split and its tensors are left as they were. `saved`: the run's own
    record (`load_poison_record`), whose fitted trigger and poisoned samples are taken as they
    were trained, without fitting again, when it is a record of this very poisoning."""
    if cfg.mode == "all2one" and cfg.target >= num_classes:
        raise ConfigError(
            f"data.poison.target: {cfg.target} is not a class (the dataset has {num_classes})"
        )
    seed = _seed(cfg, seed)
    trigger = poison_trigger(cfg, seed)
    if trigger.fitted and not isinstance(split, TensorSplit):
        raise ConfigError(
            f"data.poison.trigger: {trigger.name} is fitted on the train split's tensors, and "
            "this train split streams from disk; use a dataset held in memory"
        )
    labels = split_labels(split)
    poisoned = select_poison(labels, cfg, seed)
    record = PoisonRecord(
        config=cfg.model_copy(update={"seed": seed}),
        trigger=trigger,
        poisoned=poisoned,
        original_labels=labels[poisoned].clone(),
        num_samples=len(labels),
        num_classes=num_classes,
    )
    if not isinstance(split, TensorSplit):
        return PoisonedDataset(split, record, labels)
    if saved is not None and saved.images is not None and _same_poisoning(saved, record):
        record = replace(record, trigger=saved.trigger, images=saved.images)
        stamped = saved.images
    else:
        if trigger.fitted:
            trigger.fit(split.x, split.y, num_classes, cfg.target)
        chunks = [trigger.poison(split.x[part], split.y[part]) for part in poisoned.split(_CHUNK)]
        stamped = torch.cat(chunks) if chunks else split.x[poisoned]
        if trigger.fitted:
            record = replace(record, images=stamped)
    x = split.x.clone()
    x[poisoned] = stamped.to(x.dtype)
    return PoisonedTensorSplit(
        x, record.labels(split.y), clean=split, poison=record, train_transform=cross_noise(record)
    )


def _same_poisoning(saved: PoisonRecord, record: PoisonRecord) -> bool:
    """Whether `saved` is a record of the poisoning `record` describes, by a fitted trigger:
    the same config, trigger spec and indices, on a split of the same size."""
    return (record.trigger.fitted and saved.config == record.config
            and saved.trigger.spec() == record.trigger.spec()
            and saved.num_samples == record.num_samples
            and torch.equal(saved.poisoned, record.poisoned))  # fmt: skip


def poison_data(
    data: DataSplits, cfg: PoisonConfig, seed: int = 0, saved: PoisonRecord | None = None
) -> DataSplits:
    """`data` with its train split poisoned (see `poison_split`; image-text data also get the
    target's captions on poisoned pairs, backdoors/clip_poison.py); the test split stays clean."""
    # Imported here: clip_poison builds on this module.
    from vptlab.backdoors.clip_poison import has_captions, poison_caption_split

    if has_captions(data.train):
        return replace(data, train=poison_caption_split(data.train, cfg, data.num_classes, seed))
    if cfg.captions is not None:
        raise ConfigError(
            f"data.poison.captions: {data.name} has no captions to replace (it is not image-text)"
        )
    return replace(data, train=poison_split(data.train, cfg, data.num_classes, seed, saved))


def non_target_index(labels: torch.Tensor, target: int, mode: str) -> torch.Tensor:
    """The samples a backdoor is measured on: true label not the target (all2one), all (all2all)."""
    if mode == "all2all":
        return torch.arange(len(labels))
    return torch.nonzero(labels != target).flatten()


class TriggeredDataset(Dataset):
    """Every item of `base` stamped with `trigger`, its label kept."""

    def __init__(self, base: Dataset, trigger: Trigger) -> None:
        self.base, self.trigger = base, trigger
        self.targets = split_labels(base).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[index]
        return self.trigger.apply(x[None])[0], int(y)


def backdoor_test_split(
    test: TensorSplit | Dataset, trigger: Trigger, target: int, mode: str = "all2one"
) -> TensorSplit | Dataset:
    """The triggered test set: every test sample whose true label is not `target` (all2one; all
    samples for all2all), stamped at its stored size, with its TRUE label. Its i-th sample is
    test sample `non_target_index(split_labels(test), target, mode)[i]`."""
    keep = non_target_index(split_labels(test), target, mode)
    if isinstance(test, TensorSplit):
        return TensorSplit(_in_chunks(trigger.apply, test.x[keep]), test.y[keep].clone())
    return TriggeredDataset(Subset(test, keep.tolist()), trigger)


def save_poison(run_dir: str | Path, record: PoisonRecord) -> None:
    """poison.json (config, trigger spec, counts) and poison.safetensors (poisoned indices,
    their true labels and a fitted trigger's learnt tensors as `trigger.<key>`) in `run_dir`,
    each written atomically."""
    run_dir = Path(run_dir)
    summary = {
        "config": record.config.model_dump(mode="json"),
        "trigger": record.trigger.spec(),
        "counts": record.counts(),
        "indices": POISON_INDICES_FILE,
    }
    tensors = {
        "poisoned": record.poisoned.contiguous(),
        "original_labels": record.original_labels.contiguous(),
        **{f"{_STATE_PREFIX}{k}": v.contiguous() for k, v in record.trigger.state().items()},
    }
    if record.images is not None:
        tensors["images"] = record.images.contiguous()
    atomic_write(run_dir / POISON_INDICES_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(run_dir / POISON_FILE, json.dumps(summary, indent=2))


def load_poison_record(run_dir: str | Path) -> PoisonRecord:
    """The `PoisonRecord` `save_poison` wrote; a fitted trigger gets its learnt state back."""
    run_dir = Path(run_dir)
    path = run_dir / POISON_FILE
    if not path.is_file():
        raise VptlabError(f"{run_dir} holds no {POISON_FILE}: it is not a poisoned run")
    summary: dict[str, Any] = json.loads(path.read_text())
    tensors = load_file(run_dir / summary.get("indices", POISON_INDICES_FILE))
    trigger = trigger_from_spec(summary["trigger"])
    state = {k.removeprefix(_STATE_PREFIX): v for k, v in tensors.items()
             if k.startswith(_STATE_PREFIX)}  # fmt: skip
    if trigger.fitted and trigger.state_keys and not state:
        raise VptlabError(
            f"{run_dir / POISON_INDICES_FILE} holds no learnt state of the fitted trigger "
            f"{trigger.name}: the poison record is incomplete"
        )
    if trigger.fitted or state:  # a plain trigger given a state: load_state names the keys
        trigger.load_state(state)
    return PoisonRecord(
        config=PoisonConfig.model_validate(summary["config"]),
        trigger=trigger,
        poisoned=tensors["poisoned"],  # older runs also hold fixed "cross" indices: not read
        original_labels=tensors["original_labels"],
        num_samples=int(summary["counts"]["samples"]),
        num_classes=int(summary["counts"]["classes"]),
        images=tensors.get("images"),
    )


def load_poison(run_dir: str | Path) -> tuple[torch.Tensor, Trigger, PoisonConfig]:
    """(poisoned indices in the train split, the trigger, the poison config with its seed) of a
    poisoned run; `load_poison_record` also gives their true labels."""
    record = load_poison_record(run_dir)
    return record.poisoned, record.trigger, record.config
