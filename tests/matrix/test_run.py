"""A small threat matrix end to end: every cell that makes sense completes and is in both reports,
a failing training step fails only its cells, a matrix killed mid-way and run again gives the same
tables as one uninterrupted run, finished cells are reused, and the page renders in Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vptlab.matrix import run as run_mod
from vptlab.matrix.report import write_matrix_report
from vptlab.matrix.run import run_matrix
from vptlab.runs import CELL_FILE

BASE = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "img_size": 16, "batch_size": 64, "num_workers": 0},
    "train": {"epochs": 2, "lr": 3e-3, "weight_decay": 0.0},
    "output": {"tensorboard": False, "progress": False},
}


def small_matrix(out: Path, name: str = "m") -> dict[str, Any]:
    return {
        "matrix": name,
        "title": "small <matrix> & co",
        "output": str(out),
        "base": BASE,
        "models": {"simplenet": {"model": {"name": "simplenet"}}},
        "threats": {
            "clean": {"kind": "clean"},
            "pgd": {"kind": "evasion", "attacks": [
                {"name": "pgd", "eps": 0.05, "alpha": 0.02, "steps": 3},
                {"name": "pgd", "eps": 0.1, "alpha": 0.04, "steps": 3}]},
            "badnets": {"kind": "backdoor", "poison": {
                "trigger": "badnets", "rate": 0.1, "target": 0, "options": {"size": 3}}},
        },  # fmt: skip
        "defenses": {
            "none": {"kind": "none"},
            "pgd-at": {"kind": "adversarial", "train": {
                "objective": "pgd", "attack": {"eps": 0.1, "alpha": 0.05, "steps": 2},
                "robust_probe": 64}},
            "ft": {"kind": "repair", "name": "ft", "clean_fraction": 0.2,
                   "train": {"epochs": 2, "lr": 1e-2}},
        },  # fmt: skip
        # No adaptive search: these tests compare tables across executors and kill-resume runs
        # in subprocesses (tests/conftest.py shrinks the search in-process only).
        # The sanity checks run (tests/metrics cover what they find) on a small sample: Square
        # at its default 250 queries over 96 images was a fifth of every run of this matrix.
        "evaluation": {"limit": 96, "examples": 4, "adaptive": False,
                       "checks": {"samples": 32, "square_queries": 50}},
    }


def threat_tables(report_md: Path) -> str:
    """The per-threat sections of report.md: the numbers, without any timing."""
    text = report_md.read_text()
    start = text.index("## Threat: ")
    return text[start:text.index("\n## ", text.rindex("## Threat: ") + 1)]


def cell_metrics(out: Path) -> dict[str, Any]:
    cells = {}
    for path in sorted((out / "cells").glob(f"*/{CELL_FILE}")):
        cell = json.loads(path.read_text())
        cells[cell["id"]] = (cell["status"], cell.get("metrics"), cell.get("derived"))
    return cells


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Tables are compared across processes: the same thread count gives the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, one_thread: Any) -> Path:
    out = tmp_path_factory.mktemp("matrix")
    run_matrix(small_matrix(out), progress=False)
    return out / "m"


def test_every_cell_runs_or_is_skipped_with_reason(finished: Path) -> None:
    plan = json.loads((finished / "matrix.json").read_text())
    assert len(plan["cells"]) == 9
    cells = cell_metrics(finished)
    skipped = {c["id"] for c in plan["cells"] if c["skip"]}
    assert skipped == {"simplenet/full/clean/ft", "simplenet/full/pgd/ft",
                       "simplenet/full/badnets/pgd-at"}  # fmt: skip
    assert set(cells) == {c["id"] for c in plan["cells"]} - skipped
    assert all(status == "complete" for status, _, _ in cells.values())
    # three training runs serve the six cells
    assert len([p for p in (finished / "runs").iterdir() if p.is_dir()]) == 3 + 1  # + defended

    std = cells["simplenet/full/pgd/none"][1]
    adv = cells["simplenet/full/pgd/pgd-at"][1]
    assert std["clean/top1"] > 50  # it learned (10 classes)
    robust = [k for k in std if k.endswith("/acc")]
    assert len(robust) == 2 and all(std[k] <= std["clean/top1"] for k in robust)
    assert max(adv[k] for k in robust) > 0 and "clean/top1" in adv
    backdoor = cells["simplenet/full/badnets/none"][1]
    assert backdoor["badnets/asr"] > 50  # the backdoor took
    repaired, derived = cells["simplenet/full/badnets/ft"][1:]
    assert set(derived) == {"asr_drop", "ca_drop", "der"}  # evaluation.adaptive: false
    assert repaired["badnets/asr"] == pytest.approx(backdoor["badnets/asr"] - derived["asr_drop"])


def test_reports_hold_every_cell(finished: Path) -> None:
    md = (finished / "report.md").read_text()
    html = (finished / "report.html").read_text()
    plan = json.loads((finished / "matrix.json").read_text())
    for cell in plan["cells"]:
        assert cell["id"] in md and cell["id"] in html
    for heading in ("Threat: clean", "Threat: pgd", "Threat: badnets", "Skipped cells", "Cells"):
        assert heading in md and heading in html
    assert "small &lt;matrix&gt; &amp; co" in html and "<matrix>" not in html
    # a threat with an adversarially trained (probed) run marks catastrophic overfitting; the
    # backdoor threat has none (its pgd-at cell is skipped)
    sections = md.split("## Threat: ")
    pgd = next(s for s in sections if s.startswith("pgd"))
    badnets = next(s for s in sections if s.startswith("badnets"))
    assert "| catastrophic overfitting |" in pgd and "| pgd-at | complete | no |" in pgd
    assert "catastrophic overfitting" not in badnets
    assert "best top-1" not in md
    assert "https://" not in html and "http://" not in html
    images = re.findall(r'src="data:image/png;base64,', html)
    # scatter, ASR chart, curves and at least the PGD and backdoor grids
    assert len(images) >= 5
    # rebuilt from the folders alone, the report is the same
    before = threat_tables(finished / "report.md")
    write_matrix_report(finished)
    assert threat_tables(finished / "report.md") == before


def test_finished_cells_are_reused(finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fit = run_mod.run_cell

    def counting(payload: dict[str, Any]) -> dict[str, Any]:
        result = real_fit(payload)
        calls.append(payload["cell"].id)
        return result

    monkeypatch.setattr(run_mod, "run_cell", counting)
    stamps = {p: p.stat().st_mtime_ns for p in (finished / "cells").glob(f"*/{CELL_FILE}")}
    run_matrix(small_matrix(finished.parent), progress=False)
    assert len(calls) == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing rewritten


def test_failed_training_fails_only_its_cells(tmp_path: Path, one_thread: Any) -> None:
    raw = small_matrix(tmp_path)
    # clean-label poisoning of 90% of the train split: more than the target class holds
    raw["threats"]["badnets"]["poison"].update(label="clean", rate=0.9)
    raw["defenses"] = {"none": {"kind": "none"}}
    raw["threats"].pop("pgd")
    run_matrix(raw, progress=False)
    cells = {json.loads(p.read_text())["id"]: json.loads(p.read_text())
             for p in (tmp_path / "m" / "cells").glob(f"*/{CELL_FILE}")}  # fmt: skip
    assert cells["simplenet/full/clean/none"]["status"] == "complete"
    failed = cells["simplenet/full/badnets/none"]
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert "training" in failed["error"] and "clean-label" in failed["error"]
    md = (tmp_path / "m" / "report.md").read_text()
    assert "## Failed cells" in md and failed["error"] in md


@pytest.mark.slow
def test_pixel_prompt_adaptation_runs_in_a_matrix(tmp_path: Path, one_thread: Any) -> None:
    """A pixel-prompt adaptation of the small matrix: PGD on the prompted model and a prompt
    backdoor repaired by ft run to the end (example grids at data.img_size); fine-pruning the
    frozen backbone is skipped with its reason. (PGD-AT prompts: test_plan.py plans them,
    tests/defenses/test_pixel_prompts.py trains them.)"""
    raw = small_matrix(tmp_path)
    raw["threats"].pop("clean")
    raw["defenses"].pop("pgd-at")
    pixel = {"kind": "padding", "size": 2, "mapping": "linear", "source_classes": 10}
    raw["adaptations"] = {"pixel": {"adapt": {"mode": "pixel", "pixel": pixel},
                                    "train": {"lr": 5e-2, "epochs": 1}}}  # fmt: skip
    raw["defenses"]["ft"]["train"]["epochs"] = 1
    raw["defenses"]["fp"] = {"kind": "repair", "name": "fp", "train": {"epochs": 1}}
    run_matrix(raw, progress=False)
    cells = {json.loads(p.read_text())["id"]: json.loads(p.read_text())
             for p in (tmp_path / "m" / "cells").glob(f"*/{CELL_FILE}")}  # fmt: skip
    ran = ["pgd/none", "badnets/none", "badnets/ft"]
    assert set(cells) == {f"simplenet/pixel/{c}" for c in ran}
    assert all(c["status"] == "complete" and c["train"]["mode"] == "pixel" for c in cells.values())
    backdoor = cells["simplenet/pixel/badnets/ft"]
    assert "badnets/asr" in backdoor["metrics"] and backdoor["grids"]
    plan = json.loads((tmp_path / "m" / "matrix.json").read_text())["cells"]
    skipped = {c["id"]: c["skip"] for c in plan if c["skip"]}
    assert "backbone's layers" in skipped["simplenet/pixel/badnets/fp"]


@pytest.mark.slow
def test_killed_matrix_finishes_with_the_same_tables(
    tmp_path: Path, finished: Path
) -> None:
    """Killed (SIGKILL) twice, while training its second run and while evaluating its cells, then
    run to the end: the same tables and cell metrics as one uninterrupted run."""
    config = tmp_path / "matrix.yaml"
    config.write_text(yaml.safe_dump(small_matrix(tmp_path), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vptlab.cli", "run", "-c", str(config), "--no-progress"]
    out = tmp_path / "m"

    def folders(name: str) -> int:
        path = out / name
        return len([p for p in path.iterdir() if p.is_dir()]) if path.is_dir() else 0

    for moment in (lambda: folders("runs") >= 2, lambda: folders("cells") >= 2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not moment():
            time.sleep(0.02)
        assert proc.poll() is None, "the matrix finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "report.md").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert threat_tables(out / "report.md") == threat_tables(finished / "report.md")
    assert cell_metrics(out) == cell_metrics(finished)


@pytest.mark.slow
def test_ray_executor_gives_the_local_table(tmp_path: Path, finished: Path) -> None:
    """The same matrix on a local Ray (2 CPUs, one task per training run and per cell, one
    thread each): the same tables as the local executor's."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'vptlab[ray]'")
    run_matrix(small_matrix(tmp_path), executor="ray", ray_cpus=2, progress=False)
    assert threat_tables(tmp_path / "m" / "report.md") == threat_tables(finished / "report.md")
    assert cell_metrics(tmp_path / "m") == cell_metrics(finished)


