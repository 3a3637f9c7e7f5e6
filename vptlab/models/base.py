"""The model contract: pixels in [0,1] go in, logits come out; each model owns its normalization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel; constants, so they are kept out of checkpoints."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Normalization followed by a backbone `net` that follows timm's conventions.

    `net` must provide `forward`, `forward_features`, `forward_head(features, pre_logits=False)` and
    `get_classifier()`; ViT-like nets also have `forward_intermediates` (timm's signature), which
    feature-based defenses hook into. Where prompts go is said by prompt adapters (prompts/).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        # The weights file the net was built from, and its sha256 (set by `create_model`): a
        # checkpoint of prompts or a head alone is only valid on that very backbone.
        self.backbone_file: str | None = None
        self.backbone_sha256: str | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Extra arguments go to the net: an image-text net takes `text=` tokens for its
        # contrastive forward (models/clip.py), which must run through the DDP wrapper.
        return self.net(self.normalize(x), *args, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The net's `forward_intermediates` (timm's signature) on pixels in [0, 1]."""
        return self.net.forward_intermediates(self.normalize(x), *args, **kwargs)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
