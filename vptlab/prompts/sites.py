"""Where VPT prompts go in a given net, as a small typed description, and the registry of adapters
that produce it: a new backbone family gets prompts by registering one adapter, not by editing VPT.

Two kinds of site exist. A `TokenPromptSite` is a transformer over one token sequence (timm's
VisionTransformer, our vit-scratch, open_clip's visual tower): prompts are extra tokens after the
prefix tokens. A `WindowPromptSite` is a windowed transformer (TinyViT): prompts are extra keys and
values shared by every window. Adapters are tried in registration order; the first match wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from vptlab.errors import ConfigError


@dataclass(frozen=True)
class TokenPromptSite:
    """A token-sequence transformer, as VPT needs to see it.

    blocks: the transformer blocks in forward order; prompts enter at a block's input.
    num_prefix_tokens: class/register tokens before the patch tokens; prompts go right after them.
    dim: the token width. patch_size: (h, w) pixels per token, for VPT's init bound.
    entry: a module between the embeddings and block 0 whose input is the (B, L, D) token sequence
      (timm's `norm_pre`, open_clip's `ln_pre`); prompts starting at block 0 are inserted at its
      input, so they pass through it like the patch tokens do. None: at block 0's input.
    batch_first: the blocks take (B, L, D); False: (L, B, D), as older open_clip towers do.
    """

    blocks: Sequence[nn.Module]
    num_prefix_tokens: int
    dim: int
    patch_size: tuple[int, int]
    entry: nn.Module | None = None
    batch_first: bool = True


@dataclass(frozen=True)
class WindowPromptSite:
    """A windowed transformer: `blocks` are the attention blocks (each with `attn` and `dim`) in
    forward order; `patch_size` is the stem's stride, standing in for a patch in the init bound."""

    blocks: Sequence[nn.Module]
    patch_size: tuple[int, int]


PromptSite = TokenPromptSite | WindowPromptSite


@dataclass(frozen=True)
class PromptAdapter:
    """`matches(net)` says whether this adapter applies; `site(net)` describes where prompts go."""

    name: str
    matches: Callable[[nn.Module], bool]
    site: Callable[[nn.Module], PromptSite]


PROMPT_ADAPTERS: list[PromptAdapter] = []


def register_prompt_adapter(
    name: str, matches: Callable[[nn.Module], bool]
) -> Callable[[Callable[[nn.Module], PromptSite]], Callable[[nn.Module], PromptSite]]:
    """Decorator: `@register_prompt_adapter("my-vit", lambda net: isinstance(net, MyViT))`."""

    def decorator(site: Callable[[nn.Module], PromptSite]) -> Callable[[nn.Module], PromptSite]:
        if any(a.name == name for a in PROMPT_ADAPTERS):
            raise ValueError(f"prompt adapter '{name}' is registered twice")
        PROMPT_ADAPTERS.append(PromptAdapter(name, matches, site))
        return site

    return decorator


def find_prompt_adapter(net: nn.Module) -> PromptAdapter | None:
    # Imported here, not at the top: the adapters import timm/vptlab modules that import this one.
    from vptlab.prompts import adapters  # noqa: F401  (registers the built-in adapters)

    return next((a for a in PROMPT_ADAPTERS if a.matches(net)), None)


def prompt_site(net: nn.Module) -> PromptSite:
    """Where prompts go in `net`, or a ConfigError naming the nets that can be prompted."""
    adapter = find_prompt_adapter(net)
    if adapter is None:
        known = ", ".join(a.name for a in PROMPT_ADAPTERS)
        raise ConfigError(
            f"prompt adaptation needs a net with a prompt adapter ({known}); "
            f"{type(net).__name__} has none: use mode 'linear' or 'full'"
        )
    return adapter.site(net)


def prompt_init_bound(patch_size: int | Sequence[int], dim: int) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch_h * patch_w + dim)), Xavier for a patch."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return math.sqrt(6.0 / (3 * ph * pw + dim))


def prompt_block_indices(
    deep: bool, depth: Sequence[int] | None, num_blocks: int, what: str = "blocks"
) -> list[int]:
    """The blocks that get a fresh prompt set: shallow, block 0; deep, `depth` (None: all).

    The one place where `prompt.deep` and `prompt.depth` are checked, against the model's blocks.
    """
    if not deep:
        if depth is not None:
            raise ConfigError("prompt.depth applies to deep prompts only; set prompt.deep=true")
        return [0]
    if depth is None:
        return list(range(num_blocks))
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
