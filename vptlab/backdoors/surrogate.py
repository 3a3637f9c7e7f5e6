"""The clean model a fitted trigger is learnt from (TrojanNN's neurons, label-consistent's
adversarial perturbations): a SimpleNet trained on the clean train split by a plain seeded AdamW
loop on the CPU, a few seconds on 4,000 28x28 digits.

The attacker's own model, not the victim: the papers fit their triggers on a clean model of the
same task (BackdoorBench ships one per dataset and architecture), and a small SimpleNet at the
split's stored size and channels is what every run here can afford before it trains.
"""

from __future__ import annotations

import torch
from torch import nn

from vptlab.data.base import seeded_generator
from vptlab.errors import ConfigError
from vptlab.models import build_classifier
from vptlab.models.simplenet import SCRATCH_MEAN, SCRATCH_STD, SMALL_IMAGE, SimpleNet

_SURROGATE_STREAM = 3  # apart from the trigger's pattern (1) and the poison draws (2)


def surrogate_model(x: torch.Tensor, num_classes: int) -> nn.Module:
    """The untrained surrogate for images like x (N,C,H,W): a SimpleNet for their channels
    (its stem's stride by their short side) behind its normalization. Its weights are drawn
    from the global RNG: seed (or fork) it first."""
    channels, size = int(x.shape[1]), min(int(x.shape[-2]), int(x.shape[-1]))
    net = SimpleNet(num_classes, in_chans=channels, stem_stride=1 if size < SMALL_IMAGE else 2)
    return build_classifier(net, SCRATCH_MEAN[:1] * channels, SCRATCH_STD[:1] * channels)


def train_surrogate(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    seed: int,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
) -> nn.Module:
    """A SimpleNet for (x (N,C,H,W) in [0,1], y (N,) int64), any channel count, trained with
    AdamW (the mnist preset's lr 3e-3 and weight decay 0.01) for `epochs` over batches shuffled
    by `seed`, on the CPU with the weights initialised from `seed` (the global RNG is left as it
    was). Returned in eval mode with requires_grad off."""
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"surrogate: expected (N,C,H,W) images and N labels, got "
                          f"{tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
    if epochs < 1:
        raise ConfigError(f"surrogate epochs must be >= 1, got {epochs}")
    g = seeded_generator(seed, _SURROGATE_STREAM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        model = surrogate_model(x, num_classes)
    x, y = x.detach().float().cpu(), y.detach().long().cpu()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model
