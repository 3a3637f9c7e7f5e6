"""Studies: every run trained and tabled, curves plotted.

A pretrained backbone is trained once and reused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vptlab.config import load_yaml, run_key
from vptlab.errors import ConfigError
from vptlab.steps import study as study_mod
from vptlab.steps import train as runner
from vptlab.steps.resolve import resolved
from vptlab.steps.study import run_study

BASE = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "img_size": 16, "batch_size": 64, "num_workers": 0},
    "model": {"name": "simplenet"},
    "train": {"epochs": 2, "lr": 3e-3},
    "output": {"tensorboard": False, "progress": False},
}


@pytest.mark.slow
def test_study_report_and_backbone_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: list[str]
) -> None:
    monkeypatch.setenv("VPTLAB_CACHE", str(tmp_path / "cache"))
    trained = counted
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
    linear_params = int(linear_row.split("|")[6].replace(",", ""))
    full_params = int(full_row.split("|")[6].replace(",", ""))
    assert linear_params < full_params

    trained.clear()
    again = run_study(raw)
    assert trained == []  # the cached backbone and both finished runs were reused
    assert again.read_text() == text

    run_study(raw, only=["linear"], fresh=True)
    assert trained == ["linear"]
    backbone = resolved(raw["backbone"])
    assert (tmp_path / "cache" / "backbones" / f"bb-{run_key(backbone)}").is_dir()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the runs the study trains (from scratch), in order."""
    trained: list[str] = []
    real_train = runner.train

    def counting_train(cfg, **kwargs):
        trained.append(cfg.name)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(study_mod, "train", counting_train)
    return trained


# The digits at their own 8x8 size: the quickest run there is.
TINY = {**BASE, "data": {**BASE["data"], "img_size": 8}}


def _snapshot(run_dir: Path) -> tuple[int, bytes]:
    model = run_dir / "model.safetensors"
    return model.stat().st_mtime_ns, model.read_bytes()


def test_finished_runs_survive_a_changed_flag(tmp_path: Path, counted: list[str]) -> None:
    raw = {
        "study": "s",
        "output": str(tmp_path / "runs"),
        "base": {**TINY, "device": "auto", "train": {"epochs": 1, "lr": 3e-3}},
        "runs": {"a": {}},
    }
    report = run_study(raw)
    run_dir = tmp_path / "runs" / "s" / "a"
    before = _snapshot(run_dir)
    assert counted == ["a"]
    for overrides in (
        ["device=cpu"],
        ["output.progress=true", "output.tensorboard=true"],
        ["data.num_workers=1", "train.checkpoint_every_steps=3"],
        [],
    ):
        assert run_study(raw, overrides) == report
        assert counted == ["a"], overrides  # reused, not retrained
        assert _snapshot(run_dir) == before

    # A changed recipe would replace a finished run: only with fresh.
    with pytest.raises(ConfigError) as info:
        run_study(raw, ["train.lr=0.01"])
    message = str(info.value)
    assert "run 'a'" in message and "train.lr: 0.003 -> 0.01" in message
    assert "--fresh" in message and "\n" not in message
    assert counted == ["a"] and _snapshot(run_dir) == before
    run_study(raw, ["train.lr=0.01"], fresh=True)
    assert counted == ["a", "a"]


def test_an_interrupted_run_with_a_changed_key_is_restarted(
    tmp_path: Path, counted: list[str]
) -> None:
    raw = {"study": "s", "output": str(tmp_path / "runs"), "base": TINY, "runs": {"a": {}}}
    stopped = resolved(TINY, [f"output.dir={tmp_path / 'runs' / 's'}", "name=a"])
    assert runner.train(stopped, stop_after_epochs=1)["status"] == "stopped"
    run_study(raw, ["train.lr=0.01"])
    assert counted == ["a"]
    saved = resolved(study_mod.load_yaml(tmp_path / "runs" / "s" / "a" / "config.yaml"))
    assert saved.train.lr == 0.01


def test_study_errors_name_the_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"^title: Input should be a valid string, got 3$"):
        run_study({"study": "s", "title": 3, "runs": {"a": {}}})
    with pytest.raises(ConfigError, match=r"^runz: unknown key$"):
        run_study({"study": "s", "runs": {"a": {}}, "runz": {}})


