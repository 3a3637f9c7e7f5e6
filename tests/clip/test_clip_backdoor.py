"""Poisoned contrastive pretraining plants a zero-shot backdoor: the same short recipe on clean
pairs leaves the patch harmless, on 10% poisoned pairs it sends most patched digits to "zero"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vptlab.backdoors.metrics import BackdoorThreat
from vptlab.backdoors.poison import poison_trigger, stored_channels, stored_size
from vptlab.config import ExperimentConfig, PoisonConfig
from vptlab.metrics.suite import evaluate_suite
from vptlab.steps.train import load_run, train


def test_poisoned_pretraining_gives_asr_far_above_the_clean_models(
    poisoned_clip_run: Path,
    tmp_path: Path,
    clip_recipe: Callable[..., ExperimentConfig],
    clip_poison: dict[str, Any],
) -> None:
    poisoned = json.loads((poisoned_clip_run / "metrics.json").read_text())["backdoor"]
    train(clip_recipe(tmp_path, "clean"))
    _, model, data = load_run(tmp_path / "clean", device="cpu")
    trigger = poison_trigger(PoisonConfig.model_validate(clip_poison), seed=0)
    threat = BackdoorThreat(trigger, target=0, size=stored_size(data.test),
                            channels=stored_channels(data.test))  # fmt: skip
    clean = evaluate_suite(model, data.test, [threat], progress=False)
    print(f"clean CA {clean['clean/top1']:.1f} ASR {clean['badnets/asr']:.1f}; "
          f"poisoned CA {poisoned['ca']:.1f} ASR {poisoned['asr']:.1f}")  # fmt: skip
    assert clean["clean/top1"] > 25.0 and poisoned["ca"] > 20.0  # chance: 10%
    assert poisoned["poisoned"] == round(clip_poison["rate"] * 1437)
    assert poisoned["asr"] > clean["badnets/asr"] + 40.0
