"""Fine-tuning (`ft`): the plainest backdoor repair, the baseline the others are compared to.

Every weight is trained with cross-entropy on the defender's clean subset (a pixel-prompted
model: its prompt and label-mapping head, where the attacker put the backdoor).
"""

from __future__ import annotations

from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL, clean_task, is_pixel_prompted
from vptlab.engine.tasks import ClassificationTask, Task


class FineTuning:
    """Fine-tune the whole model (a pixel-prompted one: its prompt and head) on the clean subset:
    a plain ClassificationTask (CLIP's loss for a contrastively trained image-text model)."""

    name = "ft"
    trains = TRAINS_MODEL

    def prepare(self, model: nn.Module) -> nn.Module:
        return model  # nothing to add: the model keeps its structure

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
        if is_pixel_prompted(model):
            return ClassificationTask(cfg.train.label_smoothing)
        return clean_task(model, clean, cfg)


@REPAIRERS.register("ft", repairs_pixel_prompts=True, needs_image_text=False)
def fine_tuning() -> FineTuning:
    """Fine-tuning takes no options: its recipe is the defended run's `train` section."""
    return FineTuning()