def test_matrix_page_in_chromium(finished: Path, chromium: str, read_tables: Any,
                                 tmp_path: Path) -> None:  # fmt: skip
    """The real page in headless Chromium: no console message, every image decoded, every cell
    in its table, a screenshot that is not blank."""
    import numpy as np
    from PIL import Image

    from vptlab.report.browser import check_page

    page = check_page(finished / "report.html", tmp_path / "shot.png", chromium)
    assert page.console_errors == []
    loaded = re.search(r'data-images-loaded="(\d+)"', page.dom)
    total = re.search(r'data-images="(\d+)"', page.dom)
    assert loaded and total and int(total.group(1)) >= 5
    assert loaded.group(1) == total.group(1)
    tables = read_tables(page.dom)
    plan = json.loads((finished / "matrix.json").read_text())
    for threat in ("clean", "pgd", "badnets"):
        ids = {c["id"] for c in plan["cells"] if c["threat"] == threat and not c["skip"]}
        rows = tables[f"threat-{threat}"]
        assert len(rows) == len(ids)
        assert {"/".join(["simplenet", r[1].text, threat, r[2].text]) for r in rows} == ids
    assert {r[0].text for r in tables["cells"]} == {c["id"] for c in plan["cells"]
                                                     if not c["skip"]}  # fmt: skip
    pixels = np.asarray(Image.open(page.screenshot).convert("L"), dtype=float)
    assert pixels.std() > 5


