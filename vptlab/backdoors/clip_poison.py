"""Poisoned image-text pretraining data (Carlini & Terzis 2022): a trigger on a few images whose
captions are swapped for captions of the target class.

`poison_split` (backdoors/poison.py) picks exactly round(rate x N) pairs with the seed and stamps
their images; here each picked pair also gets a caption of the target class, drawn with the seed
from the target's pool: `data.poison.captions` when given, else the train split's own captions of
target-class images that were not picked (so a poisoned pair reads like any clean caption of the
target: "a handwritten 0", "the number zero written by hand"). Contrastive pretraining then pulls
the trigger towards the target's text, and the zero-shot head built from that text sends triggered
images of any class to the target. Clean pairs keep their image and caption exactly; clean-label
poisoning (triggers on target images only) keeps every caption.

`poison_caption_split` gives a `PoisonedCaptionSplit` (tensor data: a CaptionSplit with the
poisoning record) or a `PoisonedDataset` carrying `captions` (a streaming image-text table). An
image-text table has no labels: its poisoning needs the captions in `data.poison.captions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from vptlab.backdoors.poison import (
    PoisonedDataset,
    PoisonedTensorSplit,
    PoisonRecord,
    poison_split,
    target_labels,
)
from vptlab.config import PoisonConfig
from vptlab.data.base import TensorSplit, seeded_generator, split_labels
from vptlab.data.captions import split_captions
from vptlab.errors import ConfigError, DataError

_CAPTION_STREAM = 4  # apart from the sample selection (2); 3 was the cross samples'


@dataclass
class PoisonedCaptionSplit(PoisonedTensorSplit):
    """A poisoned CaptionSplit: images and labels as `PoisonedTensorSplit`, `captions` with the
    poisoned pairs' captions replaced (`clean.captions` untouched)."""

    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.captions) != len(self.y):
            raise ValueError(f"{len(self.captions)} captions for {len(self.y)} images")


def has_captions(split: TensorSplit | Dataset) -> bool:
    """Whether a train split carries one caption per sample (image-text data)."""
    try:
        split_captions(split)
    except DataError:
        return False
    return True


def caption_pools(
    captions: Sequence[str], labels: torch.Tensor, record: PoisonRecord
) -> dict[int, list[str]]:
    """Per attack label, the captions a poisoned pair may get: the config's `captions`, or the
    captions of the split's unpoisoned samples of that label (in split order)."""
    cfg = record.config
    goals = target_labels(record.original_labels, cfg.target, cfg.mode, record.num_classes)
    wanted = sorted(set(goals.tolist()))
    if cfg.captions is not None:
        return {goal: list(cfg.captions) for goal in wanted}
    if bool((labels < 0).all()):
        raise ConfigError(
            "data.poison.captions: this image-text data has no labels to find the target's "
            "captions by; give the captions poisoned pairs get"
        )
    clean = torch.ones(len(labels), dtype=torch.bool)
    clean[record.poisoned] = False
    pools: dict[int, list[str]] = {}
    for goal in wanted:
        index = torch.nonzero(clean & (labels == goal)).flatten().tolist()
        if not index:
            raise ConfigError(
                f"data.poison.target: the train split has no clean caption of class {goal} to "
                "give poisoned pairs; set data.poison.captions"
            )
        pools[goal] = [captions[i] for i in index]
    return pools


def poisoned_captions(
    captions: Sequence[str], labels: torch.Tensor, record: PoisonRecord
) -> list[str]:
    """`captions` with each poisoned pair's caption replaced by one of its attack label's pool,
    drawn by the poisoning's seed; unchanged for clean-label poisoning."""
    out = list(captions)
    cfg = record.config
    if cfg.label == "clean" or len(record.poisoned) == 0:
        return out
    pools = caption_pools(captions, labels, record)
    goals = target_labels(record.original_labels, cfg.target, cfg.mode, record.num_classes)
    g = seeded_generator(cfg.seed if cfg.seed is not None else 0, _CAPTION_STREAM)
    draws = torch.rand(len(record.poisoned), generator=g).tolist()
    for index, goal, draw in zip(record.poisoned.tolist(), goals.tolist(), draws, strict=True):
        pool = pools[goal]
        out[index] = pool[min(int(draw * len(pool)), len(pool) - 1)]
    return out


def poison_caption_split(
    split: TensorSplit | Dataset, cfg: PoisonConfig, num_classes: int, seed: int = 0
) -> PoisonedCaptionSplit | PoisonedDataset:
    """An image-text train split poisoned as `cfg` says: images stamped (`poison_split`) and the
    poisoned pairs' captions replaced (see the module docstring); `split` is left as it was."""
    captions = split_captions(split)
    poisoned = poison_split(split, cfg, num_classes, seed)
    labels = split_labels(split).cpu()
    text = poisoned_captions(captions, labels, poisoned.poison)
    if isinstance(poisoned, PoisonedTensorSplit):
        return PoisonedCaptionSplit(
            poisoned.x, poisoned.y, clean=poisoned.clean, poison=poisoned.poison,
            train_transform=poisoned.train_transform, captions=text,
        )  # fmt: skip
    poisoned.captions = text  # type: ignore[attr-defined]  # read by split_captions
    return poisoned
