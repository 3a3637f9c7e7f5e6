"""CLIP's symmetric InfoNCE against a value computed by hand, and the contrastive task's lookup."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vptlab.data.loaders import Batch
from vptlab.engine.tasks import ContrastiveTask, clip_loss


def _infonce_by_hand(image: np.ndarray, text: np.ndarray, scale: float) -> float:
    """Loops over pairs: -log softmax of the matching pair, per row, both directions."""
    n = len(image)
    total = 0.0
    for i in range(n):
        row_it = [scale * sum(image[i][d] * text[j][d] for d in range(image.shape[1]))
                  for j in range(n)]  # fmt: skip
        row_ti = [scale * sum(text[i][d] * image[j][d] for d in range(image.shape[1]))
                  for j in range(n)]  # fmt: skip
        total += -(row_it[i] - math.log(sum(math.exp(v) for v in row_it)))
        total += -(row_ti[i] - math.log(sum(math.exp(v) for v in row_ti)))
    return total / (2 * n)


def test_infonce_equals_hand_computed_value() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(7.5, dtype=torch.float64)
    loss, logits = clip_loss(image, text, scale)
    expected = _infonce_by_hand(image.numpy(), text.numpy(), 7.5)
    assert abs(float(loss) - expected) < 1e-6
    assert logits.shape == (5, 5)


def test_infonce_of_two_orthogonal_pairs() -> None:
    # Two perfectly separated pairs at scale s: each row's loss is log(1 + exp(-s)).
    image = torch.eye(2)
    loss, _ = clip_loss(image, image.clone(), torch.tensor(3.0))
    assert abs(float(loss) - math.log(1 + math.exp(-3.0))) < 1e-6


class _Echo(torch.nn.Module):
    """A stand-in model: image features from pixels, text features from token ids."""

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.seen_text = text
        feats = F.normalize(x.flatten(1)[:, :4], dim=1)
        return feats, F.normalize(text[:, :4].float(), dim=1), torch.tensor(10.0)


def test_contrastive_task_takes_the_captions_of_the_batch_index() -> None:
    tokens = torch.arange(40).view(10, 4)
    task = ContrastiveTask(tokens)
    model = _Echo()
    batch = Batch(torch.rand(3, 3, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([7, 2, 5]))
    loss, logits = task.loss(model, batch, model)
    assert torch.equal(model.seen_text, tokens[[7, 2, 5]])
    assert loss.ndim == 0 and logits.shape == (3, 3)
    assert 0 <= int(task.correct(logits, batch)) <= 3
