"""Adapting a pretrained classifier: VPT prompts for ViTs and TinyViT, and the training modes."""

from __future__ import annotations

from vptlab.prompts.adapt import (
    ADAPT_MODES,
    AdaptedClassifier,
    PromptConfig,
    adapt,
    add_prompts,
    count_parameters,
    prompt_parameters,
)
from vptlab.prompts.tinyvit import PromptedWindowAttention, add_tinyvit_prompts
from vptlab.prompts.vpt import VisualPrompt, add_vit_prompts

__all__ = [
    "ADAPT_MODES",
    "AdaptedClassifier",
    "PromptConfig",
    "PromptedWindowAttention",
    "VisualPrompt",
    "adapt",
    "add_prompts",
    "add_tinyvit_prompts",
    "add_vit_prompts",
    "count_parameters",
    "prompt_parameters",
]
