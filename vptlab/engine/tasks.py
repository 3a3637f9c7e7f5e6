"""Training objectives for the one loop: a task turns a batch into (loss, logits).

A task gets the model the step runs through (maybe wrapped in DDP or compiled) and the bare model
beside it: an inner attack (adversarial training) or a frozen teacher's hooks (distillation) run
on the bare model, so they neither trigger DDP's gradient sync nor recompile.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.data.loaders import Batch


class Task(Protocol):
    """What the loop asks of an objective; adversarial training and distillation are tasks too.

    A task may also define `set_progress(epochs_done: float)`: the loop then calls it before
    every step with the epoch plus the fraction of it done (vptlab/defenses/adversarial.py ramps
    its eps with it).
    """

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClassificationTask:
    """Cross-entropy on clean inputs, with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        return loss, logits
