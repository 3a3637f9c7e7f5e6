"""What `fit` runs at the start of an epoch, before its first step: `EpochHook`s.

The one built in is `LabelRemap`: a pixel-prompted model's frequency label mapping is chosen from
the frozen model's predictions on the train split before the first epoch (`frequency`), or before
every epoch (`iterative`, ILM-VP's remapping as the prompt changes). Running it in the loop rather
than when the model is built means evaluation (`load_run`) never pays for it, and a resumed run
recomputes exactly what an uninterrupted one did: the mapping is saved with the prompt
(`learned_buffers`), a mid-epoch resume keeps it, an epoch boundary recomputes it.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn
from torch.utils.data import Dataset

from vptlab.data.base import TensorSplit
from vptlab.data.loaders import StreamLoader, TensorLoader
from vptlab.engine.distributed import all_reduce_sum
from vptlab.engine.evaluators import EvalContext, eval_loader


class EpochHook(Protocol):
    """Called with the bare model (not the DDP wrapper) and the 0-based epoch about to start."""

    def __call__(self, model: nn.Module, ctx: EvalContext, epoch: int) -> None: ...


class LabelRemap:
    """Re-choose a `PixelPrompted` model's frequency mapping from its predictions on `split`
    (in order, no augmentation, eval mode): at epoch 0 only, or every epoch with `every_epoch`.

    Each rank counts its shard of the split; the counts are summed over ranks, so every rank
    picks the same mapping.
    """

    def __init__(self, split: TensorSplit | Dataset, every_epoch: bool = False) -> None:
        self.split = split
        self.every_epoch = every_epoch
        self._loader: TensorLoader | StreamLoader | None = None

    def __call__(self, model: nn.Module, ctx: EvalContext, epoch: int) -> None:
        if epoch > 0 and not self.every_epoch:
            return
        if self._loader is None:
            self._loader = eval_loader(self.split, ctx)
        counts = model.prediction_counts(self._loader, ctx.amp_dtype)
        model.mapping.assign(all_reduce_sum(counts, ctx.dist))
