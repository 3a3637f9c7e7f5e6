"""Adapting a pretrained classifier: VPT prompts for ViTs and TinyViT, pixel prompts with label
mapping for any model, and the training modes.

Where prompts go in a given net is said by its prompt adapter (`sites.py`, built-ins in
`adapters.py`); `register_prompt_adapter` adds a backbone family without touching the VPT code.
"""

from __future__ import annotations

from vptlab.config import PromptConfig
from vptlab.models.base import count_parameters
from vptlab.prompts.adapt import (
    ADAPT_MODES,
    AdaptedClassifier,
    adapt,
    add_prompts,
    prompt_parameters,
)
from vptlab.prompts.label_mapping import MAPPINGS, LabelMapping
from vptlab.prompts.pixel import (
    PIXEL_PROMPTS,
    FullPrompt,
    PaddingPrompt,
    PatchPrompt,
    PixelPrompt,
    PixelPrompted,
    create_pixel_prompt,
    pixel_prompted,
)
from vptlab.prompts.sites import (
    PROMPT_ADAPTERS,
    PromptAdapter,
    PromptSite,
    TokenPromptSite,
    WindowPromptSite,
    find_prompt_adapter,
    prompt_site,
    register_prompt_adapter,
)
from vptlab.prompts.tinyvit import PromptedWindowAttention, add_tinyvit_prompts
from vptlab.prompts.vpt import VisualPrompt, add_vit_prompts

__all__ = [
    "ADAPT_MODES",
    "MAPPINGS",
    "PIXEL_PROMPTS",
    "FullPrompt",
    "LabelMapping",
    "PaddingPrompt",
    "PatchPrompt",
    "PixelPrompt",
    "PixelPrompted",
    "create_pixel_prompt",
    "pixel_prompted",
    "PROMPT_ADAPTERS",
    "AdaptedClassifier",
    "PromptAdapter",
    "PromptConfig",
    "PromptSite",
    "PromptedWindowAttention",
    "TokenPromptSite",
    "VisualPrompt",
    "WindowPromptSite",
    "adapt",
    "add_prompts",
    "add_tinyvit_prompts",
    "add_vit_prompts",
    "count_parameters",
    "find_prompt_adapter",
    "prompt_parameters",
    "prompt_site",
    "register_prompt_adapter",
]
