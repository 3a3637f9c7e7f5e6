"""Adaptation modes: what of a pretrained ImageClassifier is trained (prompts, head, everything) and
how a frozen backbone is kept exactly as it was while the rest trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vptlab.errors import ConfigError
from vptlab.models.base import ImageClassifier
from vptlab.prompts.tinyvit import PromptedWindowAttention, add_tinyvit_prompts, is_tinyvit
from vptlab.prompts.vpt import VisualPrompt, add_vit_prompts, is_vit_like

ADAPT_MODES = ("prompt", "linear", "full", "prompt+full")
PROMPT_MODES = ("prompt", "prompt+full")
# Modes whose backbone is frozen: it also runs in eval mode while training (no dropout, drop-path or
# BatchNorm statistic updates), as in VPT, so its weights and buffers stay bit-identical.
FROZEN_BACKBONE_MODES = ("prompt", "linear")


@dataclass
class PromptConfig:
    """VPT settings; `depth`: the blocks that get deep prompts (None: all; shallow: block 0)."""

    num_prompts: int = 10
    deep: bool = True
    depth: list[int] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_prompts < 0:
            raise ConfigError(f"prompt.num_prompts must be >= 0, got {self.num_prompts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"prompt.dropout must be in [0, 1), got {self.dropout}")
        if self.depth is not None and not self.deep:
            raise ConfigError("prompt.depth applies to deep prompts only; set prompt.deep=true")


class AdaptedClassifier(ImageClassifier):
    """The same normalization and net (shared, not copied), plus the adaptation mode.

    In a frozen-backbone mode `train()` puts only modules that own a trainable parameter (prompts,
    classifier) in train mode; the rest of the net stays in eval.
    """

    def __init__(self, model: ImageClassifier, mode: str) -> None:
        normalize = model.normalize
        mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
        super().__init__(model.net, mean, std)
        self.normalize = normalize  # the model's own module: same device and dtype as its net
        self.mode = mode

    def train(self, mode: bool = True) -> AdaptedClassifier:
        super().train(mode)
        if mode and self.mode in FROZEN_BACKBONE_MODES:
            self.net.train(False)
            # requires_grad is read live: a layer unfrozen later by a caller is trained properly.
            for module in self.net.modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.train(True)
        return self

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def add_prompts(net: nn.Module, prompt: PromptConfig) -> list[nn.Module]:
    """Insert VPT prompts into a ViT-like net or a TinyViT; returns the modules holding them."""
    kwargs = dict(
        num_prompts=prompt.num_prompts, deep=prompt.deep, depth=prompt.depth, dropout=prompt.dropout
    )
    # TinyViT first: it is recognised by its windowed-attention blocks, ViTs by blocks + cls_token.
    if is_tinyvit(net):
        return list(add_tinyvit_prompts(net, **kwargs))
    if is_vit_like(net):
        return [add_vit_prompts(net, **kwargs)]
    raise ConfigError(
        f"prompt adaptation needs a ViT-like net (blocks, cls_token, patch_embed) or a TinyViT "
        f"(stages of attention blocks); {type(net).__name__} is neither: "
        "use mode 'linear' or 'full'"
    )


def prompt_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (VisualPrompt, PromptedWindowAttention))]


def prompt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prompt tensors alone (e.g. for their own learning rate); the head is not included."""
    params = []
    for m in prompt_modules(model):
        params.append(m.embeddings if isinstance(m, VisualPrompt) else m.prompts)
    return params


def adapt(
    model: ImageClassifier, mode: str, prompt: PromptConfig | None = None
) -> AdaptedClassifier:
    """Prepare `model` for `mode` and return it wrapped; its net is changed in place (prompts).

    prompt: prompts and classifier train; linear: classifier only; full: every weight;
    prompt+full: every weight plus the prompts. `prompt` is ignored by linear and full.
    Frozen parameters get requires_grad=False, so `[p for p in m.parameters() if p.requires_grad]`
    is what to optimize and `save_model(m, path, trainable_only=True)` saves just those.
    """
    if mode not in ADAPT_MODES:
        raise ConfigError(f"adapt mode must be one of {', '.join(ADAPT_MODES)}; got {mode!r}")
    if isinstance(model, AdaptedClassifier):
        raise ConfigError(f"model is already adapted (mode {model.mode!r}); adapt a fresh model")
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"adapt expects an ImageClassifier, got {type(model).__name__}")
    if mode in PROMPT_MODES:
        add_prompts(model.net, prompt or PromptConfig())

    train_all = mode in ("full", "prompt+full")
    model.requires_grad_(train_all)
    for param in prompt_parameters(model):
        param.requires_grad_(True)
    if not train_all:
        model.get_classifier().requires_grad_(True)
    adapted = AdaptedClassifier(model, mode)
    adapted.train(model.training)
    return adapted


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
