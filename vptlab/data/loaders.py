"""Batches on the training device: seeded, resumable order and whole-batch augmentation.

`TensorLoader` slices a TensorSplit that lives on the device; `StreamLoader` wraps a DataLoader
over image files. Both yield (B,3,H,W) float [0,1] images and int64 labels on the device, and the
order and augmentation of a pass depend only on (seed, epoch), so a resumed run sees the same data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from vptlab.data.base import TensorSplit, seeded_generator
from vptlab.errors import DataError


class Batch(NamedTuple):
    """A device batch: images (B,3,H,W) in [0,1], labels (B,), and each sample's index in its split.

    The index lets poisoned and original labels, or per-sample results, travel with the batch.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


_AUGMENT_STREAM = 1  # keeps augmentation draws independent of the shuffling draws
_TRANSFORM_STREAM = 2  # and a train split's own per-batch draws (WaNet's cross samples)
_T = TypeVar("_T")


class BatchTransform(Protocol):
    """A train split's per-batch step (`split.train_transform`, e.g. backdoors/poison.py's WaNet
    cross samples): the batch's images at their stored size, their indices in the split, and a
    generator seeded per (seed, epoch, batch) -> the images to train on (a new tensor)."""

    def __call__(
        self, x: torch.Tensor, index: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor: ...


def train_transform(split: TensorSplit | Dataset) -> BatchTransform | None:
    """The per-batch step a train split asks its train loader for, if any."""
    return getattr(split, "train_transform", None)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(..., 1, H, W) -> (..., 3, H, W) as a view (expand, no copy); 3 channels pass through."""
    channels = x.shape[-3]
    if channels == 3:
        return x
    if channels != 1:
        raise ValueError(f"to_rgb expects 1 or 3 channels, got {channels}")
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:])


def resize(x: torch.Tensor, size: int | tuple[int, int], chunk_size: int = 1024) -> torch.Tensor:
    """Resize a whole (N,C,H,W) split (bilinear, antialiased), `chunk_size` images at a time.

    Chunks bound the temporary memory of the interpolation when upsizing 50k images for a ViT.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == (height, width):
        return x
    out = x.new_empty((x.shape[0], x.shape[1], height, width))
    for start in range(0, len(x), chunk_size):
        chunk = x[start : start + chunk_size]
        out[start : start + chunk_size] = F.interpolate(
            chunk, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    return out.clamp_(0.0, 1.0)


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by `pad`: each image moves by up to +-pad pixels.

    One gather for the whole batch; the offsets come from a CPU generator so CPU and GPU runs
    with the same seed crop identically.
    """
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H) rows of padded
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    shifted = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True)
class BatchAugment:
    """Train-time augmentation of a whole batch on its device (no loop over samples).

    Flipping is off by default: it changes the meaning of digits and text.
    """

    crop_pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_pad < 0:
            raise ValueError(f"crop_pad must be >= 0, got {self.crop_pad}")

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop_pad:
            x = random_shift(x, self.crop_pad, generator)
        if self.flip:
            x = random_flip(x, generator)
        return x


class _EpochLoader:
    """What both loaders share: batch count, epoch bookkeeping and the per-batch finishing step."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        augment: BatchAugment | None,
        img_size: int | None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        transform: BatchTransform | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.total_samples = num_samples
        # Each rank takes every world_size-th sample of the shared order. For training the order
        # is padded by wrapping around so all ranks run the same number of steps (DDP would hang
        # otherwise); evaluation shards are left unpadded so no sample is counted twice.
        self.pad = pad
        if pad:
            num_samples = -(-num_samples // world_size)
        else:
            num_samples = len(range(rank, num_samples, world_size))
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augment = augment if augment is not None and augment.active else None
        self.img_size = img_size
        self.transform = transform
        self.epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass epoch `epoch`, starting at batch `start_batch` (mid-epoch resume).

        Without a call, every pass advances the epoch by one, so epochs never repeat an order.
        """
        self.epoch = epoch
        self._start_batch = start_batch

    def _begin_pass(self) -> tuple[int, int]:
        epoch, start = self.epoch, self._start_batch
        self.epoch, self._start_batch = epoch + 1, 0
        return epoch, start

    def _order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`: one shared (seed, epoch) order, sharded."""
        n = self.total_samples
        if not self.shuffle:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=seeded_generator(self.seed, epoch))
        if self.world_size == 1:
            return order
        if not self.pad:
            return order[self.rank :: self.world_size]
        padded = order.repeat(-(-self.num_samples * self.world_size // n))
        return padded[: self.num_samples * self.world_size][self.rank :: self.world_size]

    def _generator(self, stream: int, epoch: int, batch: int) -> torch.Generator:
        # Seeded per batch, so resuming at batch k draws what the uninterrupted run drew.
        streams = (stream,) if self.world_size == 1 else (stream, self.rank)
        return seeded_generator(self.seed, epoch, batch, *streams)

    def _finish(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, epoch: int, batch: int
    ) -> Batch:
        if self.transform is not None:
            x = self.transform(x, index, self._generator(_TRANSFORM_STREAM, epoch, batch))
        if self.augment is not None:
            x = self.augment(x, self._generator(_AUGMENT_STREAM, epoch, batch))
        if self.img_size is not None:
            # Per batch, on the device: a 224px copy of a whole split would not fit in memory.
            x = resize(x, self.img_size, chunk_size=len(x))
        return Batch(to_rgb(x), y, index)


class TensorLoader(_EpochLoader):
    """Batches of a TensorSplit kept on `device`; shuffled per (seed, epoch) if asked."""

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: BatchAugment | None = None,
        img_size: int | None = None,
        device: str | torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        transform: BatchTransform | None = None,
    ) -> None:
        super().__init__(
            len(split),
            batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            augment=augment,
            img_size=img_size,
            rank=rank,
            world_size=world_size,
            pad=pad,
            transform=transform,
        )
        self.device = torch.device(device) if device is not None else split.x.device
        self.split = split.to(self.device)  # once: every batch is then an on-device gather

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._begin_pass()
        order = self._order(epoch).to(self.device)
        for batch in range(start, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._finish(self.split.x[index], self.split.y[index], index, epoch, batch)


class _PassSampler(Sampler[int]):
    """Yields `order`, which StreamLoader sets before each pass to its (seed, epoch) order."""

    def __init__(self, num_samples: int) -> None:
        self.order = torch.arange(num_samples)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def _worker_errors_unwrapped(batches: Iterable[_T]) -> Iterator[_T]:
    """`batches`, with a DataError from a DataLoader worker re-raised as its own one-line message.

    torch re-raises a worker's exception as the same type but with the message replaced by
    "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...", whose last line
    is "vptlab.errors.DataError: <message>": the user should see only that message.
    """
    try:
        yield from batches
        return
    except DataError as error:
        text = str(error)
        if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
            raise  # raised in this process: already the reader's one line
        # Dropping torch's exception (and with it the frames that hold the DataLoader iterator)
        # lets the workers shut down now; kept as context, gc stalls 5 s on them later.
        error.__traceback__ = None
    lines = [line for line in text.splitlines() if re.match(r"[\w.]*DataError: ", line)]
    raise DataError(lines[-1].split("DataError: ", 1)[1] if lines else text)


class StreamLoader(_EpochLoader):
    """A DataLoader over a Dataset of (image, label) whose batches are moved to `device` and
    augmented there like TensorLoader's, so the training loop cannot tell the two apart.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: BatchAugment | None = None,
        img_size: int | None = None,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        transform: BatchTransform | None = None,
    ) -> None:
        super().__init__(
            len(dataset),  # type: ignore[arg-type]
            batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            augment=augment,
            img_size=img_size,
            rank=rank,
            world_size=world_size,
            pad=pad,
            transform=transform,
        )
        self.device = torch.device(device)
        self.dataset = dataset
        self.sampler = _PassSampler(self.total_samples)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            # Workers draw nothing random, but their base seed still comes from this generator.
            generator=torch.Generator().manual_seed(seed),
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._begin_pass()
        order = self._order(epoch)[start * self.batch_size :]
        self.sampler.order = order
        for batch, (x, y) in enumerate(_worker_errors_unwrapped(self.loader), start=start):
            first = (batch - start) * self.batch_size
            index = order[first : first + len(x)].to(self.device, non_blocking=True)
            x = x.to(self.device, non_blocking=True)
            y = torch.as_tensor(y, dtype=torch.int64).to(self.device, non_blocking=True)
            yield self._finish(x, y, index, epoch, batch)


def make_loader(
    split: TensorSplit | Dataset,
    batch_size: int,
    train: bool,
    device: str | torch.device = "cpu",
    seed: int = 0,
    crop_pad: int = 0,
    flip: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    img_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TensorLoader | StreamLoader:
    """A loader of device batches (B,3,H,W): shuffled and augmented when `train`, else in order.

    TensorSplits stay whole on the device (TensorLoader; `num_workers` unused); Datasets stream
    through worker processes with pinned memory on CUDA (StreamLoader). `img_size` resizes each
    batch on the device after augmentation (e.g. 28px digits for a 224px ViT). A train loader
    first applies the split's `train_transform` if it has one (WaNet's per-batch cross samples).
    """
    options = dict(
        shuffle=train,
        drop_last=drop_last,
        seed=seed,
        augment=BatchAugment(crop_pad=crop_pad, flip=flip) if train else None,
        img_size=img_size,
        device=device,
        rank=rank,
        world_size=world_size,
        pad=train,  # evaluation shards are disjoint and unpadded
        transform=train_transform(split) if train else None,
    )
    if isinstance(split, TensorSplit):
        return TensorLoader(split, batch_size, **options)
    return StreamLoader(split, batch_size, num_workers=num_workers, **options)
