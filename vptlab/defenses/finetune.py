"""Fine-tuning (`ft`): the plainest backdoor repair, the baseline the others are compared to.

Every weight of the backdoored model is trained with cross-entropy on the defender's clean subset,
as the defense's recipe (`train`) says. Clean data never show the trigger, so nothing asks the
network to keep its trigger -> target shortcut; with a large enough learning rate the shortcut
is overwritten (BackdoorBench, BadNets on CIFAR-10: ASR 95.0 -> 1.5), with a small one it
survives. Blended triggers survive either way (ASR >= 96).

A pixel-prompted model (adapt.mode pixel) is fine-tuned where its backdoor lives: the attacker
trained the prompt (and a linear label-mapping head) in front of a frozen, shared backbone, so
those are what the clean data retrain; the backbone stays bit-identical.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.defenses.repair import REPAIRERS, fit_pixel_prompt, fit_whole_model, is_pixel_prompted
from vptlab.engine.evaluators import Evaluator


class FineTuning:
    """Fine-tune the whole model (a pixel-prompted one: its prompt and head) on the clean subset:
    a plain ClassificationTask through `fit`."""

    name = "ft"
    repairs_pixel_prompts = True

    def prepare(self, model: nn.Module) -> nn.Module:
        return model  # nothing to add: the model keeps its structure

    def repair(
        self,
        model: nn.Module,
        clean: DataSplits,
        cfg: ExperimentConfig,
        run_dir: Path,
        evaluators: list[Evaluator] | None = None,
    ) -> nn.Module:
        model = self.prepare(model)
        if is_pixel_prompted(model):
            fit_pixel_prompt(model, clean, cfg, run_dir, evaluators=evaluators)
        else:
            fit_whole_model(model, clean, cfg, run_dir, evaluators=evaluators)
        return model


@REPAIRERS.register("ft")
def fine_tuning() -> FineTuning:
    """Fine-tuning takes no options: its recipe is the defended run's `train` section."""
    return FineTuning()
