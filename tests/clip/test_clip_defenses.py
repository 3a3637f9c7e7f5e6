"""The four repairs of a poisoned CLIP (contrastive fine-tuning, NAD on the image tower, CleanCLIP,
our clip-prompt) each run through `vptlab defend` on clean image-text pairs and lower the zero-shot
ASR in a short run; their CLI errors are one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vptlab.cli import main
from vptlab.metrics.suite import evaluate_suite
from vptlab.steps.defend import defend
from vptlab.steps.train import load_run

SHORT: dict[str, dict[str, Any]] = {
    "ft": {"epochs": 6, "lr": 3e-3, "schedule": "constant"},
    "nad": {"epochs": 6, "lr": 3e-3, "schedule": "constant"},
    "cleanclip": {"epochs": 4, "lr": 1e-3, "schedule": "constant"},
    "clip-prompt": {"epochs": 4, "optimizer": "sgd", "lr": 1.0, "grad_clip": 1.0,
                    "weight_decay": 0.0},
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHORT))
def test_each_defense_lowers_the_zero_shot_asr(poisoned_clip_run: Path, name: str) -> None:
    metrics = defend(poisoned_clip_run, {"name": name, "clean_fraction": 0.15},
                     [f"name=poisoned-{name}"], train=SHORT[name])  # fmt: skip
    d = metrics["defense"]
    print(f"{name}: CA {d['ca_before']:.1f} -> {d['ca_after']:.1f}, "
          f"ASR {d['asr_before']:.1f} -> {d['asr_after']:.1f}, DER {d['der']:.3f}")  # fmt: skip
    assert d["asr_after"] < d["asr_before"] - 10.0
    assert d["clean_samples"] == round(0.15 * 1437)
    saved = json.loads((poisoned_clip_run.parent / f"poisoned-{name}" / "metrics.json").read_text())
    assert saved["defense"]["asr_after"] == d["asr_after"]
    # The defended folder reloads to the model that was measured (prompt and head included).
    _, model, data = load_run(poisoned_clip_run.parent / f"poisoned-{name}", device="cpu")
    with torch.no_grad():
        top1 = evaluate_suite(model, data.test, [], progress=False)["clean/top1"]
    assert abs(top1 - d["ca_after"]) < 1e-6


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--defense", "cleanclip", "defense.options.lam_mm=-1"],
         "vptlab: error: defense.options.lam_mm: Input should be greater than or equal to 0"),
        (["--defense", "clip-promt"], "vptlab: error: defense.name: unknown defense 'clip-promt'"),
        (["--defense", "nad", "defense.options.layers=[net.clip.visual.nope]"],
         "vptlab: error: defense.options.layers: the model has no module"),
    ],
)  # fmt: skip
def test_defend_errors_are_one_line(
    poisoned_clip_run: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code = main(["defend", str(poisoned_clip_run), *args, "name=bad", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_eval_reports_zero_shot(
    poisoned_clip_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(poisoned_clip_run), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((poisoned_clip_run / "metrics.json").read_text())["final"]
    assert result["zero_shot"] is True
    assert abs(result["top1"] - saved["test_top1"]) < 1e-6


def test_cleanclip_views_stay_in_range_and_captions_keep_their_words() -> None:
    from vptlab.defenses.cleanclip import augment_caption, augment_images

    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    views = augment_images(x, shift=0.1, scale=0.1, jitter=0.2)
    assert views.shape == x.shape and 0.0 <= views.min() and views.max() <= 1.0
    assert not torch.equal(views, x)
    caption = "the number seven written by hand"
    for _ in range(20):
        words = augment_caption(caption, word_drop=0.5).split()
        assert 1 <= len(words) <= 6 and set(words) <= set(caption.split())
    assert augment_caption("seven", 0.9) == "seven"
