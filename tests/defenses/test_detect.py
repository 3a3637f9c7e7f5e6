"""Backdoor detection: AUROC and precision/recall on hand-made cases; on a BadNets run, every
registered detector separates poisoned from clean better than chance (STRIP triggered from clean
test digits, spectral signatures the poisoned training digits far above the poison rate);
`vptlab detect` records both in detection.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vptlab.cli import main
from vptlab.defenses.detectors import DETECTORS, spectral_flags, spectral_scores
from vptlab.errors import ConfigError
from vptlab.steps.detect import auroc, precision_recall


def test_auroc_on_hand_made_scores() -> None:
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5  # ties count half
    # 2 of the 4 pairs ordered right, one tied: (2 + 0.5) / 4
    assert auroc(torch.tensor([2.0, 5.0]), torch.tensor([2.0, 6.0])) == pytest.approx(0.375)


def test_precision_recall_on_hand_made_flags() -> None:
    out = precision_recall(torch.tensor([1, 2, 3, 4]), torch.tensor([2, 4, 9]))
    assert out["precision"] == 50.0 and out["recall"] == pytest.approx(200 / 3)


def test_spectral_signature_finds_a_shifted_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(200, 16, generator=g), torch.zeros(200, dtype=torch.long)
    feats[:20] += 4.0 * torch.nn.functional.normalize(torch.ones(16), dim=0) * 3
    flags = spectral_flags(spectral_scores(feats, labels), labels, rate=0.1)
    assert len(flags) == 30 and set(range(20)) <= set(flags.tolist())


@pytest.mark.slow
def test_detect_cli_on_a_badnets_run(poisoned_runs: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = poisoned_runs["poisoned"]
    assert main(["detect", str(run), "--detector", "spectral", "--device", "cpu"]) == 0
    assert main(["detect", str(run), "--detector", "strip", "--overlays", "8",
                 "--device", "cpu"]) == 0  # fmt: skip
    saved = json.loads((run / "detection.json").read_text())
    # 10% poisoned: 600 samples flagged at random would have 10% precision and 15% recall. (Half
    # of label 0 is poison here, which squared projections cannot split: the gain is in finding
    # the poisoned label, see spectral_flags.)
    assert saved["spectral"]["recall"] > 50.0 and saved["spectral"]["precision"] > 30.0
    assert saved["strip"]["auroc"] > 0.7
    capsys.readouterr()
    assert main(["detect", str(poisoned_runs["clean"]), "--detector", "strip"]) == 2
    assert "never poisoned" in capsys.readouterr().err
    assert main(["detect", str(run), "--detector", "nope"]) == 2
    assert "--detector" in capsys.readouterr().err


def test_unknown_detector_is_a_config_error_naming_the_choices(
    poisoned_runs: dict[str, Path],
) -> None:
    from vptlab.steps.detect import detect_run

    with pytest.raises(ConfigError, match="unknown detector 'nope'; choose from: spectral, strip"):
        detect_run(poisoned_runs["poisoned"], "nope")


@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_beats_chance(name: str, poisoned_runs: dict[str, Path]) -> None:
    # Chance: AUROC 0.5 at inference; in training, precision at the poison rate (10%).
    from vptlab.steps.detect import detect_run

    result = detect_run(poisoned_runs["poisoned"], name, device="cpu", overlays=4)
    setting = DETECTORS.meta(name)["setting"]
    if setting == "inference":
        assert result["auroc"] > 0.6
    else:
        assert setting == "training"
        assert result["precision"] > 2 * 100 * result["poison_rate"]
