"""End to end: contrastive pretraining of a tiny CLIP on the offline captions through the one loop,
evaluated zero-shot per epoch, and the saved run classifying the same through `evaluate_suite`."""

from __future__ import annotations

import time
from pathlib import Path

from vptlab.config import build_config
from vptlab.engine.runner import load_run, train
from vptlab.metrics.suite import evaluate_suite


def test_pretrained_tiny_clip_beats_chance_zero_shot(tmp_path: Path) -> None:
    cfg = build_config({
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