def test_a_diverged_run_is_reported_and_not_retried(tmp_path: Path, counted: list[str]) -> None:
    # lr 1e6 makes the loss NaN within the first epoch
    raw = {
        "study": "s",
        "output": str(tmp_path / "runs"),
        "base": {**TINY, "train": {"epochs": 1, "lr": 1e6}},
        "runs": {"bad": {}, "good": {"train": {"lr": 3e-3}}},
    }
    report = run_study(raw)
    assert counted == ["bad", "good"]  # the study went on past the diverged run
    text = report.read_text()
    assert "| bad | diverged |" in text and "| good | complete |" in text
    run_study(raw)
    assert counted == ["bad", "good"]  # neither retrained nor resumed into the same NaN


@pytest.mark.slow
def test_study_attacks_every_run_and_tables_robust_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attacked: list[str] = []
    real_attack_run = study_mod.attack_run

    def counting_attack_run(run_dir, *args, **kwargs):
        attacked.append(Path(run_dir).name)
        return real_attack_run(run_dir, *args, **kwargs)

    monkeypatch.setattr(study_mod, "attack_run", counting_attack_run)
    base = {**BASE, "data": {**BASE["data"], "img_size": None}, "train": {"epochs": 1}}
    raw = {
        "study": "adv",
        "output": str(tmp_path / "runs"),
        "base": base,
        "runs": {"a": {}, "b": {"train": {"lr": 3e-3}}},
        "attacks": [{"name": "pgd", "eps": eps, "steps": 2} for eps in (0.05, 0.2)],
        "attack_limit": 40,
    }
    report = run_study(raw)
    assert attacked == ["a", "b"]
    text = report.read_text()
    assert "| run | clean top-1 | pgd-linf-0.05 | pgd-linf-0.2 |" in text
    rows = [line for line in text.split("## Robustness")[1].splitlines()
            if line.startswith(("| a |", "| b |"))]  # fmt: skip
    assert len(rows) == 2 and "n/a" not in "".join(rows)
    assert (report.parent / "robustness-pgd-linf.png").read_bytes()[:4] == b"\x89PNG"
    for run in ("a", "b"):
        assert (report.parent / run / "robustness.json").is_file()

    attacked.clear()
    assert run_study(raw).read_text() == text  # same attacks: each robustness.json is reused
    assert attacked == []
    raw["attacks"][1]["eps"] = 0.3
    assert "pgd-linf-0.3" in run_study(raw).read_text()
    assert attacked == ["a", "b"]


def test_study_attack_errors_name_the_key(tmp_path: Path) -> None:
    raw = {"study": "x", "base": BASE, "runs": {"a": {}}, "attacks": [{"eps": 0.1, "epss": 1}]}
    with pytest.raises(ConfigError, match=r"^attacks\.0\.epss: unknown key"):
        run_study(raw)
    raw["attacks"] = [{"eps": 0.1, "options": {"stepz": 3}}]  # refused before anything trains
    with pytest.raises(ConfigError, match=r"^attacks\.0\.options\.stepz: unknown option"):
        run_study(raw)


