"""Visual Prompt Tuning for TinyViT (timm `TinyVit`): prompt tokens shared by every window.

Why not the ViT recipe: TinyViT has no token sequence to prepend to. Its stage 0 is convolutional,
and stages 1..3 keep a (B, H, W, C) grid; each `TinyVitBlock` cuts it into windows, runs `Attention`
with a learned relative-position bias (`attention_biases`, sized for window x window tokens), then a
depthwise `local_conv` and the MLP on the grid. An extra token has no grid position there.

Design (after VPT's Swin variant, KMnP/vpt `swin_transformer.py`): each prompted block gets its own
`num_prompts` learnable tokens of the block's width. Its `attn` is replaced by
`PromptedWindowAttention`, which reuses the original module's `norm`, `qkv`, `proj` and
`attention_biases` (the same objects, so their state-dict names do not change) and computes, for
windows x of shape (B*nW, N, C):

    q = Q(norm(x)),  k = [K(norm(p)); K(norm(x))],  v = [V(norm(p)); V(norm(x))]
    out = proj(softmax(q k^T * scale + [0 | bias]) v)

Every window attends to the same prompts; prompt columns get zero position bias (they have no
place in the window), window columns keep TinyViT's bias. The prompts' k/v are computed once per
forward, not once per window. Only window tokens are queries: in ViT VPT-deep, a block's prompt
outputs are thrown away at the next block anyway, so a prompt influences the image tokens only as a
key/value of the block it is fed to; this is exactly that computation, per window. `deep` prompts
every attention block (or the flat attention-block indices in `depth`, counted over stages 1..3);
`shallow` prompts only the first attention block of the first attention stage. With zero prompts
no keys are added and the output equals timm's bit for bit (same fused/unfused attention path).

Trade-offs. (a) Shallow is weaker than ViT shallow VPT: the prompts cannot be carried to later
blocks, because `local_conv`, the MLP on the grid and the conv `PatchMerging` have no place for
them (Swin VPT carries them by averaging prompt outputs over windows and tiling them through patch
merging; that adds machinery for a variant that VPT itself found weaker). (b) A prompt *window*
per stage (extra grid cells) would go through local_conv and patch merging, but it only reaches
the windows it borders, and it changes the grid size every layer computes on. (c) Prefix keys/values
(learning k and v per head directly, prefix-tuning style) are more expressive per parameter, but
bypass the frozen norm/qkv that define what a token means to the pretrained block; prompts in the
token space keep VPT's meaning and parameter count (num_prompts * dim per block), and the cost is
small: P extra keys per window. Dropout on the prompts draws one mask per forward, shared by all
windows and samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import TinyVitBlock
from torch import nn

from vptlab.errors import ConfigError
from vptlab.prompts.sites import (
    WindowPromptSite,
    prompt_block_indices,
    prompt_init_bound,
    prompt_site,
)


class PromptedWindowAttention(nn.Module):
    """TinyViT window attention whose keys/values also include `num_prompts` learnable tokens."""

    def __init__(
        self,
        attn: TinyVitAttention,
        num_prompts: int,
        dropout: float = 0.0,
        init_bound: float = 0.1,
    ) -> None:
        super().__init__()
        # The very modules of the wrapped attention, registered under the same names: frozen weights
        # are shared (not copied) and a base checkpoint's keys still fit the prompted model.
        self.norm = attn.norm
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs, persistent=False)
        self.num_heads = attn.num_heads
        self.key_dim = attn.key_dim
        self.val_dim = attn.val_dim
        self.out_dim = attn.out_dim
        self.scale = attn.scale
        self.fused_attn = attn.fused_attn
        self.num_prompts = num_prompts
        dim = self.norm.normalized_shape[0]
        weight = attn.qkv.weight
        self.prompts = nn.Parameter(
            torch.empty(num_prompts, dim, device=weight.device, dtype=weight.dtype)
        )
        nn.init.uniform_(self.prompts, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (..., N, heads * (2 * key_dim + val_dim)) -> q, k, v (..., heads, N, d), as timm splits.
        *lead, n, _ = qkv.shape
        q, k, v = qkv.view(*lead, n, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=-1
        )
        return q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No eval-mode bias cache as in timm: indexing is cheap and a cache could go stale while the
        # backbone is fine-tuned (prompt+full).
        bias = self.attention_biases[:, self.attention_bias_idxs]
        B, N, _ = x.shape
        q, k, v = self._heads(self.qkv(self.norm(x)))
        if self.num_prompts:
            prompts = self.dropout(self.prompts).to(x.dtype)
            # (heads, P, d), computed once and shared by every window.
            _, pk, pv = self._heads(self.qkv(self.norm(prompts)))
            k = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
            bias = torch.cat([bias.new_zeros(self.num_heads, N, self.num_prompts), bias], dim=-1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = (attn + bias).softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, self.out_dim)
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"num_prompts={self.num_prompts}, dim={self.prompts.shape[-1]}"


def attention_blocks(net: nn.Module) -> list[TinyVitBlock]:
    """TinyViT's windowed-attention blocks in forward order (stage 0 is convolutional)."""
    return [m for m in net.stages.modules() if isinstance(m, TinyVitBlock)]


def add_tinyvit_prompts(
    net: nn.Module,
    num_prompts: int,
    deep: bool = True,
    depth: Sequence[int] | None = None,
    dropout: float = 0.0,
    site: WindowPromptSite | None = None,
) -> list[PromptedWindowAttention]:
    """Replace the chosen blocks' `attn` by `PromptedWindowAttention`; returns the new modules.

    `depth` indexes the attention blocks counted over all stages (e.g. 10 for tiny_vit_5m: 2+6+2);
    shallow prompts the first one only. Init: VPT's bound with the stem stride as patch size.
    """
    site = site or prompt_site(net)
    if not isinstance(site, WindowPromptSite):
        raise ConfigError(f"{type(net).__name__} is not a windowed transformer; use add_prompts")
    blocks = site.blocks
    if any(isinstance(b.attn, PromptedWindowAttention) for b in blocks):
        raise ConfigError("this model already has prompts; adapt a fresh model")
    indices = prompt_block_indices(deep, depth, len(blocks), "attention blocks")
    added = []
    for i in indices:
        block = blocks[i]
        bound = prompt_init_bound(site.patch_size, block.dim)
        block.attn = PromptedWindowAttention(block.attn, num_prompts, dropout, init_bound=bound)
        added.append(block.attn)
    return added
