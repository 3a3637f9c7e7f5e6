"""Adaptation modes: what of a pretrained ImageClassifier is trained (prompts, head, everything) and
how a frozen backbone is kept exactly as it was while the rest trains.
"""

from __future__ import annotations

from torch import nn

from vptlab.config import FROZEN_BACKBONE_MODES, PixelConfig, PromptConfig
from vptlab.errors import ConfigError
from vptlab.models.base import ImageClassifier
from vptlab.prompts.pixel import PixelPrompted, pixel_prompted
from vptlab.prompts.sites import TokenPromptSite, prompt_site
from vptlab.prompts.tinyvit import PromptedWindowAttention, add_tinyvit_prompts
from vptlab.prompts.vpt import VisualPrompt, add_vit_prompts

ADAPT_MODES = ("prompt", "linear", "full", "prompt+full", "pixel")
PROMPT_MODES = ("prompt", "prompt+full")
# In FROZEN_BACKBONE_MODES (config.py) the backbone also runs in eval mode while training (no
# dropout, drop-path or BatchNorm statistic updates), as in VPT, so its weights and buffers stay
# bit-identical.


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
        self.backbone_file, self.backbone_sha256 = model.backbone_file, model.backbone_sha256
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
    """Insert VPT prompts where the net's prompt adapter says; returns the modules holding them."""
    site = prompt_site(net)
    kwargs = dict(
        num_prompts=prompt.num_prompts, deep=prompt.deep, depth=prompt.depth, dropout=prompt.dropout
    )
    if isinstance(site, TokenPromptSite):
        return [add_vit_prompts(net, site=site, **kwargs)]
    return list(add_tinyvit_prompts(net, site=site, **kwargs))


def prompt_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (VisualPrompt, PromptedWindowAttention))]


def prompt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prompt tensors alone (e.g. for their own learning rate); the head is not included."""
    params = []
    for m in prompt_modules(model):
        params.append(m.embeddings if isinstance(m, VisualPrompt) else m.prompts)
    return params


def adapt(
    model: ImageClassifier,
    mode: str,
    prompt: PromptConfig | None = None,
    pixel: PixelConfig | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> AdaptedClassifier | PixelPrompted:
    """Prepare `model` for `mode` and return it wrapped; its net is changed in place (prompts).

    prompt: prompts and classifier train; linear: classifier only; full: every weight;
    prompt+full: every weight plus the prompts; pixel: a pixel prompt on the input and, with
    mapping linear, a head on the model's own logits (`PixelPrompted`; the model keeps its own
    classifier, `num_classes` task labels are mapped onto it, inputs are `img_size` pixels).
    `prompt` is read by the prompt modes only, `pixel` by pixel only.
    Frozen parameters get requires_grad=False, so `[p for p in m.parameters() if p.requires_grad]`
    is what to optimize and `save_model(m, path, trainable_only=True)` saves just those.
    """
    if mode not in ADAPT_MODES:
        raise ConfigError(f"adapt mode must be one of {', '.join(ADAPT_MODES)}; got {mode!r}")
    if isinstance(model, AdaptedClassifier | PixelPrompted):
        raise ConfigError(f"model is already adapted (mode {model.mode!r}); adapt a fresh model")
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"adapt expects an ImageClassifier, got {type(model).__name__}")
    if mode == "pixel":
        if num_classes is None or img_size is None:
            raise TypeError("adapt(mode='pixel') needs num_classes and img_size")
        return pixel_prompted(model, pixel or PixelConfig(), num_classes, img_size)
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

