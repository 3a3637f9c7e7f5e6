"""The built-in prompt adapters: timm's VisionTransformer, our vit-scratch, timm's TinyViT and
open_clip's visual tower. Each says, for its family, where VPT prompts go (prompts/sites.py)."""

from __future__ import annotations

import sys

from timm.layers import to_2tuple
from timm.models.tiny_vit import TinyVit
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from vptlab.models.vit_scratch import VisionTransformer as ScratchVisionTransformer
from vptlab.prompts.sites import (
    TokenPromptSite,
    WindowPromptSite,
    register_prompt_adapter,
)
from vptlab.prompts.tinyvit import attention_blocks


def _open_clip_tower(net: nn.Module) -> bool:
    # A net can only be open_clip's if open_clip is imported; checking sys.modules spares every
    # other net the (slow) import.
    module = sys.modules.get("open_clip.transformer")
    return module is not None and isinstance(net, module.VisionTransformer)


@register_prompt_adapter("open_clip VisionTransformer", _open_clip_tower)
def open_clip_site(net: nn.Module) -> TokenPromptSite:
    # The class token is prepended to (B, L, D) tokens, `ln_pre` normalizes them, and
    # `transformer.resblocks` run on (B, L, D) or, with batch_first=False, on (L, B, D).
    transformer = net.transformer
    return TokenPromptSite(
        blocks=transformer.resblocks,
        num_prefix_tokens=1,
        dim=int(transformer.width),
        patch_size=to_2tuple(net.patch_size),
        entry=net.ln_pre,
        batch_first=bool(getattr(transformer, "batch_first", True)),
    )


@register_prompt_adapter("timm TinyVit", lambda net: isinstance(net, TinyVit))
def tinyvit_site(net: nn.Module) -> WindowPromptSite:
    # Stage 0 is convolutional: the stem's stride stands in for the patch size of VPT's bound.
    return WindowPromptSite(
        blocks=attention_blocks(net), patch_size=to_2tuple(int(net.patch_embed.stride))
    )


def _vit_site(net: nn.Module) -> TokenPromptSite:
    # timm's names, which vit-scratch copies: norm_pre (a LayerNorm in CLIP-style ViTs, else an
    # Identity) runs between the embeddings and block 0.
    return TokenPromptSite(
        blocks=net.blocks,
        num_prefix_tokens=int(net.num_prefix_tokens),
        dim=int(net.embed_dim),
        patch_size=to_2tuple(net.patch_embed.patch_size),
        entry=net.norm_pre,
    )


register_prompt_adapter("timm VisionTransformer", lambda n: isinstance(n, TimmVisionTransformer))(
    _vit_site
)
register_prompt_adapter("vit-scratch", lambda n: isinstance(n, ScratchVisionTransformer))(_vit_site)
