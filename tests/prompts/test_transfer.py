"""Offline transfer: ViT pretrained on Fashion-MNIST, prompt-tuned on mnist-5k, saved, reloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vptlab.data.loaders import make_loader
from vptlab.errors import VptlabError
from vptlab.metrics.accuracy import evaluate
from vptlab.models.pretrained import file_sha256
from vptlab.steps.resolve import resolved
from vptlab.steps.study import run_study
from vptlab.steps.train import load_run, train

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# patch 7 (16 tokens) and average pooling: the quickest small ViT to learn from few images
VIT = {
    "name": "vit-scratch",
    "options": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 7, "global_pool": "avg"},
}
QUIET = {"tensorboard": False, "progress": False}


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_prompt_transfer_beats_chance_and_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VPTLAB_CACHE", str(tmp_path / "cache"))
    raw = {
        "study": "transfer",
        "output": str(tmp_path / "runs"),
        "backbone": {
            "name": "fashion",
            "device": "cpu",
            "data": {
                "name": "fashion-mnist",
                "batch_size": 32,
                "options": {"limit_train": 3000, "limit_test": 500},
            },
            "model": VIT,
            "train": {"epochs": 4, "lr": 3e-3},
            "output": QUIET,
        },
        "base": {
            "device": "cpu",
            "data": {"name": "mnist-5k", "batch_size": 32},
            "model": VIT,
            "adapt": {"prompt": {"num_prompts": 4, "deep": True}},
            "train": {"epochs": 4, "lr": 3e-2, "weight_decay": 0.0},
            "output": QUIET,
        },
        "runs": {"prompt": {"adapt": {"mode": "prompt"}}},
    }
    report = run_study(raw)
    run_dir = report.parent / "prompt"

    saved = load_file(str(run_dir / "model.safetensors"))
    assert saved and all(".prompt." in k or ".head." in k for k in saved), sorted(saved)
    assert "net.prompt.embeddings" in saved
    assert saved["net.prompt.embeddings"].shape == (2, 4, 32)  # depth x prompts x dim

    cfg, model, splits = load_run(run_dir, device="cpu")  # backbone from the cache + the prompts
    loader = make_loader(splits.test, 500, train=False)
    top1 = evaluate(model, loader)["top1"]
    assert top1 > 35.0  # chance is 10%; 586 trained numbers on a 4-epoch backbone reach ~49%
    assert "| prompt | complete | vit-scratch | prompt | mnist-5k |" in report.read_text()
    assert f"{top1:.2f}" in report.read_text()  # the reloaded model scores what the run reported


def test_prompt_run_is_pinned_to_its_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt run stores prompts + head and a path; the backbone file's sha256 pins it."""
    pytest.importorskip("sklearn")
    monkeypatch.setenv("VPTLAB_CACHE", str(tmp_path / "cache"))
    base = {
        "device": "cpu",
        "data": {"name": "digits", "img_size": 16, "batch_size": 64, "num_workers": 0},
        "model": {
            "name": "vit-scratch",
            "options": {"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4},
        },
        "train": {"epochs": 1, "lr": 3e-3},
        "output": {**QUIET, "dir": str(tmp_path / "runs")},
    }
    backbone = resolved(base, ["name=backbone", "adapt.mode=full"])
    train(backbone)
    weights = tmp_path / "runs" / "backbone" / "model.safetensors"
    prompt_run = resolved(
        base, ["name=prompt", "adapt.mode=prompt", "adapt.prompt.num_prompts=2",
               f"model.pretrained={weights}"],
    )
    train(prompt_run)
    run_dir = tmp_path / "runs" / "prompt"
    meta = safe_open(str(run_dir / "model.safetensors"), framework="pt").metadata()
    assert meta["backbone_sha256"] == file_sha256(weights)

    _, model, _ = load_run(run_dir, device="cpu")  # the backbone as trained: loads
    saved = load_file(str(run_dir / "model.safetensors"))
    assert torch.equal(model.state_dict()["net.prompt.embeddings"], saved["net.prompt.embeddings"])

    train(resolved(base, ["name=backbone", "adapt.mode=full", "seed=1"]), force=True)
    with pytest.raises(VptlabError, match="was trained on backbone .*retrained or replaced") as err:
        load_run(run_dir, device="cpu")
    message = str(err.value)
    assert "\n" not in message and str(run_dir) in message and str(weights) in message

    weights.unlink()
    with pytest.raises(VptlabError, match=f"run {run_dir} was trained on backbone .* missing"):
        load_run(run_dir, device="cpu")
