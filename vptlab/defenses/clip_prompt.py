"""Our defense for a poisoned CLIP (`clip-prompt`): the whole image-text model stays frozen; a
defensive pixel prompt in front of its image tower is trained on clean image-text pairs against
universal patches that stand in for the unknown trigger. The seed experiment's own defense ("adp")
also repairs the image side only; this one does not touch a weight.

Method. The prompted model is `PromptedInput` of prompt_defense.py, f_P(x) = f(clamp(x + P, 0, 1)),
here in front of the CLIP classifier: its zero-shot head for the classifier's outputs, and
`f_P(x, text=t)` for the contrastive forward (the text tower frozen too). Per batch of clean pairs
(x_i, t_i):

    inner:  u* = the universal patch (Neural Cleanse's mask + pattern, area-bounded) that sends
            most images to one zero-shot class, one search per class, warm-started
    outer:  min_P  L_CLIP(f_P(x), t) + lam * L_CLIP(f_P(T_u*(x)), t)

L_CLIP is CLIP's symmetric InfoNCE between the prompted images' embeddings and their captions'
(at the model's frozen temperature). Unlike `prompt`, which trains on labels with cross-entropy,
this needs no labels: captions pull the prompted embeddings back onto their text, and the search
is scored on the frozen model's own zero-shot predictions of the clean images (which samples
already "are" the class searched for), so the defender needs only image-text pairs and the class
names its zero-shot classifier serves. A trigger pulls every image towards the target's text;
asking f_P(T_u*(x)) to stay with its own caption teaches the prompt to cancel that pull.

Options are `prompt`'s (threat, targeted, starts, steps, area, eps, alpha, lam, bound, size,
frame, lr); see prompt_defense.py for the search, the clamp and the recipe (SGD with
gradient clipping suits a pixel prompt).

Threat model: as `prompt`'s, with clean image-text pairs instead of labelled images: the defender
holds the poisoned model and a few clean pairs, and knows neither trigger nor target. Limits: as
`prompt`'s (universal patch or Linf triggers only; one prompt for all inputs, whose CA cost grows
with how much a pixel moves the model; an adaptive attacker can search a new trigger against f_P).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.data.loaders import Batch
from vptlab.defenses.prompt_defense import PromptDefense, PromptedInput, UniversalPerturbation
from vptlab.defenses.repair import REPAIRERS
from vptlab.engine.evaluators import Evaluator
from vptlab.engine.loop import fit
from vptlab.engine.tasks import caption_tokens, captions_retrieved, clip_loss
from vptlab.models.clip import clip_net


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
        if not isinstance(raw_model, PromptedInput):
            raise TypeError(f"the prompt defense trains a PromptedInput, got {type(raw_model)}")
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


@REPAIRERS.register("clip-prompt")
class CLIPPromptDefense(PromptDefense):
    """Repairer `clip-prompt`: `prompt`'s defensive pixel prompt, trained with CLIP's loss on
    clean image-text pairs (see the module docstring); the same options."""

    name = "clip-prompt"
    repairs_pixel_prompts = False  # a pixel-prompted run is a classifier, not an image-text model
    image_text = True  # applies to image-text (CLIP) models only

    def prepare(self, model: nn.Module) -> PromptedInput:
        clip_net(model)  # an image-text model, or one error line now
        return super().prepare(model)

    def repair(
        self,
        model: nn.Module,
        clean: DataSplits,
        cfg: ExperimentConfig,
        run_dir: Path,
        evaluators: list[Evaluator] | None = None,
    ) -> PromptedInput:
        prompted = self.prepare(model)
        if self.lr is not None:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": self.lr})})
        tokens = caption_tokens(model, clean.train)
        task = CLIPPromptDefenseTask(
            self.perturbation(clean.num_classes), self.steps, self.lam, tokens
        )
        fit(prompted, clean, cfg, run_dir, task=task, evaluators=evaluators,
            trainable_only=False)  # fmt: skip
        return prompted.eval()
