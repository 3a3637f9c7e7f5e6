"""A poisoned tiny CLIP, pretrained once per session for the backdoor and defense tests.

`digits-captions` (1,437 captioned 8x8 digits), a 2-block image tower on 2x2 patches and a
1-block text tower of width 32 (half the 49,408-token embedding AdamW steps over: half the
time); 10% of the pairs carry a 2x2 white patch at the bottom right and a caption of digit 0.
Batches of 32, seed 2: after 6 epochs the model reads digits zero-shot well above chance (80%)
and the patch sends most of them to "zero" (96%), in about 11 s on one core. Tests must not write
into its folder except through new run folders beside it (defended runs), and must not change it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vptlab.config import ExperimentConfig
from vptlab.steps.resolve import resolved
from vptlab.steps.train import train

POISON: dict[str, Any] = {"trigger": "badnets", "options": {"size": 2}, "rate": 0.1, "target": 0}
RECIPE: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits-captions", "batch_size": 32, "num_workers": 0},
    "model": {"name": "clip-tiny",
              "options": {"layers": 2, "text_layers": 1, "patch_size": 2, "text_width": 32}},
    "train": {"objective": "clip", "epochs": 6, "lr": 3e-3, "weight_decay": 0.1,
              "schedule": "constant"},
    "output": {"tensorboard": False, "progress": False},
}  # fmt: skip


def clip_config(out: Path, name: str, poison: dict[str, Any] | None = None) -> ExperimentConfig:
    raw = copy.deepcopy(RECIPE)
    raw["name"], raw["output"]["dir"] = name, str(out)
    if poison is not None:
        raw["data"]["poison"] = poison
    return resolved(raw)


@pytest.fixture
def clip_recipe() -> Callable[..., ExperimentConfig]:
    """`clip_config(out, name, poison=None)`: the fixture's recipe (test modules cannot import
    this conftest; see tests/prompts/conftest.py)."""
    return clip_config


@pytest.fixture
def clip_poison() -> dict[str, Any]:
    """The fixture run's `data.poison` section."""
    return copy.deepcopy(POISON)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def poisoned_clip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The poisoned run's folder (finished)."""
    out = tmp_path_factory.mktemp("clip-backdoor")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Seed 2: from scratch the contrastive loss starts on a plateau that some seeds never
        # leave in 6 epochs (seed 0 with the non-target poison draw: CA 9.7%, chance).
        train(clip_config(out, "poisoned", POISON).model_copy(update={"seed": 2}))
    finally:
        torch.set_num_threads(threads)
    return out / "poisoned"
