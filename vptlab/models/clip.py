"""Image-text (CLIP) models through open_clip, as ordinary vptlab classifiers.

A CLIP model is an `ImageClassifier` whose net is a `CLIPNet`: the image tower followed by a
zero-shot head (class-name prompts through the text tower, averaged over a template ensemble,
normalized). So `model(x)` maps (B,3,H,W) pixels in [0,1] to logits, and every attack, trigger,
repairer and `evaluate_suite` uses it unchanged. The text side is reached through `model.net`
(adapted or not): `encode_text`, `tokenize`, `logit_scale`, `set_zero_shot_head`, and
`model(x, text=tokens)`, the contrastive forward that training runs through DDP.

Registered: `clip` (open_clip's named architectures: RN50, ViT-B-32 ...; `pretrained=True`
downloads the `tag` weights, a path loads a local file) and `clip-tiny` (a small ViT and a small
text transformer that pretrain on CPU in minutes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.errors import ConfigError
from vptlab.models import MODELS, build_classifier
from vptlab.models.base import ImageClassifier, TokenIntermediates
from vptlab.models.pretrained import StateDict, load_backbone_state, read_state_dict

# CLIP clamps its learned temperature so logits are scaled by at most 100 (Radford et al. 2021).
MAX_LOGIT_SCALE = math.log(100.0)
# The zero-shot templates used when a dataset names none (a short form of CLIP's ensemble).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of the {}.")
# The registered image-text models (their classifier is the text tower's class embeddings).
IMAGE_TEXT_MODELS = ("clip", "clip-tiny")
_MAX_WRAPPERS = 4  # how deep `find_clip_net` looks through wrappers (prompt, classifier, net)


class ZeroShotHead(nn.Module):
    """Logits = scale x cos(image embedding, class embedding); fixed, not trained.

    Buffers, saved with the model: a checkpoint holds the head it was evaluated with, so a loaded
    run classifies exactly as it did when it was written.
    """

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, embed_dim))
        self.register_buffer("scale", torch.tensor(100.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features, dim=-1)
        return self.scale * features @ self.weight.to(features.dtype).T

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, embed_dim={self.weight.shape[1]}"


class LinearProbeHead(ZeroShotHead):
    """A linear probe on the frozen image embeddings: ZeroShotHead's scaled cosine logits with
    trainable class vectors and biases, started at the zero-shot classifier (`set_zero_shot_head`
    copies the class prompts' embeddings in), so training starts from zero-shot accuracy."""

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__(num_classes, embed_dim)
        del self.weight  # the buffer becomes a parameter
        self.weight = nn.Parameter(torch.zeros(num_classes, embed_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) + self.bias.to(features.dtype)


class CLIPNet(TokenIntermediates, nn.Module):
    """An open_clip model and its tokenizer, with timm's net conventions for the image side.

    Takes normalized images (the enclosing ImageClassifier normalizes). `forward(x)` gives
    zero-shot logits; `forward(x, text=tokens)` gives (image features, text features, scale),
    both L2-normalized, for contrastive training.
    """

    def __init__(self, clip: nn.Module, tokenizer: Any, num_classes: int) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.embed_dim = (
            int(clip.text_projection.shape[-1])
            if _has_text_projection(clip)
            else (int(clip.visual.output_dim))
        )
        self.head = ZeroShotHead(num_classes, self.embed_dim)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learned log-temperature (open_clip's parameter); see `scale()` for its use."""
        return self.clip.logit_scale

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to [1, 100]: CLIP clamps its temperature the same way."""
        return self.clip.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length) int64 by the model's own tokenizer (open_clip's BPE)."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).long()

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings (B, D) of normalized images."""
        return self.clip.encode_image(x, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings (N, D) of token ids (N, context_length)."""
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def get_classifier(self) -> nn.Module:
        return self.head

    # forward_intermediates (timm's signature) comes from TokenIntermediates, through these.
    num_prefix_tokens = 1  # open_clip's ViT tower: one class token, always there

    def _vit_tower(self) -> nn.Module:
        from open_clip.transformer import VisionTransformer

        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(
                f"forward_intermediates needs a ViT image tower, this CLIP has "
                f"{type(visual).__name__}"
            )
        return visual

    def intermediate_tokens(
        self, x: torch.Tensor, indices: int | list[int] | None, stop_early: bool, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        # The steps of open_clip's own VisionTransformer.forward_intermediates (and of its
        # forward): embed, the transformer's blocks, pool, project.
        visual = self._vit_tower()
        tokens = visual._embeds(x)
        tokens, taken = visual.transformer.forward_intermediates(
            tokens, indices=indices, stop_early=stop_early
        )
        if not final:
            return None, taken
        pooled, _ = visual._pool(tokens)
        return (pooled @ visual.proj if visual.proj is not None else pooled), taken

    def token_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.visual.ln_post(tokens)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        patch = self._vit_tower().patch_size
        return x.shape[-2] // patch[0], x.shape[-1] // patch[1]

    def forward(
        self, x: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if text is None:
            return self.head(self.encode_image(x))
        return (
            self.encode_image(x, normalize=True),
            self.encode_text(text, normalize=True),
            (self.scale()),
        )

    def use_head(self, head: type[ZeroShotHead], num_classes: int) -> None:
        """Replace the head by a fresh `head` of `num_classes` (set_zero_shot_head fills it)."""
        self.head = head(num_classes, self.embed_dim).to(self.clip.logit_scale.device)

    @torch.no_grad()
    def class_embeddings(
        self, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """(C, D) unit vectors: each class's prompts embedded, averaged over the templates and
        renormalized (CLIP's prompt ensemble). Templates hold one `{}` for the class name."""
        if not classnames or not templates:
            raise ConfigError("a zero-shot head needs class names and at least one template")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ConfigError(f"zero-shot templates need exactly one '{{}}', got {bad[0]!r}")
        device = self.clip.logit_scale.device
        was_training = self.training
        self.eval()
        try:
            prompts = [t.format(name) for name in classnames for t in templates]
            tokens = self.tokenize(prompts).to(device)
            emb = self.encode_text(tokens, normalize=True).float()
        finally:
            self.train(was_training)
        emb = emb.view(len(classnames), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def set_zero_shot_head(
        self, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> None:
        """Make the head classify `classnames` with the text tower as it is now."""
        weight = self.class_embeddings(classnames, templates)
        if weight.shape != self.head.weight.shape:
            raise ConfigError(
                f"the model's head has {self.head.weight.shape[0]} classes, got "
                f"{len(classnames)} class names"
            )
        self.head.weight.copy_(weight)
        self.head.scale.copy_(self.scale().detach())


def _has_text_projection(clip: nn.Module) -> bool:
    proj = getattr(clip, "text_projection", None)
    return isinstance(proj, torch.Tensor)


def find_clip_net(model: nn.Module) -> CLIPNet | None:
    """The CLIPNet inside a CLIP classifier: its `net`, also through wrappers that keep the
    classifier as `model` or `net` (a defensive input prompt); None if there is none."""
    net: Any = model
    for _ in range(_MAX_WRAPPERS):
        if isinstance(net, CLIPNet):
            return net
        inner = getattr(net, "net", None)
        net = inner if isinstance(inner, nn.Module) else getattr(net, "model", None)
        if not isinstance(net, nn.Module):
            return None
    return None


def clip_net(model: nn.Module) -> CLIPNet:
    """The CLIPNet inside a CLIP classifier (adapted or not), or a ConfigError saying it is not."""
    net = find_clip_net(model)
    if net is None:
        raise ConfigError(
            f"this needs an image-text model (model.name clip or clip-tiny), got "
            f"{type(getattr(model, 'net', model)).__name__}"
        )
    return net


def is_clip(model: nn.Module) -> bool:
    return find_clip_net(model) is not None


def clip_state(state: StateDict) -> StateDict:
    """A state dict in CLIPNet's keys (`clip.*`, `head.*`): ours (a run's model.safetensors, after
    the `net.` prefix is stripped) or open_clip's own (`visual.*`, `logit_scale` ...)."""
    if any(k.startswith(("clip.", "head.")) for k in state):
        return state
    return {f"clip.{k}": v for k, v in state.items()}


def load_clip_file(net: CLIPNet, path: str | Path, keep_head: bool = False) -> CLIPNet:
    """Load a local checkpoint (.safetensors, or .pt/.pth/.bin read with weights_only=True)."""
    from open_clip.model import resize_pos_embed

    state = clip_state(read_state_dict(path))
    # open_clip's resize works on its own keys: a checkpoint made at another image size loads
    # with its position embedding interpolated, as open_clip itself does.
    inner = {k[len("clip.") :]: v for k, v in state.items() if k.startswith("clip.")}
    resize_pos_embed(inner, net.clip)
    state = {**{f"clip.{k}": v for k, v in inner.items()},
             **{k: v for k, v in state.items() if not k.startswith("clip.")}}  # fmt: skip
    load_backbone_state(net, state, str(path), keep_head=keep_head)
    return net


def build_clip_classifier(
    clip: nn.Module,
    tokenizer: Any,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> ImageClassifier:
    return build_classifier(CLIPNet(clip, tokenizer, num_classes), mean, std)


def _openai_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    import open_clip

    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


@MODELS.register("clip")
def create_clip(
    arch: str = "ViT-B-32",
    num_classes: int = 10,
    img_size: int | None = None,
    pretrained: bool | str = False,
    tag: str | None = None,
    keep_head: bool = False,
) -> ImageClassifier:
    """open_clip architecture `arch` (see `open_clip.list_models()`) as a zero-shot classifier.

    pretrained: False (random init), True (downloads open_clip's `tag` weights, e.g. 'openai' or
    'laion2b_s34b_b79k'; default: the first tag open_clip lists for `arch`; needs internet), or a
    local weights file. `img_size` other than the architecture's resizes the position embedding.
    """
    import open_clip

    if arch not in open_clip.list_models():
        raise ConfigError(
            f"model.options.arch: open_clip has no architecture {arch!r}; "
            "see open_clip.list_models()"
        )
    weights = None
    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag is None and not tags:
            raise ConfigError(f"open_clip publishes no weights for {arch!r}")
        weights = tag or tags[0]
    elif tag is not None:
        raise ConfigError("model.options.tag needs model.pretrained=true (open_clip's weights)")
    clip = open_clip.create_model(arch, pretrained=weights, force_image_size=img_size)
    tokenizer = open_clip.get_tokenizer(arch)
    default_mean, default_std = _openai_stats()
    mean = getattr(clip.visual, "image_mean", None) or default_mean
    std = getattr(clip.visual, "image_std", None) or default_std
    model = build_clip_classifier(clip, tokenizer, num_classes, mean, std)
    if isinstance(pretrained, str | Path) and not isinstance(pretrained, bool):
        load_clip_file(model.net, pretrained, keep_head=keep_head)
    return model


@MODELS.register("clip-tiny")
def create_clip_tiny(
    num_classes: int = 10,
    img_size: int = 28,
    pretrained: bool | str = False,
    keep_head: bool = False,
    width: int = 64,
    layers: int = 4,
    patch_size: int = 4,
    text_width: int = 64,
    text_layers: int = 2,
    heads: int = 2,
    context_length: int = 16,
    embed_dim: int = 64,
    pool: Literal["avg", "tok"] = "avg",
    causal: bool = False,
) -> ImageClassifier:
    """A CLIP small enough to pretrain on CPU: a ViT image tower (`width`, `layers`, `patch_size`
    on `img_size` px) and a causal text transformer (`text_width`, `text_layers`, `heads`) over
    open_clip's BPE vocabulary with `context_length` tokens; `pretrained` may be a local file
    (e.g. a CLIP run's model.safetensors).

    Two defaults differ from CLIP's, for tiny towers trained from scratch: `pool` "avg" (the
    image embedding is the patch tokens' average; "tok": CLIP's class token) and `causal` False
    (the text tower attends both ways; True: CLIP's causal mask). Pretraining starts on a plateau
    where every image and caption embeds alike; on mnist-captions at 16 px it lasted ~100 steps
    with the class token, and ~50 with both defaults (loss falling from step 50, 40% zero-shot
    after 130 steps at lr 3e-3)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if pretrained is True:
        raise ConfigError("clip-tiny has no published weights; give a file as model.pretrained")
    if img_size % patch_size:
        raise ConfigError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    if width % heads or text_width % heads:
        raise ConfigError(f"width {width} and text_width {text_width} must divide by heads")
    vision = open_clip.CLIPVisionCfg(
        layers=layers, width=width, head_width=width // heads, patch_size=patch_size,
        image_size=img_size, pool_type=pool,
    )  # fmt: skip
    text = open_clip.CLIPTextCfg(
        context_length=context_length,
        width=text_width,
        heads=heads,
        layers=text_layers,
        no_causal_mask=not causal,
    )
    clip = open_clip.CLIP(embed_dim, vision_cfg=vision, text_cfg=text)
    mean, std = _openai_stats()
    model = build_clip_classifier(
        clip, SimpleTokenizer(context_length=context_length), num_classes, mean, std
    )
    if pretrained:
        load_clip_file(model.net, pretrained, keep_head=keep_head)
    return model
