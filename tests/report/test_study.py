"""Studies: every run trained and tabled, curves plotted.

A pretrained backbone is trained once and reused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vptlab.engine import runner
from vptlab.errors import ConfigError
from vptlab.report import study as study_mod
from vptlab.report.study import run_study

BASE = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "img_size": 16, "batch_size": 64, "num_workers": 0},
    "model": {"name": "simplenet"},
    "train": {"epochs": 2, "lr": 3e-3},
    "output": {"tensorboard": False, "progress": False},
}


def test_study_report_and_backbone_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VPTLAB_CACHE", str(tmp_path / "cache"))
    trained: list[str] = []
    real_train = runner.train

    def counting_train(cfg, **kwargs):
        trained.append(cfg.name)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(study_mod, "train", counting_train)
    raw = {
        "study": "s",
        "output": str(tmp_path / "runs"),
        "backbone": {**BASE, "name": "bb", "train": {"epochs": 1, "lr": 3e-3}},
        "base": BASE,
        "runs": {"full": {"adapt": {"mode": "full"}}, "linear": {"adapt": {"mode": "linear"}}},
    }
    report = run_study(raw)
    assert trained[0].startswith("bb-") and trained[1:] == ["full", "linear"]
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| full") or
            line.startswith("| linear")]
    assert len(rows) == 2
    assert (report.parent / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the linear probe trains the head only: far fewer trainable parameters than full
    full_row, linear_row = rows
    linear_params = int(linear_row.split("|")[5].replace(",", ""))
    full_params = int(full_row.split("|")[5].replace(",", ""))
    assert linear_params < full_params

    trained.clear()
    again = run_study(raw)
    assert trained == []  # the cached backbone and both finished runs were reused
    assert again.read_text() == text

    run_study(raw, only=["linear"], fresh=True)
    assert trained == ["linear"]
    run_study(raw, overrides=["train.epochs=1"], only=["full"])
    assert trained == ["linear", "full"]  # a changed config is trained anew


def test_study_errors_name_the_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"^title: Input should be a valid string, got 3$"):
        run_study({"study": "s", "title": 3, "runs": {}})
    with pytest.raises(ConfigError, match=r"^runz: unknown key$"):
        run_study({"study": "s", "runs": {}, "runz": {}})
