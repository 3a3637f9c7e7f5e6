"""The HTML report in a real browser: headless Chromium opens a synthetic report (two tables, two
plots, one folded away) and must run its script without a console message, decode every image,
show every row and sort a table by raw values when asked through `?sort=`. Skipped where Chromium
is absent, except under CI (CI set), which must have it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from vptlab.report.browser import (
    WINDOW,
    PageCheck,
    check_page,
)
from vptlab.report.document import Details, Heading, Image, Paragraph, Table, write_report
from vptlab.report.plots import plot_asr_before_after, plot_clean_vs_robust
from vptlab.report.tables import Column, at, decimals

ATTACK_COLUMNS = (
    Column("run", at("name")),
    Column("clean top-1", at("clean"), decimals(2), "right"),
    Column("robust top-1", at("robust"), decimals(2), "right"),
)
# As text, "9.50" > "45.68" > "10.25": only a sort by value puts 45.678 first and 9.5 third.
ATTACKS = (
    {"name": "simplenet / full / pgd-at", "clean": 92.1, "robust": 9.5},
    {"name": "vit / vpt-deep / <b>trades</b>", "clean": 88.0, "robust": 45.678},
    {"name": "vit / linear / clean", "clean": 95.0, "robust": None},
    {"name": "simplenet / full / clean", "clean": 97.3, "robust": 10.25},
)
DEFENSE_COLUMNS = (
    Column("defense", at("name")),
    Column("ASR before %", at("before"), decimals(1), "right"),
    Column("ASR after %", at("after"), decimals(1), "right"),
)
DEFENSES = (
    {"name": "badnets / ft", "before": 100.0, "after": 1.5},
    {"name": "blended / nad", "before": 99.9, "after": 96.0},
)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    scatter, bars = out / "plots" / "clean_vs_robust.png", out / "plots" / "asr.png"
    plot_clean_vs_robust(
        {"simplenet / full": [(92.1, 9.5, "pgd-at"), (97.3, 10.25, "clean")],
         "vit / vpt-deep": [(88.0, 45.678, "trades")]},
        scatter, "clean vs robust",
    )  # fmt: skip
    plot_asr_before_after([(r["name"], r["before"], r["after"]) for r in DEFENSES], bars,
                          "ASR before / after")  # fmt: skip
    blocks = [
        Heading("Threat matrix", 1),
        Paragraph("Synthetic content, written by `test_browser.py`."),
        Table(ATTACK_COLUMNS, ATTACKS, id="attacks"),
        Image(scatter, "clean vs robust top-1"),
        Heading("Backdoor defenses"),
        Table(DEFENSE_COLUMNS, DEFENSES, id="defenses"),
        Details("ASR before and after, as a plot", [Image(bars, "ASR before / after")]),
    ]
    return write_report(blocks, out, "Threat matrix")[1]


@pytest.fixture(scope="module")
def checked(page: Path, chromium: str) -> PageCheck:
    return check_page(page, page.with_name("screenshot.png"), chromium, query="sort=attacks:2:desc")


def body_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, "no <body> in the DOM"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag.group(1)))


def test_page_runs_without_console_messages(checked: PageCheck) -> None:
    assert checked.console_errors == []


def test_every_image_decodes_and_every_table_is_sortable(checked: PageCheck) -> None:
    body = body_attrs(checked.dom)
    assert int(body["data-images"]) == 2  # the folded one too
    assert body["data-images-loaded"] == body["data-images"]
    assert body["data-tables"] == "2"


def test_rows_are_in_the_dom_and_sort_by_value(checked: PageCheck, read_tables) -> None:
    tables = read_tables(checked.dom)
    assert [[c.text for c in row] for row in tables["defenses"]] == [
        [c.text(r) for c in DEFENSE_COLUMNS] for r in DEFENSES
    ]
    # ?sort=attacks:2:desc: robust top-1 from high to low, the missing value last.
    assert [row[2].text for row in tables["attacks"]] == ["45.68", "10.25", "9.50", "n/a"]
    assert sorted(row[0].text for row in tables["attacks"]) == sorted(r["name"] for r in ATTACKS)
    assert 'aria-sort="descending">robust top-1</th>' in checked.dom
    assert "window.sortTable = sortTable" in checked.dom


def test_screenshot_shows_the_page(checked: PageCheck) -> None:
    with PILImage.open(checked.screenshot) as shot:
        assert shot.size == WINDOW
        pixels = np.asarray(shot.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # text, tables and plots, not a blank page


def test_console_messages_are_caught(tmp_path: Path, chromium: str) -> None:
    """The log format check_page parses, on the installed Chromium: a console.error, a message
    over two lines and an uncaught exception all come back."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><p>bad</p><script>console.error("x"); '
                   'console.error("two\\nlines"); missingFunction();</script>')  # fmt: skip
    messages = check_page(bad, tmp_path / "bad.png", chromium).console_errors
    assert messages[:2] == ["x", "two\nlines"]
    assert any(m.startswith("Uncaught ReferenceError: missingFunction") for m in messages)
