"""A small Vision Transformer written here, attention included, with timm's attribute names
(`patch_embed`, `cls_token`, `pos_embed`, `blocks`, `norm`, `head`, ...) so the prompt-tuning and
distillation code that wraps timm's `VisionTransformer` works on it unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from vptlab.errors import ConfigError, DataError
from vptlab.models import MODELS, build_classifier
from vptlab.models.base import TokenIntermediates, run_blocks
from vptlab.models.pretrained import load_own_weights, resample_vit_state
from vptlab.models.simplenet import SCRATCH_MEAN, SCRATCH_STD


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., N, d) tensors; the reference for SDPA."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    weights = F.dropout(scores.softmax(dim=-1), dropout_p, training)
    return weights @ v


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, N, D) tokens: a conv with kernel = stride = patch size."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The position embedding is learned for one grid: another image size would silently
        # misalign it, so refuse it (timm's strict_img_size does the same).
        if tuple(x.shape[-2:]) != self.img_size:
            raise DataError(
                f"this ViT was built for {self.img_size[0]}x{self.img_size[1]} images, "
                f"got {x.shape[-2]}x{x.shape[-1]}; resize the data or rebuild with that img_size"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; `use_sdpa` picks PyTorch's fused kernel over `attention`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3D) -> three (B, heads, N, head_dim) tensors.
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            out = attention(q, k, v, dropout_p, self.training)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block, (B,N,D) -> (B,N,D): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, drop: float, use_sdpa: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, proj_drop=drop, use_sdpa=use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(TokenIntermediates, nn.Module):
    """ViT with a class token and a learned position embedding that covers it (timm's default);
    `forward_intermediates` (timm's signature) comes from `TokenIntermediates`."""

    def __init__(
        self,
        num_classes: int,
        img_size: int,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        drop_rate: float = 0.0,
        global_pool: str = "token",
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"model.global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.no_embed_class = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, drop_rate, use_sdpa) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's recipe: small truncated normals everywhere, a near-zero class token.
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def use_sdpa(self) -> bool:
        return all(block.attn.use_sdpa for block in self.blocks)

    @use_sdpa.setter
    def use_sdpa(self, value: bool) -> None:
        for block in self.blocks:
            block.attn.use_sdpa = value

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token to (B, N, D) patch tokens and add the position embedding."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D) tokens after the final norm."""
        x = self.patch_drop(self._pos_embed(self.patch_embed(x)))
        return self.norm(self.blocks(self.norm_pre(x)))

    def intermediate_tokens(
        self, x: torch.Tensor, indices: int | list[int] | None, stop_early: bool, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, taken = run_blocks(x, self.blocks, indices, stop_early)
        return (self.norm(x) if final else None), taken

    def token_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (or the pooled features with `pre_logits`)."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


@MODELS.register("vit-scratch")
def vit_scratch(
    num_classes: int,
    img_size: int = 224,
    pretrained: bool | str = False,
    keep_head: bool = False,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    drop_rate: float = 0.0,
    global_pool: str = "token",
    use_sdpa: bool = True,
) -> nn.Module:
    """Our ViT; `drop_rate` is used for every dropout but the attention weights'.

    `pretrained=path` loads a saved ViT of this family (ours or timm's layout), re-patched to
    `patch_size` and `img_size`.
    """
    if img_size % patch_size:
        raise ConfigError(
            f"model.img_size ({img_size}) must be a multiple of model.patch_size ({patch_size})"
        )
    if embed_dim % num_heads:
        raise ConfigError(
            f"model.embed_dim ({embed_dim}) must be a multiple of model.num_heads ({num_heads})"
        )
    net = VisionTransformer(
        num_classes,
        img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_rate=drop_rate,
        global_pool=global_pool,
        use_sdpa=use_sdpa,
    )
    load_own_weights("vit-scratch", net, pretrained, keep_head, adapt=resample_vit_state)
    return build_classifier(net, SCRATCH_MEAN, SCRATCH_STD)
