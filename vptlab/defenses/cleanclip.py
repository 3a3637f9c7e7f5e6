"""CleanCLIP (`cleanclip`, Bansal et al. 2023): fine-tune a poisoned CLIP on clean image-text pairs
with its multimodal loss plus in-modality self-supervision, which breaks the trigger's shortcut.

A poisoned CLIP has learnt "trigger -> target text" as a spurious image-text association. Plain
contrastive fine-tuning on clean pairs only asks images to match their captions and may leave the
trigger's feature alone; CleanCLIP also asks each image to match its own augmented view among the
batch's images, and each caption its own augmented caption, so every modality is re-learnt on its
own and the trigger's co-occurrence with the target text is weakened:

    L = lam_mm * L_CLIP(I, T) + lam_ss * (L_CLIP(I, I~) + L_CLIP(T, T~)) / 2

L_CLIP: CLIP's symmetric InfoNCE at the model's temperature (engine/tasks.py `clip_loss`); I, T
the clean pairs' image and text embeddings; I~ an augmented view of each image (a random affine
map: shift by up to `shift` of the image, scale in 1 +- `scale`, plus brightness / contrast
jitter of `jitter`), T~ an augmented caption (EDA-style: each word dropped with probability
`word_drop`, keeping one, then one random swap of two words). The paper uses AutoAugment and EDA
and weights 1 / 1. One forward of 2B images and 2B captions per step, through the step's model
(so DDP syncs both towers). The whole model trains, as the defense's recipe (`train`) says.

Threat model: the defender holds the poisoned model and clean image-text pairs (a share of the
train split); it knows neither the trigger nor the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.data.captions import split_captions
from vptlab.data.loaders import Batch
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL
from vptlab.engine.tasks import captions_retrieved, clip_loss
from vptlab.errors import ConfigError
from vptlab.models.clip import clip_net


def augment_images(
    x: torch.Tensor, shift: float, scale: float, jitter: float
) -> torch.Tensor:
    """(B, C, H, W) in [0,1] -> one random view per image (global RNG): an affine resample
    (translation up to `shift` of the side, zoom 1 +- `scale`), then brightness and contrast
    changed by up to +-`jitter`."""
    b = len(x)
    zoom = 1.0 + (torch.rand(b, device=x.device) * 2 - 1) * scale
    move = (torch.rand(b, 2, device=x.device) * 2 - 1) * shift * 2  # grid units: the side is 2
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
    theta[:, :, 2] = move
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    bright = (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * jitter
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * jitter
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    return ((view - mean) * contrast + mean + bright).clamp(0.0, 1.0)


def augment_caption(caption: str, word_drop: float) -> str:
    """EDA-style: each word dropped with probability `word_drop` (one is always kept), then two
    random words swapped; draws from the global RNG."""
    words = caption.split()
    if len(words) < 2:
        return caption
    keep = (torch.rand(len(words)) >= word_drop).tolist()
    if not any(keep):
        keep[int(torch.randint(len(words), ()))] = True
    words = [w for w, k in zip(words, keep, strict=True) if k]
    if len(words) >= 2:
        i, j = torch.randperm(len(words))[:2].tolist()
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


@dataclass(frozen=True)
class CleanCLIPOptions:
    """The loss weights and the views' augmentation strengths (see the module docstring)."""

    lam_mm: float = 1.0
    lam_ss: float = 1.0
    shift: float = 0.1
    scale: float = 0.1
    jitter: float = 0.2
    word_drop: float = 0.1


class CleanCLIPTask:
    """The CleanCLIP loss on a batch of clean pairs (see the module docstring); the returned
    logits are the image-to-text ones, so train accuracy counts captions retrieved."""

    def __init__(
        self, model: nn.Module, captions: Sequence[str], options: CleanCLIPOptions
    ) -> None:
        self.net = clip_net(model)
        self.captions = list(captions)
        self.tokens = self.net.tokenize(self.captions)
        self.options = options

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o, index = self.options, batch.index.tolist()
        text = self.tokens[index].to(batch.x.device)
        views = augment_images(batch.x, o.shift, o.scale, o.jitter)
        augmented = [augment_caption(self.captions[i], o.word_drop) for i in index]
        text_views = self.net.tokenize(augmented).to(batch.x.device)
        pixels, tokens = torch.cat([batch.x, views]), torch.cat([text, text_views])
        images, texts, scale = model(pixels, text=tokens)
        image, image_view = images.chunk(2)
        caption, caption_view = texts.chunk(2)
        multimodal, logits = clip_loss(image, caption, scale)
        image_ss, _ = clip_loss(image, image_view, scale)
        text_ss, _ = clip_loss(caption, caption_view, scale)
        return o.lam_mm * multimodal + o.lam_ss * (image_ss + text_ss) / 2, logits

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return captions_retrieved(logits)


class CleanCLIP:
    """Repairer `cleanclip`: the whole image-text model fine-tuned with `CleanCLIPTask` on the
    clean pairs, as the recipe (`train`) says."""

    name = "cleanclip"
    trains = TRAINS_MODEL

    def __init__(self, options: CleanCLIPOptions) -> None:
        if options.lam_mm + options.lam_ss <= 0:
            raise ConfigError("defense.options: lam_mm and lam_ss are both 0; nothing would train")
        self.options = options

    def prepare(self, model: nn.Module) -> nn.Module:
        clip_net(model)  # an image-text model, or one error line now
        return model

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> CleanCLIPTask:
        return CleanCLIPTask(model, split_captions(clean.train), self.options)


@REPAIRERS.register("cleanclip", repairs_pixel_prompts=False, needs_image_text=True)
def cleanclip(
    lam_mm: Annotated[float, Field(ge=0)] = 1.0,
    lam_ss: Annotated[float, Field(ge=0)] = 1.0,
    shift: Annotated[float, Field(ge=0, le=0.5)] = 0.1,
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.2,
    word_drop: Annotated[float, Field(ge=0, lt=1)] = 0.1,
) -> CleanCLIP:
    """lam_mm / lam_ss: weights of the multimodal and the in-modality losses; shift, scale,
    jitter: the image views' augmentation; word_drop: the captions' word dropout."""
    return CleanCLIP(CleanCLIPOptions(lam_mm, lam_ss, shift, scale, jitter, word_drop))
