"""Top-1 / top-5 accuracy of a classifier over a loader, computed in batches on the device."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """For each k, the number of samples whose label is among the k highest logits.

    k is capped at the number of classes.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(y[:, None])
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (in %) of `model` over `loader`.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    n, loss_sum, c1, c5 = 0, 0.0, 0, 0
    try:
        for x, y in loader:
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            h1, h5 = topk_correct(logits, y)
            c1, c5, n = c1 + h1, c5 + h5, n + len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "n": n}