@pytest.mark.slow
def test_backdoor_study_defends_and_detects_every_poisoned_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`defenses:` repair each poisoned run (never the clean one) into `<run>-<label>` folders and
    `detectors:` score it; the report tables both, a failing defense is listed with its error,
    and a second call reuses every folder."""
    poison = {"trigger": "badnets", "options": {"size": 2}, "rate": 0.1}
    raw = {
        "study": "bd",
        "output": str(tmp_path / "runs"),
        "base": {**BASE, "train": {"epochs": 3, "lr": 3e-3}},
        "runs": {"clean": {}, "badnets": {"data": {"poison": poison}}},
        "defenses": {
            "ft": {"name": "ft", "clean_fraction": 0.2, "train": {"epochs": 3, "lr": 1e-3},
                   "train_by_model": {"simplenet": {"lr": 2e-3}, "vit-scratch": {"lr": 1.0}}},
            "broken": {"name": "fp", "options": {"max_ratio": 0.5}},
        },
        "detectors": ["spectral", "ac"],
    }
    # A bad defense config is refused before anything trains (tests/reliability); a defense
    # that fails while it runs is what the study lists and goes on from.
    from vptlab.steps import defend as defend_mod

    real_defend = defend_mod.defend

    def failing_fp(parent, defense, *args, **kwargs):
        if defense["name"] == "fp":
            raise ConfigError("train.objective: failed while defending")
        return real_defend(parent, defense, *args, **kwargs)

    monkeypatch.setattr(defend_mod, "defend", failing_fp)
    report = run_study(raw)
    out = report.parent
    assert (out / "badnets-ft" / "metrics.json").is_file()
    defended = load_yaml(out / "badnets-ft" / "config.yaml")["train"]
    assert defended["epochs"] == 3 and defended["lr"] == 2e-3  # the run's model's recipe
    assert not (out / "clean-ft").exists() and not (out / "badnets-broken").exists()
    text = report.read_text()
    defense_rows = [line for line in text.splitlines() if line.startswith("| badnets | ft |")]
    assert len(defense_rows) == 1
    assert "## Backdoor detection" in text and "| badnets |" in text.split("detection")[-1]
    header = next(line for line in text.split("## Backdoor detection")[1].splitlines()
                  if line.startswith("| run |"))  # fmt: skip
    assert "AC precision %" in header and "spectral recall %" in header
    assert "STRIP" not in header and "NC" not in header  # detectors the study did not run
    assert "`badnets` / `broken`: train.objective" in text
    mtime = (out / "badnets-ft" / "model.safetensors").stat().st_mtime_ns
    trained: list[str] = []
    monkeypatch.setattr(study_mod, "train", lambda cfg, **kw: trained.append(cfg.name))
    assert run_study(raw).read_text() == text
    assert trained == [] and (out / "badnets-ft" / "model.safetensors").stat().st_mtime_ns == mtime


def test_study_backbone_goes_to_runs_of_its_architecture() -> None:
    backbone = {"model": {"name": "vit-scratch"}}
    assert study_mod._takes_backbone({"model": {"name": "vit-scratch"}}, backbone)
    assert not study_mod._takes_backbone({"model": {"name": "simplenet"}}, backbone)
    assert not study_mod._takes_backbone({}, backbone)  # the default model, simplenet
    assert not study_mod._takes_backbone(
        {"model": {"name": "vit-scratch", "pretrained": False}}, backbone
    )


# A `seeds:` axis: every run once per seed, in <run>-s<seed> folders, reported over its seeds.


def test_seeds_axis_trains_each_run_once_per_seed(tmp_path: Path, counted: list[str]) -> None:
    base = {k: v for k, v in TINY.items() if k != "seed"}
    base["train"] = {"epochs": 1, "lr": 3e-3}
    raw = {"study": "s", "output": str(tmp_path / "runs"), "seeds": [0, 7], "base": base,
           "runs": {"a": {}}}  # fmt: skip
    report = run_study(raw)
    out = report.parent
    assert counted == ["a-s0", "a-s7"]
    assert [load_yaml(out / f"a-s{s}" / "config.yaml")["seed"] for s in (0, 7)] == [0, 7]
    text = report.read_text()
    assert "| top-1 | top-5 | catastrophic overfitting | s / epoch | wall s | n |" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| a |")]
    assert " ± " in row.split("|")[8] and row.endswith("| 2 |")
    appendix = text.split("## Appendix: per-seed results", 1)[1]
    assert "| a-s0 | complete |" in appendix and "| a-s7 | complete |" in appendix
    saved = study_mod.json.loads((out / "results.json").read_text())
    assert {name: (r["label"], r["seed"]) for name, r in saved.items()} == {
        "a-s0": ("a", 0), "a-s7": ("a", 7)}  # fmt: skip
    assert run_study(raw).read_text() == text and counted == ["a-s0", "a-s7"]  # reused per seed


def test_a_study_without_seeds_keeps_its_names_and_tables(tmp_path: Path) -> None:
    study = study_mod.StudyConfig(study="s", runs={"a": {}, "b": {}})
    assert study.run_names("a") == {"a": None}
    results = {"a": _metrics(90.0), "b": _metrics(80.0, asr=95.0)}
    text = study_mod.write_study_report(study, tmp_path, results).read_text()
    assert "| a | complete | simplenet | full | digits | 10 | 20 | 90.00 | 99.00 | n/a |" in text
    assert "| run | defense | trigger | CA before % | CA after % | ASR before % | ASR after % " \
           "| RA after % | ASR drop | DER |\n" in text  # fmt: skip
    assert "| b | ft | badnets | 80.00 | 79.00 | 95.00 | 23.75 | 50.00 | 71.25 | 0.800 |" in text
    assert "±" not in text and "| n |" not in text and "Appendix" not in text
    assert "trigger suite" not in text  # one poisoned run is no suite
    saved = study_mod.json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == ["a", "b"] and "label" not in saved["a"]


def test_a_seeded_report_gives_mean_std_n_and_the_trigger_suite(tmp_path: Path) -> None:
    study = study_mod.StudyConfig(study="s", seeds=[0, 1], runs={"bad": {}, "blend": {}})
    results = {
        "bad-s0": _metrics(88.0, asr=96.0, residual=30.0),
        "bad-s1": _metrics(86.0, asr=96.0, residual=34.0),
        "blend-s0": _metrics(80.0, asr=90.0),
        "blend-s1": {**_metrics(82.0, asr=80.0), "status": "diverged", "defended": {}},
    }
    text = study_mod.write_study_report(study, tmp_path, results).read_text()
    backdoor = text.split("## Backdoor", 1)[1]
    assert "| bad | badnets | 0.1 | 0 | all2one | dirty | 40 | 0 | 87.00 ± 1.41 | 96.00 ± 0.00 " \
           "| 4.00 ± 0.00 | 2 |" in backdoor  # fmt: skip
    assert "| blend | badnets | 0.1 | 0 | all2one | dirty | 40 | 0 | 80.00 | 90.00 | 10.00 | 1 |" \
           in backdoor  # fmt: skip
    defenses = text.split("## Backdoor defenses", 1)[1]
    assert "| ASR drop | DER | residual ASR % | n |" in defenses
    assert "| 0.800 ± 0.000 | 32.00 ± 2.83 | 2 |" in defenses
    suite = text.split("## Defenses over the trigger suite", 1)[1]
    # ASR after: bad 24.0 (its seeds' mean), blend 22.5; residual only measured on bad
    assert "| ft | 2 | 23.25 | 24.00 | 1.00 | 0.800 | 32.00 | 32.00 |" in suite
    assert "| bad-s1 | ft | badnets | 86.00 | 85.00 | 96.00 | 24.00 |" in text  # the appendix


def _metrics(top1: float, asr: float | None = None, residual: float | None = None) -> dict:
    """A finished run's metrics.json, poisoned and defended by `ft` where `asr` is given."""
    metrics: dict = {
        "status": "complete", "model": "simplenet", "mode": "full", "dataset": "digits",
        "params": {"trainable": 10, "total": 20},
        "final": {"test_top1": top1, "test_top5": 99.0},
        "history": [{"epoch": 1, "train_acc": top1, "test_top1": top1}],
    }  # fmt: skip
    if asr is not None:
        metrics["backdoor"] = {"trigger": "badnets", "rate": 0.1, "target": 0, "mode": "all2one",
                               "label": "dirty", "poisoned": 40, "cross_ratio": 0, "ca": top1,
                               "asr": asr, "ra": 100 - asr}  # fmt: skip
        defense = {"trigger": "badnets", "ca_before": top1, "ca_after": top1 - 1,
                   "asr_before": asr, "asr_after": asr / 4, "ra_after": 50.0,
                   "asr_drop": asr * 0.75, "der": 0.8}  # fmt: skip
        if residual is not None:
            defense["residual_asr"] = residual
        metrics["defended"] = {"ft": {"name": "x-ft", "defense": defense, "history": [],
                                      "status": "complete"}}  # fmt: skip
    return metrics


@pytest.mark.parametrize(
    ("change", "overrides", "expected"),
    [
        ({"seeds": []}, [], r"^seeds: List should have at least 1 item"),
        ({"seeds": [0, 1, 0]}, [], r"^seeds: seeds must be distinct, got \[0, 1, 0\]$"),
        ({"seeds": [0, -1]}, [], r"^seeds\.1: Input should be greater than or equal to 0"),
        ({"seeds": [True]}, [], r"^seeds\.0: Input should be a valid integer"),
        ({"seeds": [0, 1], "base": {"seed": 3}}, [], r"^base\.seed: the study's seeds axis "),
        ({"seeds": [0], "runs": {"a": {"seed": 3}}}, [], r"^runs\.a\.seed: the study's seeds "),
        ({"seeds": [0]}, ["seed=3"], r"^seed: the study's seeds axis sets each run's seed"),
    ],
)
def test_seeds_errors_name_the_key(change: dict, overrides: list[str], expected: str) -> None:
    raw = {"study": "s", "base": {"device": "cpu"}, "runs": {"a": {}}, **change}
    with pytest.raises(ConfigError, match=expected) as error:
        run_study(raw, overrides)
    assert "\n" not in str(error.value)
