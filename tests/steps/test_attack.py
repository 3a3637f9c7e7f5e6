"""`vptlab attack RUN_DIR`: robustness.json, the report's Robustness section, the plots, the
example grid and the export, all in the attacked run's folder; bad options as one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from vptlab.cli import main
from vptlab.config import AttackConfig, ChecksConfig
from vptlab.errors import ConfigError
from vptlab.matrix.report import evasion_columns, unreliable_list
from vptlab.report.document import BulletList
from vptlab.report.tables import markdown_table
from vptlab.steps import train as runner
from vptlab.steps.attack import (
    build_attack,
    evaluate_attacks,
    is_current,
    replace_section,
    section_text,
)
from vptlab.steps.resolve import resolved
from vptlab.steps.study import robustness_section


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = resolved({
        "name": "digits", "seed": 0, "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "num_workers": 0, "eval_batch_size": 64},
        "model": {"name": "simplenet"},
        "train": {"epochs": 2, "lr": 3e-3},
        "output": {"dir": str(out), "tensorboard": False, "progress": False},
    })  # fmt: skip
    runner.train(cfg)
    return out / "digits"


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, so each test sees a clean folder."""
    return Path(shutil.copytree(trained_run, tmp_path / "digits"))


@pytest.mark.slow
def test_attack_writes_results_into_the_run_folder(run: Path, tmp_path: Path, capsys) -> None:
    neighbour = Path(shutil.copytree(run, tmp_path / "other"))
    before = {p.name: p.read_bytes() for p in neighbour.iterdir() if p.is_file()}
    export = tmp_path / "adv.safetensors"
    argv = ["attack", str(run), "--eps", "0.05,0.1,0.3", "--steps", "3", "--limit", "70",
            "--device", "cpu", "--examples", "4", "--export", str(export)]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["samples"] == 70

    result = json.loads((run / "robustness.json").read_text())
    assert result["samples"] == 70 and result["limit"] == 70 and result["seconds"] > 0
    assert [a["metric"] for a in result["attacks"]] == ["pgd-linf-0.05", "pgd-linf-0.1",
                                                        "pgd-linf-0.3"]  # fmt: skip
    assert result["attacks"][0]["steps"] == 3 and result["attacks"][0]["name"] == "pgd"
    accs = [result["metrics"][f"{a['metric']}/acc"] for a in result["attacks"]]
    assert accs == sorted(accs, reverse=True) and accs[0] <= result["metrics"]["clean/top1"]

    report = (run / "report.md").read_text()
    assert report.startswith("# Run `digits`")  # the training report is kept
    assert report.count("## Robustness") == 1
    assert "| pgd-linf-0.3 | linf | 0.3 | 3 |" in report
    assert "![robust accuracy vs eps](robustness-pgd-linf.png)" in report
    assert "![adversarial examples](adversarial_examples.png)" in report
    for png in ("robustness-pgd-linf.png", "adversarial_examples.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"

    tensors = load_file(str(export))
    adv, labels = tensors["adversarial"], tensors["labels"]
    assert adv.dtype == torch.float32 and adv.shape[0] == 70 and adv.shape[1] == 3
    assert 0.0 <= float(adv.min()) and float(adv.max()) <= 1.0
    from vptlab.steps.train import load_run

    _, _, splits = load_run(run, device="cpu")
    assert torch.equal(labels, splits.test.y[:70])
    assert torch.equal(tensors["index"], torch.arange(70))
    assert len(tensors["predictions"]) == 70
    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["attack"])["eps"] == 0.3 and meta["pixels"] == "float32 in [0,1]"
    # never another run's files
    assert {p.name: p.read_bytes() for p in neighbour.iterdir() if p.is_file()} == before

    # A second evaluation replaces its own section, and the file, nothing else.
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attacks": [{"name": "fgsm", "eps": 0.1}]}))
    assert main(["attack", str(run), "--config", str(config), "--limit", "20",
                 "--device", "cpu"]) == 0  # fmt: skip
    again = (run / "report.md").read_text()
    assert again.count("## Robustness") == 1 and "fgsm-linf-0.1" in again
    assert "pgd-linf-0.3" not in again
    assert json.loads((run / "robustness.json").read_text())["samples"] == 20


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--attack", "cw", "--eps", "0.1"], "vptlab: error: --attack: unknown attack 'cw'"),
        (["--eps=-0.1"], "vptlab: error: --eps: Input should be greater than or equal to 0"),
        (["--eps", "0.1", "--steps", "0"], "vptlab: error: --steps: Input should be greater"),
        (["--eps", "8"], "vptlab: error: --eps: eps 8.0 is above 1"),
        (["--eps", "0.1,x"], "vptlab: error: --eps: expected numbers"),
        (["--eps", "0.1", "--norm", "l3"], "vptlab: error: --norm: Input should be 'linf'"),
        (["--eps", "0.1", "--limit", "0"], "vptlab: error: --limit must be >= 1, got 0"),
        ([], "vptlab: error: --eps is needed"),
        (["--config", "a.yaml", "--steps", "5"], "vptlab: error: --steps and --config exclude"),
        (["--eps", "0.1", "--batch-size", "0"], "vptlab: error: --batch-size must be >= 1"),
        (["--eps", "0.1", "--check-samples", "0"], "vptlab: error: --check-samples must be >= 1"),
        (["--eps", "0.1", "--version", "plus"], "vptlab: error: --version: attack 'pgd' takes no"),
        (["--config", "a.yaml", "--queries", "5"], "vptlab: error: --queries and --config"),
    ],
)
def test_bad_options_are_one_line(
    tmp_path: Path, capsys, options: list[str], expected: str
) -> None:
    # Checked before the run is loaded: no run folder is needed.
    assert main(["attack", str(tmp_path / "nowhere"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_attack_file_errors_name_the_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attacks": [{"name": "pgd", "eps": 0.1, "epss": 2}]}))
    assert main(["attack", str(tmp_path), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vptlab: error: {config}: attacks.0.epss: unknown key"), err
    assert err.count("\n") == 1


def test_replace_section_keeps_the_rest() -> None:
    text = "# Run\n\nbody\n\n## Robustness\n\nold\n\n## Later\n\nkept\n"
    new = replace_section(text, "Robustness", "## Robustness\n\nnew\n")
    assert new == "# Run\n\nbody\n\n## Robustness\n\nnew\n\n## Later\n\nkept\n"
    assert replace_section("# Run\n", "Robustness", "## Robustness\n\nx\n") == (
        "# Run\n\n## Robustness\n\nx\n"
    )


@pytest.mark.slow
def test_a_number_that_fails_a_check_is_marked_everywhere(run: Path, capsys) -> None:
    """One PGD step of a tiny alpha has not converged: robustness.json says why, the report's
    table marks the number and footnotes the reason, the CLI prints it."""
    argv = ["attack", str(run), "--eps", "0.15", "--steps", "1", "--alpha", "0.001",
            "--limit", "64", "--check-samples", "48", "--device", "cpu", "--examples", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out.strip().splitlines()[-1])  # stdout stays one JSON line
    acc = printed["pgd-linf-0.15/acc"]
    assert f"vptlab: pgd-linf-0.15 = {acc:.2f}% is unreliable: " in err
    assert "not converged: PGD with 2 steps and 2 restarts leaves" in err

    result = json.loads((run / "robustness.json").read_text())
    checks = result["checks"]
    assert checks["samples"] == 48 and checks["settings"] == {**ChecksConfig().model_dump(),
                                                              "samples": 48}  # fmt: skip
    assert {c["check"] for c in checks["results"]} == {"monotone", "gray_budget", "more_steps",
                                                       "square"}  # fmt: skip
    steps = next(c for c in checks["results"] if c["check"] == "more_steps")
    assert steps["passed"] is False and steps["metrics"] == ["pgd-linf-0.15"]
    assert set(steps["numbers"]) == {"pgd-linf-0.15", "stronger:pgd-linf-0.15"}
    assert any(r.startswith("not converged") for r in result["unreliable"]["pgd-linf-0.15"])

    report = (run / "report.md").read_text()
    assert f"| {acc:.2f} † |" in report
    assert "- † pgd-linf-0.15: unreliable, not converged: PGD with 2 steps" in report
    assert "Sanity checks (monotone in eps" in report

    # The same attack with other check settings is not current: it is evaluated again.
    configs = [AttackConfig(eps=0.15, steps=1, alpha=0.001)]
    assert is_current(run, configs, 64, ChecksConfig(samples=48))
    assert not is_current(run, configs, 64, ChecksConfig(samples=32))
    assert not is_current(run, configs, 64)  # the default checks: 100 samples

    assert main([*argv, "--no-checks"]) == 0
    assert "unreliable" not in capsys.readouterr().err
    off = json.loads((run / "robustness.json").read_text())
    assert off["checks"]["results"] == [] and off["unreliable"] == {"pgd-linf-0.15": []}
    assert off["checks"]["settings"]["enabled"] is False
    report = (run / "report.md").read_text()
    assert "†" not in report and "Sanity checks: off" in report


@pytest.mark.slow
def test_masked_model_is_unreliable_in_json_and_tables(
    trained_run: Path, tmp_path: Path, gradient_masked
) -> None:
    cfg, model, splits = runner.load_run(trained_run, device="cpu")
    configs = [AttackConfig(eps=eps, steps=5) for eps in (0.1, 0.2)]
    result = evaluate_attacks(
        cfg, gradient_masked(model), splits, configs, tmp_path, model_sha256="-", limit=64,
        examples=0, progress=False, checks=ChecksConfig(samples=64, square_queries=100),
    )  # fmt: skip
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["unreliable"] == result["unreliable"]
    for metric in ("pgd-linf-0.1", "pgd-linf-0.2"):  # Square at 0.2 speaks for the family
        reasons = saved["unreliable"][metric]
        assert any(r.startswith("gradient masking: at eps 0.2 Square leaves") for r in reasons)
        assert any("gray out any image" in r for r in reasons)
    failed = {c["check"] for c in saved["checks"]["results"] if c["passed"] is False}
    assert failed == {"gray_budget", "square"}

    # the run's report
    text = section_text(result, [], grid=False)
    acc = result["metrics"]["pgd-linf-0.2/acc"]
    assert f"| {acc:.2f} † |" in text and "- † pgd-linf-0.2: unreliable, " in text
    # a study's table: one row per run
    study = "\n".join(robustness_section(tmp_path, {"masked": {"robustness": result}}))
    assert f"| masked | {result['metrics']['clean/top1']:.2f} | " in study
    assert f"{acc:.2f} † |" in study and "- † masked, pgd-linf-0.2: unreliable, " in study
    # a matrix's evasion table: one row per cell
    cell = {"id": "m/full/pgd/none", "model": "m", "adaptation": "full", "defense": "none",
            "status": "complete", "metrics": result["metrics"], "attacks": result["attacks"],
            "unreliable": result["unreliable"]}  # fmt: skip
    table = markdown_table(evasion_columns([cell]), [cell])
    assert f"| {acc:.2f} † |" in table
    (notes,) = unreliable_list([cell])
    assert isinstance(notes, BulletList)
    assert notes.items[0].startswith("† m/full/pgd/none, pgd-linf-0.1: unreliable, ")


@pytest.mark.parametrize("name", ["fgsm", "pgd", "square", "autoattack"])
def test_attacks_from_configs_run_in_fp32_unless_amp(name: str) -> None:
    if name in ("square", "autoattack"):
        pytest.importorskip("pyautoattack")
    assert build_attack(AttackConfig(name=name, eps=0.1)).amp is False
    assert build_attack(AttackConfig(name=name, eps=0.1, amp=True)).amp is True


@pytest.mark.parametrize("name", ["fgsm", "pgd", "square", "autoattack"])
def test_default_attacks_switch_autocast_off(name: str) -> None:
    """Inside someone else's autocast region (the training loop's), the model's forwards in an
    attack still run without autocast."""
    if name in ("square", "autoattack"):
        pytest.importorskip("pyautoattack")
    seen: list[bool] = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.linear(x.flatten(1))

    options = {"square": {"n_queries": 5},
               "autoattack": {"version": "custom", "attacks": ["apgd-ce"]}}.get(name, {})
    attack = build_attack(AttackConfig(name=name, eps=0.1, steps=2, options=options))
    x, y = torch.rand(4, 3, 4, 4), torch.arange(4) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack(Recorder().eval(), x, y)
    assert seen and not any(seen)
    assert x_adv.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("square", {"foo": 1},
         r"^attack\.options\.foo: unknown option; attack 'square' takes: n_queries, p_init, seed$"),
        ("pgd", {"n_queries": 10}, r"^attack\.options\.n_queries: unknown option; attack 'pgd'"),
        ("square", {"eps": 0.2},
         r"^attack\.options\.eps: not an option here; set it as attack\.eps$"),
        ("square", {"steps": 3}, r"^attack\.options\.steps: .*attack 'square' takes no steps$"),
        ("square", {"n_queries": "many"}, r"^attack\.options\.n_queries: .*valid integer"),
    ],
)  # fmt: skip
def test_attack_options_are_checked_never_dropped(name: str, options: dict, expected: str) -> None:
    pytest.importorskip("pyautoattack")
    with pytest.raises(ConfigError, match=expected) as err:
        build_attack(AttackConfig(name=name, eps=0.1, options=options))
    assert "\n" not in str(err.value)


def test_attack_options_reach_the_attack() -> None:
    pytest.importorskip("pyautoattack")
    attack = build_attack(AttackConfig(name="square", eps=0.1, restarts=2,
                                       options={"n_queries": 123, "p_init": 0.5}))  # fmt: skip
    assert (attack.n_queries, attack.p_init, attack.restarts) == (123, 0.5, 2)
    assert attack.name == "square-linf-0.1"


def test_square_from_the_command_line(run: Path, capsys) -> None:
    pytest.importorskip("pyautoattack")
    argv = ["attack", str(run), "--attack", "square", "--eps", "0.1,0.3", "--queries", "50",
            "--limit", "20", "--device", "cpu", "--examples", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((run / "robustness.json").read_text())
    assert [a["metric"] for a in result["attacks"]] == ["square-linf-0.1", "square-linf-0.3"]
    assert result["attacks"][0]["options"] == {"n_queries": 50}
    assert result["attacks"][0]["amp"] is False
    accs = [result["metrics"][f"{a['metric']}/acc"] for a in result["attacks"]]
    assert accs[1] <= accs[0] <= result["metrics"]["clean/top1"]


def test_attack_file_options_are_checked_before_the_run_is_loaded(tmp_path: Path, capsys) -> None:
    pytest.importorskip("pyautoattack")
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump(
        {"attacks": [{"name": "pgd", "eps": 0.1},
                     {"name": "square", "eps": 0.1, "options": {"n_querys": 10}}]}
    ))  # fmt: skip
    assert main(["attack", str(tmp_path / "nowhere"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"vptlab: error: {config}: attacks.1.options.n_querys: unknown option; attack 'square'"
    ), err
    assert err.count("\n") == 1


def test_autoattack_flags_reach_robustness_json_and_the_report(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The authors' checks warn through their logger; what they say is kept per attack."""
    pytest.importorskip("pyautoattack")
    from pyautoattack import autoattack as authors

    said = "it seems to be a dynamic defense! The evaluation with AutoAttack might be insufficient."

    def dynamic(model, x, is_tf_model=False, logger=None):
        logger.warning(said)

    monkeypatch.setattr(authors.checks, "check_dynamic", dynamic)
    threads = torch.get_num_threads()  # one thread: two spin on a loaded two-core machine
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    config = tmp_path / "attack.yaml"
    apgd_ce = {"version": "custom", "attacks": ["apgd-ce"]}
    config.write_text(yaml.safe_dump({"attacks": [
        # eps 1: APGD-CE breaks every digit in its first restart, so this takes seconds
        {"name": "autoattack", "eps": 1.0, "options": apgd_ce},
        {"name": "pgd", "eps": 0.1, "steps": 3},
    ]}))  # fmt: skip
    argv = ["attack", str(run), "--config", str(config), "--limit", "24", "--batch-size", "8",
            "--device", "cpu", "--examples", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((run / "robustness.json").read_text())
    aa, pgd = result["attacks"]
    assert aa["metric"] == "autoattack-linf-1" and aa["flags"] == [said]  # 3 batches, kept once
    assert aa["options"] == apgd_ce
    assert pgd["flags"] == []
    assert result["metrics"]["autoattack-linf-1/acc"] == 0
    report = (run / "report.md").read_text()
    assert f"autoattack-linf-1: unreliable, AutoAttack's own check: {said}" in report
    assert result["unreliable"]["autoattack-linf-1"][-1] == f"AutoAttack's own check: {said}"
