"""`vptlab defend`: a poisoned run repaired into a new run folder that names its parent, with the
before/after suites, ASR drop and DER in metrics.json and report.md, and example images; a
finished defense is reused; bad requests are one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vptlab.backdoors.metrics import der, stamp
from vptlab.backdoors.triggers import create_trigger
from vptlab.cli import main
from vptlab.config import load_yaml
from vptlab.steps.defend import defend

RECIPE = ["train.epochs=4", "train.lr=5e-3", "output.progress=false", "device=cpu"]


@pytest.fixture(scope="module")
def runs(poisoned_runs: dict[str, Path]) -> dict[str, Path]:
    return poisoned_runs


@pytest.fixture(scope="module")
def defended(runs: dict[str, Path]) -> dict[str, Any]:
    return defend(runs["poisoned"], {"name": "ft", "clean_fraction": 0.1}, RECIPE)


@pytest.mark.slow
def test_fine_tuning_lowers_the_attack_success(defended: dict[str, Any]) -> None:
    d = defended["defense"]
    assert d["asr_before"] > 90.0
    assert d["asr_after"] < d["asr_before"] - 20.0
    assert d["asr_drop"] == pytest.approx(d["asr_before"] - d["asr_after"])
    assert d["der"] == pytest.approx(der(d["ca_before"], d["ca_after"], d["asr_before"],
                                         d["asr_after"]))  # fmt: skip
    assert d["der"] > 0.55 and d["clean_samples"] == 400
    # The before/after suites are the one evaluation suite's flat metrics.
    assert defended["before"]["badnets/asr"] == d["asr_before"]
    assert defended["after"]["clean/top1"] == d["ca_after"]
    assert "badnets/asr" in defended["history"][-1]  # the loop measured ASR every epoch


@pytest.mark.slow
def test_defense_reports_the_adaptive_attackers_residual_asr(runs: dict[str, Path],
                                                             defended: dict) -> None:  # fmt: skip
    d = defended["defense"]
    assert d["residual"]["family"] == "patch" and d["residual"]["budget"] == 9 / 784
    assert d["residual_asr"] == d["residual"]["asr"]
    assert d["residual_asr_before"] > 80.0  # the search finds the backdoor it should
    report = (runs["poisoned"].parent / "backdoor-mnist-badnets-ft" / "report.md").read_text()
    assert "residual ASR %" in report


@pytest.mark.slow
def test_defended_run_folder_names_its_parent(runs: dict[str, Path], defended: dict) -> None:
    run_dir = runs["poisoned"].parent / "backdoor-mnist-badnets-ft"
    cfg = load_yaml(run_dir / "config.yaml")
    assert cfg["parent"] == str(runs["poisoned"]) and cfg["defense"]["name"] == "ft"
    assert cfg["train"]["epochs"] == 4 and cfg["data"]["poison"]["trigger"] == "badnets"
    report = (run_dir / "report.md").read_text()
    assert "ASR drop" in report and "examples.png" in report
    assert (run_dir / "examples.png").stat().st_size > 1000
    assert json.loads((run_dir / "metrics.json").read_text())["defense"] == defended["defense"]
    # The parent's folder is left as it was: no defense file lands there.
    assert not list(runs["poisoned"].glob("examples.png"))


@pytest.mark.slow
def test_finished_defense_is_reused(runs: dict[str, Path], defended: dict) -> None:
    model = runs["poisoned"].parent / "backdoor-mnist-badnets-ft" / "model.safetensors"
    before = model.stat().st_mtime_ns
    again = defend(runs["poisoned"], {"name": "ft", "clean_fraction": 0.1}, RECIPE)
    assert model.stat().st_mtime_ns == before and again["defense"] == defended["defense"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", "ft"], "never poisoned"),
        (["--defense", "ft", "--clean-fraction", "0"], "--clean-fraction"),
        (["--defense", "ft", "--clean-fraction", "1.5"], "--clean-fraction"),
        (["--defense", "nope"], "defense.name"),
        (["--defense", "fp", "defense.options.bogus=1"], "defense.options"),
    ],
)
def test_bad_requests_are_one_line_and_write_nothing(
    runs: dict[str, Path], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = runs["clean"] if message == "never poisoned" else runs["poisoned"]
    before = sorted(p.name for p in target.parent.iterdir())
    assert main(["defend", str(target), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == before


def test_gray_images_are_stamped_as_poisoning_stamped_them() -> None:
    """Gray digits reach the model repeated to 3 channels; a seeded pattern must be the gray one
    training saw, not a 3-channel pattern that only shares its first channel."""
    trigger = create_trigger("blended", seed=3)
    gray = torch.rand(4, 1, 28, 28)
    as_trained = trigger.apply(gray).expand(-1, 3, -1, -1)
    rgb = gray.expand(-1, 3, -1, -1)
    assert torch.equal(stamp(trigger, rgb, channels=1), as_trained)
    assert not torch.equal(stamp(trigger, rgb), as_trained)
