"""Visual Prompt Tuning (Jia et al., ECCV 2022) for token-sequence ViTs: learnable tokens placed
right after the prefix (cls/register) tokens, once before block 0 (shallow) or anew at chosen
blocks.

Where the tokens go in a given net comes from its `TokenPromptSite` (prompts/sites.py); the net's
own forward runs unchanged, with forward hooks doing the insertion.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from vptlab.errors import ConfigError
from vptlab.prompts.sites import (
    TokenPromptSite,
    prompt_block_indices,
    prompt_init_bound,
    prompt_site,
)


class VisualPrompt(nn.Module):
    """Prompt tokens that forward hooks feed into a ViT's blocks.

    `embeddings[j]` is the set for block `block_indices[j]`: the first such block receives it right
    after the prefix tokens; every later one REPLACES the previous block's prompt outputs with its
    fresh set (VPT-deep); a block without a set of its own gets the previous block's prompt outputs
    (shallow VPT, or a block left out of `depth`).

    Every prompted block's output hands back the image tokens only (prefix + patches), the prompt
    outputs being kept aside for the next block. So whatever reads a block's output sees the
    backbone's token layout: the final norm and every pooling type (for 'token' pooling this equals
    VPT, whose head reads cls only; for 'avg' it keeps prompts out of the mean), and timm's
    `forward_intermediates`, which reshapes each block's tokens to the patch grid.

    Prompts starting at block 0 enter at the site's `entry` module (timm's `norm_pre`, open_clip's
    `ln_pre`) when it has one, so that pre-norm is applied to them exactly as to the patch tokens.
    """

    def __init__(
        self,
        dim: int,
        num_prompts: int,
        block_indices: Sequence[int],
        num_prefix_tokens: int,
        dropout: float = 0.0,
        init_bound: float = 0.1,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.num_prompts = num_prompts
        self.block_indices = tuple(block_indices)
        self.num_prefix_tokens = num_prefix_tokens
        self.batch_first = batch_first
        self.embeddings = nn.Parameter(torch.empty(len(self.block_indices), num_prompts, dim))
        nn.init.uniform_(self.embeddings, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout)
        self.num_blocks = 0  # set by attach
        self._enters_early = False  # set by attach: the first set goes in at the entry module
        # Prompt outputs of block i - 1, waiting for block i. Keyed by block, and kept until the
        # next forward overwrites them, so that activation checkpointing, which re-runs a segment
        # of blocks (and these hooks) during backward, finds what the segment's first block read.
        self._carried: dict[int, torch.Tensor] = {}

    def tokens(self, slot: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        # Expand before dropout, as VPT does: every sample draws its own dropout mask.
        prompts = self.embeddings[slot].to(like.dtype).expand(batch, -1, -1)
        return self.dropout(prompts)

    def _insert(self, x: torch.Tensor, prompts: torch.Tensor, batch_first: bool) -> torch.Tensor:
        n = self.num_prefix_tokens
        if batch_first:
            return torch.cat([x[:, :n], prompts, x[:, n:]], dim=1)
        return torch.cat([x[:n], prompts.transpose(0, 1), x[n:]], dim=0)

    # With zero prompts the hooks leave tensors untouched, memory layout included: a re-laid-out
    # tensor rounds differently in the pooling mean, and zero prompts must give the base model.
    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Pre-hook of the entry module: the first set joins the (B, L, D) sequence there."""
        if not self.num_prompts:
            return None
        x = args[0]
        return (self._insert(x, self.tokens(0, x.shape[0], x), True), *args[1:])

    def feed(self, index: int, block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Pre-hook of block `index`: its fresh set if it has one, else the carried outputs."""
        if not self.num_prompts:
            return None
        first = self.block_indices[0]
        if index == first and self._enters_early:
            return None  # already in the sequence since the entry module
        x = args[0]
        if index in self.block_indices:
            batch = x.shape[0] if self.batch_first else x.shape[1]
            prompts = self.tokens(self.block_indices.index(index), batch, x)
            return (self._insert(x, prompts, self.batch_first), *args[1:])
        carried = self._carried.get(index)
        if carried is None:
            raise RuntimeError(
                f"block {index} runs before block {index - 1} handed it prompt outputs; run the "
                "net's forward (or forward_intermediates), not a block on its own"
            )
        return (self._insert(x, carried, self.batch_first), *args[1:])

    def strip(
        self, index: int, block: nn.Module, args: tuple[Any, ...], out: torch.Tensor
    ) -> torch.Tensor | None:
        """Forward hook of block `index`: keep the prompt outputs aside, return the image tokens."""
        if not self.num_prompts:
            return None
        n, p = self.num_prefix_tokens, self.num_prompts
        if self.batch_first:
            prompts, image = out[:, n : n + p], torch.cat([out[:, :n], out[:, n + p :]], dim=1)
        else:
            prompts = out[n : n + p].transpose(0, 1)
            image = torch.cat([out[:n], out[n + p :]], dim=0)
        following = index + 1
        if following < self.num_blocks and following not in self.block_indices:
            self._carried[following] = prompts
        return image

    def attach(self, site: TokenPromptSite) -> None:
        """Register the hooks: bound methods, so `copy.deepcopy` of the model rebinds them."""
        blocks = site.blocks
        self.num_blocks = len(blocks)
        first = self.block_indices[0]
        self._enters_early = first == 0 and site.entry is not None
        if self._enters_early:
            site.entry.register_forward_pre_hook(self.enter)
        for index in range(first, len(blocks)):
            blocks[index].register_forward_pre_hook(partial(self.feed, index))
            blocks[index].register_forward_hook(partial(self.strip, index))

    def __getstate__(self) -> dict[str, Any]:
        # Carried prompt outputs belong to one forward (and may hold its graph): not copied.
        return {**super().__getstate__(), "_carried": {}}

    def extra_repr(self) -> str:
        return (
            f"num_prompts={self.num_prompts}, dim={self.embeddings.shape[-1]}, "
            f"blocks={list(self.block_indices)}, num_prefix_tokens={self.num_prefix_tokens}"
        )


def add_vit_prompts(
    net: nn.Module,
    num_prompts: int,
    deep: bool = True,
    depth: Sequence[int] | None = None,
    dropout: float = 0.0,
    site: TokenPromptSite | None = None,
) -> VisualPrompt:
    """Give a token-sequence ViT (timm, vit-scratch, open_clip's tower) VPT prompts, registered as
    `net.prompt`; `site` defaults to the one its prompt adapter gives.

    Shallow: one set before block 0, carried through every block. Deep: a fresh set at each block in
    `depth` (default all). The net keeps its modules, state-dict names and forward; only the hooks
    and the new `prompt` module (state-dict key `prompt.embeddings`) are added.
    """
    if hasattr(net, "prompt"):
        raise ConfigError("this model already has prompts; adapt a fresh model")
    site = site or prompt_site(net)
    if not isinstance(site, TokenPromptSite):
        raise ConfigError(f"{type(net).__name__} is not a token-sequence ViT; use add_prompts")
    indices = prompt_block_indices(deep, depth, len(site.blocks))
    prompt = VisualPrompt(
        site.dim,
        num_prompts,
        indices,
        num_prefix_tokens=site.num_prefix_tokens,
        dropout=dropout,
        init_bound=prompt_init_bound(site.patch_size, site.dim),
        batch_first=site.batch_first,
    )
    weight = next(net.parameters())
    prompt.to(device=weight.device, dtype=weight.dtype)
    net.prompt = prompt
    prompt.attach(site)
    return prompt
