"""Per-sample predictions of a classifier over a loader, and the top-1 / top-5 accuracy they give.

`predict` keeps one row per sample (index, label, top-1 prediction, top-5 hit, loss), so clean
accuracy, robust accuracy and attack success rate (target class excluded) all come from one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.data.loaders import Batch

# An optional step between loader and model: an attack or a trigger, (model, x, y) -> x'.
InputTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """For each k, the number of samples whose label is among the k highest logits.

    k is capped at the number of classes.
    """
    hits = topk_hits(logits, y, max(ks))
    return [int(hits[:, : min(k, hits.shape[1])].any(dim=1).sum()) for k in ks]


def topk_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(B, min(k, classes)) bools: column j says whether the label is the (j+1)-th best guess."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return top.eq(y[:, None])


@dataclass
class Predictions:
    """One entry per evaluated sample, in loader order, on the CPU."""

    index: torch.Tensor  # (N,) int64 index of the sample in its split
    y: torch.Tensor  # (N,) int64 label the model was scored against
    pred: torch.Tensor  # (N,) int64 top-1 prediction
    top5: torch.Tensor  # (N,) bool: label among the 5 highest logits
    loss: torch.Tensor  # (N,) float64 cross-entropy

    def __len__(self) -> int:
        return len(self.y)

    @property
    def correct(self) -> torch.Tensor:
        return self.pred == self.y

    def summary(self) -> dict[str, float]:
        """Mean loss, top-1 and top-5 accuracy in %, and the sample count."""
        n = len(self)
        if n == 0:
            raise ValueError("no samples were evaluated (empty loader)")
        return {
            "loss": float(self.loss.sum()) / n,
            "top1": 100.0 * int(self.correct.sum()) / n,
            "top5": 100.0 * int(self.top5.sum()) / n,
            "n": n,
        }

    @staticmethod
    def cat(parts: Sequence[Predictions]) -> Predictions:
        return Predictions(
            *(torch.cat([getattr(p, f) for p in parts]) for f in Predictions.__dataclass_fields__)
        )


def predict(
    model: nn.Module,
    loader: Iterable[Batch],
    amp_dtype: torch.dtype | None = None,
    transform: InputTransform | None = None,
) -> Predictions:
    """Run `model` (in eval mode, restored afterwards) over `loader`; `transform` (an attack or
    a trigger) changes each batch's images first, outside no_grad so attacks can take gradients.
    """
    was_training = model.training
    model.eval()
    parts = []
    try:
        for batch in loader:
            x, y = batch.x, batch.y
            if transform is not None:
                x = transform(model, x, y)
            with torch.no_grad(), torch.autocast(
                x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None
            ):
                logits = model(x)
            logits = logits.float()
            hits = topk_hits(logits, y, 5)
            # Kept on the device until the end: a per-batch copy to the CPU is a sync each time.
            parts.append(
                Predictions(
                    index=batch.index,
                    y=y,
                    pred=logits.argmax(1),
                    top5=hits.any(dim=1),
                    loss=F.cross_entropy(logits, y, reduction="none").double(),
                )
            )
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("predict() got an empty loader")
    merged = Predictions.cat(parts)
    return Predictions(*(getattr(merged, f).cpu() for f in Predictions.__dataclass_fields__))


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (in %) of `model` over `loader`."""
    return predict(model, loader, amp_dtype).summary()
