"""End to end: contrastive pretraining of a tiny CLIP on the offline captions through the one loop,
evaluated zero-shot per epoch, and the saved run classifying the same through `evaluate_suite`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from vptlab.errors import ConfigError
from vptlab.metrics.suite import evaluate_suite
from vptlab.steps.build import build_experiment
from vptlab.steps.resolve import resolved
from vptlab.steps.train import load_run, train


@pytest.mark.slow
def test_pretrained_tiny_clip_beats_chance_zero_shot(tmp_path: Path) -> None:
    cfg = resolved({
        "name": "clip", "seed": 0, "device": "cpu",
        "data": {"name": "mnist-captions", "img_size": 16, "batch_size": 128, "num_workers": 0},
        "model": {"name": "clip-tiny", "options": {"layers": 2, "text_layers": 1}},
        "train": {"objective": "clip", "epochs": 4, "lr": 3e-3, "weight_decay": 0.1,
                  "schedule": "constant"},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    })  # fmt: skip
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    top1 = metrics["final"]["test_top1"]
    print(f"zero-shot top-1 {top1:.1f}% after {4 * 32} steps in {seconds:.1f} s")
    assert top1 > 25.0  # 10 classes: chance is 10%
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]

    _, model, data = load_run(tmp_path / "clip", device="cpu")
    suite = evaluate_suite(model, data.test, [], progress=False, img_size=16)
    assert abs(suite["clean/top1"] - top1) < 1e-6


def test_linear_probe_on_the_frozen_image_tower(tmp_path: Path) -> None:
    """`adapt.mode linear` on a tiny CLIP: a linear head on frozen image features, trained with
    labels, beats the same features' zero-shot head; the image tower stays bit-identical."""
    common = {
        "seed": 0, "device": "cpu",
        "data": {"name": "mnist-captions", "img_size": 16, "batch_size": 128, "num_workers": 0},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    }  # fmt: skip
    model = {"name": "clip-tiny", "options": {"layers": 2, "text_layers": 1}}
    pre = train(resolved({**common, "name": "pre", "model": model,
                              "train": {"objective": "clip", "epochs": 2, "lr": 3e-3,
                                        "schedule": "constant"}}))  # fmt: skip
    weights = tmp_path / "pre" / "model.safetensors"
    probe = train(resolved({
        **common, "name": "probe", "model": {**model, "pretrained": str(weights)},
        "adapt": {"mode": "linear"},
        "train": {"epochs": 2, "lr": 1e-2, "schedule": "constant"},
    }))  # fmt: skip
    print(f"zero-shot {pre['final']['test_top1']:.1f}%, probe {probe['final']['test_top1']:.1f}%")
    assert probe["final"]["test_top1"] > pre["final"]["test_top1"] + 10.0

    _, pre_model, _ = load_run(tmp_path / "pre", device="cpu")
    _, probe_model, _ = load_run(tmp_path / "probe", device="cpu")
    tower = {k: v for k, v in pre_model.state_dict().items() if ".visual." in f".{k}"}
    assert tower, "no image-tower tensors found"
    probed = probe_model.state_dict()
    for key, value in tower.items():
        assert key in probed and torch.equal(probed[key], value), key


def test_a_pixel_prompt_in_front_of_the_zero_shot_head(tmp_path: Path) -> None:
    """adapt.mode pixel on a tiny CLIP: the prompt maps onto the text-based zero-shot head of the
    task's classes; only the prompt trains; VPT token prompts are refused in one line."""
    common = {
        "seed": 0, "device": "cpu",
        "data": {"name": "mnist-captions", "img_size": 16, "batch_size": 128, "num_workers": 0},
        "model": {"name": "clip-tiny", "options": {"layers": 2, "text_layers": 1}},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    }  # fmt: skip
    cfg = resolved({**common, "name": "pixel",
                        "adapt": {"mode": "pixel", "pixel": {"kind": "padding", "size": 2,
                                                             "mapping": "fixed"}}})  # fmt: skip
    _, model = build_experiment(cfg)
    assert model(torch.rand(4, 3, 16, 16)).shape == (4, 10)  # the task's 10 digit classes
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("prompt.") for k in trainable), trainable
    with pytest.raises(ConfigError, match="adapt.mode: clip-tiny adapts in mode full, linear or"):
        build_experiment(resolved({**common, "name": "vpt", "adapt": {"mode": "prompt"}}))
