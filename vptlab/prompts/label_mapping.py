"""Output label mapping: how a frozen model's own classes (e.g. ImageNet's 1,000) answer a new
task's labels when only its input is prompted (Bahng et al. 2022; ILM-VP, Chen et al. 2023).

Kinds: `fixed` (target label j reads source class j), `frequency` (each target label reads the
source class its train images are most often predicted as, one-to-one), `iterative` (the same,
recomputed at the start of every epoch as the prompt changes) and `linear` (a learned linear
layer on the source logits). The index kinds select logits, so cross-entropy over the selected
ones trains the prompt as in the papers; nothing of the source head is changed.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from vptlab.errors import ConfigError

MAPPINGS = ("fixed", "frequency", "iterative", "linear")
# Kinds chosen from the frozen model's predictions on the train split (see `LabelMapping.assign`).
DATA_MAPPINGS = ("frequency", "iterative")


class LabelMapping(nn.Module):
    """(B, source_classes) logits -> (B, num_classes) logits.

    Index kinds keep `source_index` (num_classes,): target label j reads source class
    `source_index[j]` (the first `num_classes` classes until `assign` sets it). It is no parameter
    but is part of what a run learned, so it is listed in `learned_buffers`: checkpoints that hold
    only trained tensors save it too (vptlab/engine/checkpoint.py).
    """

    learned_buffers = ("source_index",)

    def __init__(self, kind: str, source_classes: int, num_classes: int) -> None:
        super().__init__()
        if kind not in MAPPINGS:
            raise ConfigError(
                f"adapt.pixel.mapping must be one of {', '.join(MAPPINGS)}; got {kind!r}"
            )
        if kind != "linear" and num_classes > source_classes:
            raise ConfigError(
                f"adapt.pixel.mapping {kind} maps each of the {num_classes} labels to its own "
                f"source class, but the model has {source_classes} (adapt.pixel.source_classes); "
                "use mapping linear"
            )
        self.kind = kind
        self.source_classes, self.num_classes = source_classes, num_classes
        self.register_buffer("source_index", torch.arange(num_classes))
        self.head = nn.Linear(source_classes, num_classes) if kind == "linear" else None

    @property
    def from_data(self) -> bool:
        """Whether the mapping is chosen from the frozen model's predictions (`assign`)."""
        return self.kind in DATA_MAPPINGS

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(logits)
        return logits[:, self.source_index]

    @torch.no_grad()
    def assign(self, counts: torch.Tensor) -> torch.Tensor:
        """Set the one-to-one mapping from `counts[j, s]`: how many train images of label j the
        model predicts as source class s. Returns the new `source_index`.

        The assignment maximizes the total count over one-to-one maps (Hungarian algorithm,
        scipy's `linear_sum_assignment`); a greedy pass (largest count first) gives the same on
        clear-cut counts but can trade a big match away for a small one when two labels want
        the same class.
        """
        expected = (self.num_classes, self.source_classes)
        if tuple(counts.shape) != expected:
            raise ValueError(f"counts must have shape {expected}, got {tuple(counts.shape)}")
        rows, cols = linear_sum_assignment(counts.double().cpu().numpy(), maximize=True)
        index = torch.empty(self.num_classes, dtype=torch.long)
        index[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        self.source_index.copy_(index)
        return self.source_index

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {self.source_classes} -> {self.num_classes}"


def prediction_counts(
    source_pred: torch.Tensor, labels: torch.Tensor, num_classes: int, source_classes: int
) -> torch.Tensor:
    """counts[j, s]: how many samples of label j have source prediction s (int64, on the CPU)."""
    flat = labels.long().cpu() * source_classes + source_pred.long().cpu()
    counts = torch.bincount(flat, minlength=num_classes * source_classes)
    return counts.view(num_classes, source_classes)
