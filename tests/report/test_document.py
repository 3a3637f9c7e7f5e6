"""The report document model: the same blocks as Markdown and as one self-contained HTML page
(escaped text, inlined images, sortable tables with raw sort values), and the two report plots
as non-blank PNGs. No browser here: tests/report/test_browser.py opens the page."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import matplotlib.image
import pytest

from vptlab.report.document import (
    BulletList,
    Code,
    Details,
    Heading,
    Image,
    Paragraph,
    Table,
    to_html,
    to_markdown,
    write_report,
)
from vptlab.report.plots import plot_asr_before_after, plot_clean_vs_robust
from vptlab.report.tables import Column, at, decimals, number

EVIL = "<script>alert('x')</script> & co"
COLUMNS = (
    Column("run", at("name")),
    Column("eps", at("eps"), number, "right"),
    Column("robust top-1", at("acc"), decimals(2), "right"),
)
ROWS = (
    {"name": "pgd-at | fast", "eps": 0.0314, "acc": 45.678},
    {"name": EVIL, "eps": 8, "acc": None},
    {"name": "clean", "eps": 0.3, "acc": 9.5},
)


@pytest.fixture(scope="module")
def plots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("plots")
    scatter, bars = out / "plots" / "clean_vs_robust.png", out / "plots" / "asr.png"
    plot_clean_vs_robust(
        {"simplenet / full": [(92.1, 40.2, "pgd-at"), (95.0, 3.1, "clean")],
         "vit / vpt-deep": [(88.0, 30.5, "trades")]},
        scatter, "clean vs robust",
    )  # fmt: skip
    plot_asr_before_after([("badnets / ft", 100.0, 1.5), ("blended / nad", 99.9, 96.0)], bars,
                          "ASR before / after")  # fmt: skip
    return scatter, bars


def blocks(images: list[Path]) -> list:
    return [
        Heading("Threat matrix", 1),
        Paragraph(f"Rebuilt by `vptlab report` from {EVIL}."),
        Table(COLUMNS, ROWS, id="attacks"),
        *(Image(path, f"plot {i}") for i, path in enumerate(images)),
        Details("The config", [Code("attack:\n  eps: 0.03\n"), BulletList(["one", EVIL])]),
    ]


@pytest.mark.parametrize("plot", [0, 1])
def test_plots_write_non_blank_pngs(plots: tuple[Path, Path], plot: int) -> None:
    path = plots[plot]
    assert path.read_bytes().startswith(b"\x89PNG")
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # not one flat colour
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_text_is_escaped_everywhere(plots: tuple[Path, Path]) -> None:
    page = to_html(blocks(list(plots)), title=EVIL)
    assert "<script>alert" not in page
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co") == 4
    assert page.count("<script>") == 1  # the page's own sort script, nothing else
    assert "<code>vptlab report</code>" in page


def test_page_is_self_contained(plots: tuple[Path, Path]) -> None:
    page = to_html(blocks(list(plots)), title="report")
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(u) for u in uris] == [p.read_bytes() for p in plots]
    for reference in ("http://", "https://", 'src="/', "href=\"/", "url("):
        assert reference not in page
    assert 'class="sortable" id="attacks"' in page and "<details>" in page


def test_numeric_cells_sort_by_their_raw_value(read_tables) -> None:
    rows = read_tables(to_html([Table(COLUMNS, ROWS, id="attacks")], "t"))["attacks"]
    assert [row[0].text for row in rows] == [r["name"] for r in ROWS]
    assert all("data-sort" not in row[0].attrs for row in rows)  # text sorts by its text
    for row, raw in zip(rows, ROWS, strict=True):
        assert float(row[1].attrs["data-sort"]) == raw["eps"]
    acc = [row[2] for row in rows]
    assert float(acc[0].attrs["data-sort"]) == 45.678 and acc[0].text == "45.68"  # not rounded
    assert "data-missing" in acc[1].attrs and "data-sort" not in acc[1].attrs
    assert acc[1].text == "n/a"


def test_nan_is_missing_and_infinity_readable_by_javascript(read_tables) -> None:
    rows = [{"name": "a", "acc": float("nan")}, {"name": "b", "acc": float("-inf")}]
    cells = read_tables(to_html([Table(COLUMNS[::2], rows, id="t")], "t"))["t"]
    assert "data-missing" in cells[0][1].attrs
    assert cells[1][1].attrs["data-sort"] == "-Infinity"


def test_markdown_and_html_hold_the_same_rows(tmp_path: Path, read_tables) -> None:
    content = [Table(COLUMNS, ROWS, id="attacks")]
    html_rows = [[c.text for c in row] for row in read_tables(to_html(content, "t"))["attacks"]]
    lines = to_markdown(content, tmp_path).splitlines()[2:]  # past the titles and the rule
    md_rows = [
        [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in lines
    ]
    assert md_rows == html_rows == [[c.text(row) for c in COLUMNS] for row in ROWS]


def test_markdown_links_images_relative_to_its_folder(plots: tuple[Path, Path]) -> None:
    base = plots[0].parent.parent
    text = to_markdown(blocks(list(plots)), base)
    assert "![plot 0](plots/clean_vs_robust.png)" in text and "![plot 1](plots/asr.png)" in text
    assert "Rebuilt by `vptlab report`" in text  # code spans as written
    assert "**The config**\n\n```yaml\nattack:\n  eps: 0.03\n```" in text
    assert "- one\n- " + EVIL in text


def test_code_holding_a_fence_gets_a_longer_one(tmp_path: Path) -> None:
    text = to_markdown([Code("```\nx\n```", "md")], tmp_path)
    assert text.startswith("````md\n") and text.endswith("\n````\n")


def test_a_missing_image_leaves_a_note(tmp_path: Path) -> None:
    content = [Image(tmp_path / "gone.png", "lost plot"), Paragraph("after it")]
    page = to_html(content, "t")
    assert "missing image: gone.png (lost plot)" in page and "<p>after it</p>" in page
    assert "<img" not in page
    assert "![lost plot](gone.png)" in to_markdown(content, tmp_path)


def test_table_ids_must_be_unique() -> None:
    table = Table(COLUMNS, ROWS, id="attacks")
    with pytest.raises(ValueError, match="unique"):
        to_html([table, Details("more", [table])], "t")


def test_write_report_writes_both_files(tmp_path: Path, plots: tuple[Path, Path]) -> None:
    md, page = write_report(blocks(list(plots)), tmp_path / "out", "Threat matrix")
    assert (md.name, page.name) == ("report.md", "report.html")
    assert md.read_text(encoding="utf-8").startswith("# Threat matrix\n")
    assert "<title>Threat matrix</title>" in page.read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.md"]