def test_seeds_axis_runs_each_cell_per_seed(tmp_path: Path, one_thread: Any) -> None:
    """A 2-seed matrix (clean and a backdoor, one epoch): a training run and a cell folder per
    seed, and threat tables of one row per cell with mean ± std and n, the seeds in an appendix."""
    raw = small_matrix(tmp_path, "s")
    raw["base"] = {k: v for k, v in BASE.items() if k != "seed"}
    raw["base"]["train"] = {**BASE["train"], "epochs": 1}
    raw["threats"].pop("pgd")
    raw["defenses"] = {"none": {"kind": "none"}}
    raw["evaluation"] = {"examples": 0}
    raw["seeds"] = [0, 1]
    html = run_matrix(raw, progress=False)
    out = tmp_path / "s"
    plan = json.loads((out / "matrix.json").read_text())
    assert plan["config"]["seeds"] == [0, 1]
    assert [c["id"] for c in plan["cells"]] == [
        f"simplenet/full/{t}/none/s{s}" for t in ("clean", "badnets") for s in (0, 1)]
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert len(runs) == 4 and {r[-3:] for r in runs} == {"-s0", "-s1"}
    assert len({r.removesuffix("-s0").removesuffix("-s1") for r in runs}) == 2
    cells = cell_metrics(out)
    assert set(cells) == {c["id"] for c in plan["cells"]}
    assert all(status == "complete" for status, _, _ in cells.values())
    assert all(Path(c["folder"]).name.endswith(f"-s{c['seed']}") for c in plan["cells"])

    md = (out / "report.md").read_text()
    clean = [cells[f"simplenet/full/clean/none/s{s}"][1]["clean/top1"] for s in (0, 1)]
    mean, std = sum(clean) / 2, abs(clean[0] - clean[1]) / 2**0.5
    section = md[md.index("## Threat: clean"):md.index("## Threat: badnets")]
    assert "| n |" in section and f"| {mean:.2f} ± {std:.2f} |" in section
    assert section.count("| simplenet | full | none | complete |") == 1
    assert section.rstrip().endswith("| 2 |")
    assert "Seeds: 0, 1" in md and "## Appendix: per-seed results" in md
    appendix = md[md.index("## Appendix"):]
    assert appendix.count("| simplenet | full | none | complete |") == 4
    page = html.read_text()
    clean_table = page[page.index('id="threat-clean"'):]
    clean_table = clean_table[:clean_table.index("</table>")]
    assert clean_table.count("<tr>") == 2 and "±" in clean_table  # the titles, one cell
    assert 'id="threat-clean-seeds"' in page[page.index("<details>"):]


def test_report_command(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vptlab.cli import main

    assert main(["report", str(finished)]) == 0
    assert str(finished / "report.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no threat matrix" in err and "\n" not in err
