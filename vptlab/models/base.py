"""The model contract: pixels in [0,1] go in, logits come out; each model owns its normalization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import nn

from vptlab.errors import ConfigError

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

    `net` must provide `forward`, `forward_features`, `forward_head(features, pre_logits=False)`,
    `get_classifier()` and `forward_intermediates` (timm's signature, see `TokenIntermediates` and
    `run_blocks`), which feature-based defenses hook into. Where prompts go is said by prompt
    adapters (prompts/).
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
        """The net's `forward_intermediates` (timm's signature) on pixels in [0, 1]: a list of
        the chosen blocks' outputs (`indices`: the last n if an int, all if None, else those
        indices), or (final features, that list) unless `intermediates_only`. The final
        features are what `forward_features` gives, so `forward_head(final)` is the logits."""
        return self.net.forward_intermediates(self.normalize(x), *args, **kwargs)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


Intermediates = list[Any] | tuple[torch.Tensor, list[Any]]


def run_blocks(
    x: torch.Tensor,
    blocks: Sequence[nn.Module],
    indices: int | Sequence[int] | None = None,
    stop_early: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`x` through `blocks` in order: (the last output, the outputs of the blocks `indices`
    picks). timm's convention (`feature_take_indices`): the last n blocks if an int, all if None,
    else those indices (negative ones count from the end); outputs come in block order.
    `stop_early` stops after the last block picked, so the last output is that block's."""
    take, last = feature_take_indices(len(blocks), indices)
    taken = []
    for i, block in enumerate(blocks[: last + 1] if stop_early else blocks):
        x = block(x)
        if i in take:
            taken.append(x)
    return x, taken


def intermediates_result(
    final: torch.Tensor | None, taken: list[Any], intermediates_only: bool
) -> Intermediates:
    """timm's return shape: the intermediates alone, or (final features, intermediates)."""
    if intermediates_only:
        return taken
    assert final is not None
    return final, taken


def check_output_fmt(output_fmt: str, allowed: Sequence[str] = ("NCHW", "NLC")) -> None:
    if output_fmt not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise ConfigError(f"output_fmt must be {choices}, got {output_fmt!r}")


class StagedCNN(nn.Module):
    """A CNN of stages (`stage_modules()`, each (B, C, H, W) -> (B, C', H', W')) with timm's
    CNN `forward_intermediates`: one output per stage; `norm` is accepted and does nothing (no
    final norm), the last stage's output is the final features."""

    def stage_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        check_output_fmt(output_fmt, ("NCHW",))
        x, taken = run_blocks(x, self.stage_modules(), indices, stop_early)
        return intermediates_result(x, taken, intermediates_only)


class TokenIntermediates:
    """timm's `forward_intermediates` for a net whose blocks map (B, L, D) tokens to tokens, the
    first `num_prefix_tokens` of them class (or register) tokens and the rest a patch grid.

    A net supplies `intermediate_tokens` (run its blocks through `run_blocks`), `token_norm` (its
    final norm), `token_grid` (the patch grid of an input) and `num_prefix_tokens`; the prefix
    split, the grid reshape and the return shape are done once, here.
    """

    num_prefix_tokens: int

    def intermediate_tokens(
        self, x: torch.Tensor, indices: int | list[int] | None, stop_early: bool, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(final features, or None when not `final`; the chosen blocks' (B, L, D) outputs)."""
        raise NotImplementedError

    def token_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        raise NotImplementedError

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        """Every chosen block's output, in timm's signature (NAD, fine-pruning hook in here).

        indices: the last n blocks if an int, all if None, else those block indices. The patch
        tokens come as (B, D, H, W) ('NCHW') or (B, N, D) ('NLC'), paired with the prefix tokens
        if `return_prefix_tokens`; `norm` applies the final norm. Returns (final features, as
        `forward_features` gives them, intermediates), or the intermediates alone.
        """
        check_output_fmt(output_fmt)
        h, w = self.token_grid(x)
        final, taken = self.intermediate_tokens(x, indices, stop_early, not intermediates_only)
        if norm:
            taken = [self.token_norm(y) for y in taken]
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in taken]
        patches = [y[:, n:] for y in taken]
        if output_fmt == "NCHW":
            patches = [
                y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in patches
            ]
        out: list[Any] = patches
        if return_prefix_tokens:
            out = list(zip(patches, prefix, strict=True))
        return intermediates_result(final, out, intermediates_only)
