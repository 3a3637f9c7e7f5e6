"""The study's BackdoorBench-style leaderboard: cells over seeds, training-time defenses' DER
against the undefended run of the same seed, and the cell-by-cell comparison with a reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from vptlab.errors import ConfigError
from vptlab.report import leaderboard
from vptlab.steps import study as study_mod


def run(label: str, seed: int, ca: float, asr: float, **defended: tuple[float, float]) -> dict:
    """A finished poisoned run's metrics (with `label`, `seed`), repaired as `defended` says:
    {defense: (CA after, ASR after)}."""
    repairs = {
        name: {"status": "complete", "defense": {
            "ca_after": after[0], "asr_after": after[1],
            "der": (max(0, asr - after[1]) - max(0, ca - after[0]) + 100) / 200}}
        for name, after in defended.items()
    }  # fmt: skip
    return {"label": label, "seed": seed, "status": "complete",
            "backdoor": {"ca": ca, "asr": asr}, "defended": repairs}  # fmt: skip


RESULTS = {
    "bad-s0": run("bad", 0, 90.0, 100.0, ft=(88.0, 4.0)),
    "bad-s1": run("bad", 1, 92.0, 98.0, ft=(90.0, 6.0)),
    "bad+abl-s0": {"label": "bad+abl", "seed": 0, "status": "complete",
                   "backdoor": {"ca": 80.0, "asr": 0.0}},
    "bad+abl-s1": {"label": "bad+abl", "seed": 1, "status": "diverged",
                   "backdoor": {"ca": 10.0, "asr": 100.0}},
    "blend-s0": run("blend", 0, 91.0, 99.0, ft=(90.0, 97.0)),
}  # fmt: skip


def test_cells_average_the_seeds_and_rate_training_defenses_against_their_own_seed() -> None:
    board = leaderboard.cells(RESULTS, ["bad", "blend"], ["ft"], ["abl"])
    none, ft, abl = (board["bad"][k] for k in ("none", "ft", "abl"))
    assert none.ca is not None and (none.ca.mean, none.ca.n) == (91.0, 2) and none.der is None
    assert ft.asr is not None and ft.asr.mean == 5.0 and ft.der is not None
    assert ft.der.mean == pytest.approx(96.0)  # (0.96 - 0.02 + 1) / 2 and (0.92 - 0.02 + 1) / 2
    # ABL's only finished seed (0): DER against seed 0's undefended run, (1 - 0.1 + 1) / 2.
    assert abl.asr is not None and abl.asr.n == 1 and abl.der is not None
    assert abl.der.mean == pytest.approx(95.0)
    assert "abl" not in board["blend"]  # never trained with it
    assert ft.text() == "89.0 ± 1.4 / 5.0 ± 1.4 / 96.0 ± 1.4"


def test_the_comparison_counts_agreeing_and_differing_cells() -> None:
    ours = leaderboard.cells(RESULTS, ["bad", "blend"], ["ft"], ["abl"])
    theirs = leaderboard.reference_cells({
        "bad": {"none": {"ca": 91.3, "asr": 95.0}, "ft": {"ca": 89.0, "asr": 1.5},
                "abl": {"ca": 80.0, "asr": 50.0}},
        "blend": {"ft": {"ca": 92.0, "asr": 10.0}},
    })  # fmt: skip
    weak = leaderboard.cells({**RESULTS, "weak-s0": run("weak", 0, 90.0, 30.0, ft=(89.0, 5.0))},
                             ["weak"], ["ft"], [])  # fmt: skip
    text, counts = leaderboard.agreement({**ours, **weak}, theirs, ["bad", "blend", "weak"],
                                         ["ft", "abl"])  # fmt: skip
    assert counts == {"agree": 1, "differ": 2, "not planted": 1}
    assert "| bad | removed (agrees) | removed (BackdoorBench: partly) |" in text
    assert "| blend | survives (BackdoorBench: removed) | n/a |" in text
    assert "| weak | not planted (undefended ASR 30.0%) | |" in text
    assert [leaderboard.verdict(a) for a in (19.9, 20.0, 79.9, 80.0, None)] == [
        "removed", "partly", "partly", "survives", None]  # fmt: skip


def test_a_study_report_holds_the_leaderboard_and_its_reference(tmp_path: Path) -> None:
    study = study_mod.StudyConfig(
        study="s", seeds=[0, 1], runs={"bad": {"data": {"poison": {"trigger": "badnets"}}}},
        defenses={"ft": {"name": "ft"}}, training_defenses={"abl": {"train": {"objective": "abl"}}},
        reference={"source": "a paper, table 1", "cells": {"bad": {"ft": {"ca": 89, "asr": 1.5}}}},
    )  # fmt: skip
    history = [{"epoch": 1, "test_top1": 50.0}]
    results = {k: {**v, "model": "simplenet", "final": {}, "history": history}
               for k, v in RESULTS.items() if k.startswith("bad")}  # fmt: skip
    text = study_mod.write_study_report(study, tmp_path, results).read_text()
    board = text.split("## Leaderboard", 1)[1]
    assert "| attack | none | ft | abl |" in board
    assert "| bad | 91.0 ± 1.4 / 99.0 ± 1.4 / n/a | 89.0 ± 1.4 / 5.0 ± 1.4 / 96.0 ± 1.4 | " \
           "80.0 / 0.0 / 95.0 |" in board  # fmt: skip
    assert "Source: a paper, table 1." in board and "1 agree, 0 differ (0 attacks" in board


def test_training_defenses_twin_every_poisoned_run() -> None:
    study = study_mod.StudyConfig(
        study="s", base={"train": {"epochs": 2}},
        runs={"clean": {}, "bad": {"data": {"poison": {"trigger": "badnets"}}}},
        training_defenses={"abl": {"train": {"objective": "abl"}}},
    )  # fmt: skip
    specs = study.run_specs()
    assert list(specs) == ["clean", "bad", "bad+abl"]
    assert specs["bad+abl"] == {"data": {"poison": {"trigger": "badnets"}},
                                "train": {"objective": "abl"}}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"training_defenses": {"ft": {}}}, r"^training_defenses\.ft: a repair defense has"),
        ({"reference": {"source": "x", "cells": {"nope": {"ft": {}}}}},
         r"^reference\.cells\.nope: not a run of the study"),
        ({"reference": {"source": "x", "cells": {"bad": {"nc": {}}}}},
         r"^reference\.cells\.bad\.nc: not a defense of the study \(none, ft\)"),
    ],
)  # fmt: skip
def test_bad_labels_are_one_error_naming_the_key(change: dict, expected: str) -> None:
    raw = {"study": "s", "runs": {"bad": {"data": {"poison": {"trigger": "badnets"}}}},
           "defenses": {"ft": {"name": "ft"}}, **change}  # fmt: skip
    with pytest.raises(ConfigError, match=expected):
        study_mod.run_study(raw)


def test_the_backdoorbench_preset_validates_and_covers_its_reference() -> None:
    """configs/backdoorbench_fashion.yaml: every run and defense config resolves, every trigger
    of the registry is a run, and the reference names only its cells."""
    from vptlab.backdoors.triggers import TRIGGERS
    from vptlab.config import load_yaml
    from vptlab.steps.resolve import resolved

    root = Path(__file__).resolve().parents[2] / "configs"
    raw = load_yaml(root / "backdoorbench_fashion.yaml")
    study = study_mod.StudyConfig.model_validate(raw)
    study_mod._check_labels(study)
    assert study.seeds is not None and len(study.seeds) >= 3
    poisons = {label: resolved(study_mod.deep_merge(study.base, spec)).data.poison
               for label, spec in study.run_specs().items()}  # fmt: skip
    assert {p.trigger for p in poisons.values() if p is not None} == set(TRIGGERS.names())
    assert {p.rate for p in poisons.values() if p is not None} <= {0.1, 0.08}
    assert {d.clean_fraction for d in study.defenses.values()} == {0.05}
    assert study.reference is not None
    assert set(study.reference.cells) == set(study.poisoned_runs())
    assert {"ft", "fp", "nad", "anp", "ibau", "nc", "prompt"} <= set(study.defenses)
