"""Visual Prompt Tuning (Jia et al., ECCV 2022) for ViT-like nets: learnable tokens placed right
after the prefix (cls/register) tokens, once before block 0 (shallow) or anew at chosen blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from vptlab.errors import ConfigError


def prompt_init_bound(patch_size: int | Sequence[int], dim: int) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch_h * patch_w + dim)), Xavier for a patch."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return math.sqrt(6.0 / (3 * ph * pw + dim))


def check_depth(depth: Sequence[int], num_blocks: int, what: str = "blocks") -> list[int]:
    """Sorted, validated block indices for deep prompts."""
    depth = list(depth)
    if not depth:
        raise ConfigError("prompt.depth must list at least one block index (or be null for all)")
    bad = [i for i in depth if not isinstance(i, int) or not 0 <= i < num_blocks]
    if bad:
        raise ConfigError(
            f"prompt.depth indices must be in [0, {num_blocks}) for this model's {num_blocks} "
            f"{what}, got {bad}"
        )
    if len(set(depth)) != len(depth):
        raise ConfigError(f"prompt.depth has repeated indices: {depth}")
    return sorted(depth)


class VisualPrompt(nn.Module):
    """Prompt tokens that forward hooks feed into a ViT's blocks; the net's own forward runs as is.

    `embeddings[j]` is the set for block `block_indices[j]`: the first such block receives it right
    after the prefix tokens; every later one REPLACES the previous block's prompt outputs with its
    fresh set (VPT-deep). The last block's output drops the prompts, so the final norm, every
    pooling type and `forward_features` see exactly the backbone's tokens (for 'token' pooling this
    equals VPT, whose head reads cls only; for 'avg' it keeps prompts out of the mean).
    """

    def __init__(
        self,
        dim: int,
        num_prompts: int,
        block_indices: Sequence[int],
        num_prefix_tokens: int,
        dropout: float = 0.0,
        init_bound: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_prompts = num_prompts
        self.block_indices = tuple(block_indices)
        self.num_prefix_tokens = num_prefix_tokens
        self.embeddings = nn.Parameter(torch.empty(len(self.block_indices), num_prompts, dim))
        nn.init.uniform_(self.embeddings, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout)

    def tokens(self, slot: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        # Expand before dropout, as VPT does: every sample draws its own dropout mask.
        prompts = self.embeddings[slot].to(like.dtype).expand(batch, -1, -1)
        return self.dropout(prompts)

    # With zero prompts the hooks leave tensors untouched, memory layout included: a re-laid-out
    # tensor rounds differently in the pooling mean, and zero prompts must give the base model.
    def insert(self, block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.num_prompts:
            return None
        x, n = args[0], self.num_prefix_tokens
        x = torch.cat([x[:, :n], self.tokens(0, x.shape[0], x), x[:, n:]], dim=1)
        return (x, *args[1:])

    def replace(self, slot: int, block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.num_prompts:
            return None
        x, n = args[0], self.num_prefix_tokens
        x = torch.cat([x[:, :n], self.tokens(slot, x.shape[0], x), x[:, n + self.num_prompts :]], 1)
        return (x, *args[1:])

    def remove(self, block: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if not self.num_prompts:
            return out
        n = self.num_prefix_tokens
        return torch.cat([out[:, :n], out[:, n + self.num_prompts :]], dim=1)

    def attach(self, blocks: Sequence[nn.Module]) -> None:
        """Register the hooks: bound methods, so `copy.deepcopy` of the model rebinds them."""
        first, *rest = self.block_indices
        blocks[first].register_forward_pre_hook(self.insert)
        for slot, index in enumerate(rest, start=1):
            blocks[index].register_forward_pre_hook(partial(self.replace, slot))
        blocks[len(blocks) - 1].register_forward_hook(self.remove)

    def extra_repr(self) -> str:
        return (
            f"num_prompts={self.num_prompts}, dim={self.embeddings.shape[-1]}, "
            f"blocks={list(self.block_indices)}, num_prefix_tokens={self.num_prefix_tokens}"
        )


def is_vit_like(net: nn.Module) -> bool:
    return all(hasattr(net, a) for a in ("blocks", "cls_token", "patch_embed", "num_prefix_tokens"))


def add_vit_prompts(
    net: nn.Module,
    num_prompts: int,
    deep: bool = True,
    depth: Sequence[int] | None = None,
    dropout: float = 0.0,
) -> VisualPrompt:
    """Give a timm-style VisionTransformer (or vit-scratch) VPT prompts, registered as `net.prompt`.

    Shallow: one set before block 0, carried through every block. Deep: a fresh set at each block in
    `depth` (default all). The net keeps its modules, state-dict names and forward; only the hooks
    and the new `prompt` module (state-dict key `prompt.embeddings`) are added.
    """
    if hasattr(net, "prompt"):
        raise ConfigError("this model already has prompts; adapt a fresh model")
    num_blocks = len(net.blocks)
    if deep:
        indices = check_depth(range(num_blocks) if depth is None else depth, num_blocks)
    else:
        if depth is not None:
            raise ConfigError("prompt.depth applies to deep prompts only; set prompt.deep=true")
        indices = [0]
    dim = int(net.embed_dim)
    prompt = VisualPrompt(
        dim,
        num_prompts,
        indices,
        num_prefix_tokens=int(net.num_prefix_tokens),
        dropout=dropout,
        init_bound=prompt_init_bound(net.patch_embed.patch_size, dim),
    )
    weight = next(net.parameters())
    prompt.to(device=weight.device, dtype=weight.dtype)
    net.prompt = prompt
    prompt.attach(net.blocks)
    return prompt
