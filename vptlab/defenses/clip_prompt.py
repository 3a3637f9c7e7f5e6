"""Our defense for a poisoned CLIP (`clip-prompt`): `prompt`'s defensive pixel prompt in front of
the frozen image-text model, trained with CLIP's loss on clean image-text pairs against universal
patches that stand in for the unknown trigger (docs/prompt_defense_notes.md).
"""

from __future__ import annotations

import torch
from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.data.loaders import Batch
from vptlab.defenses.prompt_defense import PromptDefense, UniversalPerturbation, is_defended
from vptlab.defenses.repair import REPAIRERS
from vptlab.engine.tasks import caption_tokens, captions_retrieved, clip_loss
from vptlab.models.clip import clip_net
from vptlab.prompts.pixel import PixelPrompted


class CLIPPromptDefenseTask:
    """One step: the inner search on the bare prompted model (targets scored on its zero-shot
    predictions), then L_CLIP on the clean and the perturbed images against the batch's captions
    through the step's model. `tokens`: the clean split's captions, tokenized once."""

    def __init__(
        self, perturbation: UniversalPerturbation, steps: int, lam: float, tokens: torch.Tensor
    ) -> None:
        self.perturbation, self.steps, self.lam = perturbation, steps, lam
        self.tokens = tokens.long()

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not is_defended(raw_model):
            raise TypeError(f"the prompt defense trains a prompted_input, got {type(raw_model)}")
        text = self.tokens[batch.index.cpu()].to(batch.x.device)
        if self.lam == 0:
            images, texts, scale = model(batch.x, text=text)
            return clip_loss(images, texts, scale)
        with torch.no_grad():  # what each clean image already is to the (prompted) model
            seen = raw_model(batch.x).argmax(1)
        self.perturbation.ascend(raw_model, batch.x, seen, self.steps)
        x_adv = self.perturbation.apply(batch.x).detach()
        images, texts, scale = model(torch.cat([batch.x, x_adv]), text=text)
        clean, perturbed = images.chunk(2)
        loss, logits = clip_loss(clean, texts, scale)
        robust, _ = clip_loss(perturbed, texts, scale)
        return loss + self.lam * robust, logits

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return captions_retrieved(logits)


@REPAIRERS.register("clip-prompt", repairs_pixel_prompts=False, needs_image_text=True)
class CLIPPromptDefense(PromptDefense):
    """Repairer `clip-prompt`: `prompt`'s defensive pixel prompt, trained with CLIP's loss on
    clean image-text pairs (see the module docstring); the same options."""

    name = "clip-prompt"

    def prepare(self, model: nn.Module) -> PixelPrompted:
        clip_net(model)  # an image-text model, or one error line now
        return super().prepare(model)

    def task(  # type: ignore[override]
        self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig
    ) -> CLIPPromptDefenseTask:
        tokens = caption_tokens(model, clean.train)
        return CLIPPromptDefenseTask(
            self.perturbation(clean.num_classes), self.steps, self.lam, tokens
        )
