"""What every dataset returns: [0,1] float images (N,C,H,W) and int64 labels, split by a seed.

Also the dataset registry and the small seeded helpers every reader shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from vptlab.errors import DataError
from vptlab.registry import Registry


@dataclass
class TensorSplit:
    """A split small enough to live as tensors on the training device."""

    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1], C is 1 or 3
    y: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or len(self.x) != len(self.y):
            raise ValueError(
                f"TensorSplit needs x (N,C,H,W) and y (N,), got {tuple(self.x.shape)} and "
                f"{tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device))

    def take(self, index: torch.Tensor) -> TensorSplit:
        """The samples at `index`, in that order (subclasses carry their per-sample fields)."""
        return TensorSplit(self.x[index], self.y[index])


@dataclass
class DataSplits:
    """Train and test splits of one dataset; a split is a TensorSplit or a streaming Dataset."""

    name: str
    train: TensorSplit | Dataset
    test: TensorSplit | Dataset
    num_classes: int
    classes: list[str] = field(default_factory=list)
    # Zero-shot prompt templates with one `{}` for a class name ("a photo of the digit {}."):
    # how an image-text model classifies the test split; empty: models/clip.py's defaults.
    templates: list[str] = field(default_factory=list)
    # Samples held out of the train split before training (`hold_out`), never trained on: what
    # the robust probe of adversarial training measures and selects on (never the test split).
    probe: TensorSplit | Dataset | None = None


DATASETS = Registry[DataSplits]("dataset")


def seeded_generator(*seed: int) -> torch.Generator:
    """A CPU generator from a tuple of ints (seed, epoch, stream...), well mixed by SeedSequence.

    CPU on purpose: the same seed then gives the same order and augmentation on any device.
    """
    state = np.random.SeedSequence(list(seed)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=seeded_generator(seed))


def stratified_split(
    y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test), each class split by `test_fraction`, both shuffled by the seed.

    Stratified so that even a small test split holds every class in its true proportion.
    """
    g = seeded_generator(seed)
    train_parts, test_parts = [], []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_test = round(len(members) * test_fraction)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train, test = torch.cat(train_parts), torch.cat(test_parts)
    # Labels came grouped by class above: shuffle so no split is ever sorted by label.
    return (
        train[torch.randperm(len(train), generator=g)],
        test[torch.randperm(len(test), generator=g)],
    )


def subset(split: TensorSplit | Dataset, n: int | None, seed: int) -> TensorSplit | Dataset:
    """A seeded random subset of `n` samples (the whole split when n is None or >= its size)."""
    size = len(split)  # type: ignore[arg-type]
    if n is None or n >= size:
        return split
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    index = seeded_permutation(size, seed)[:n]
    if isinstance(split, TensorSplit):
        return TensorSplit(split.x[index], split.y[index])
    return Subset(split, index.tolist())


_HOLD_OUT_STREAM = 2  # keeps the held-out draw independent of the readers' split draws


def hold_out(
    split: TensorSplit | Dataset, n: int, seed: int
) -> tuple[TensorSplit | Dataset, TensorSplit | Dataset]:
    """(rest, held): `n` samples of `split` drawn by the seed, and the split without them.

    The rest keeps the split's order, so only the held samples leave it; the same split and seed
    give the same two parts on every call (a resumed or reloaded run, every DDP rank).
    """
    size = len(split)  # type: ignore[arg-type]
    if not 1 <= n < size:
        raise ValueError(f"can hold out 1 to {size - 1} of {size} samples, got {n}")
    held = torch.randperm(size, generator=seeded_generator(seed, _HOLD_OUT_STREAM))[:n]
    keep = torch.ones(size, dtype=torch.bool)
    keep[held] = False
    rest = torch.nonzero(keep).flatten()
    if isinstance(split, TensorSplit):
        return split.take(rest), split.take(held)
    return Subset(split, rest.tolist()), Subset(split, held.tolist())


def uint8_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)


def int64_labels(labels: Sequence[int] | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


def require_root(dataset: str, root: str | None, expected: str) -> Path:
    """The user's folder as a Path, or one DataError that says what belongs there."""
    if root is None:
        raise DataError(
            f"{dataset}: expected {expected} in a local folder; no root folder was given"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{dataset}: expected {expected} under {path}; that folder does not exist")
    return path


def split_labels(split: TensorSplit | Dataset) -> torch.Tensor:
    """A split's labels (N,) int64: a TensorSplit's y, a Dataset's `targets` (through Subsets),
    or else every item's label (reads each sample once)."""
    if isinstance(split, TensorSplit):
        return split.y
    if isinstance(split, Subset):
        return split_labels(split.dataset)[torch.as_tensor(split.indices, dtype=torch.int64)]
    targets = getattr(split, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.int64)
    return torch.as_tensor([int(split[i][1]) for i in range(len(split))], dtype=torch.int64)
