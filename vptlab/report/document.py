"""A report as a list of blocks, drawn two ways from the same content: Markdown beside the run
folders (images as relative links) and one self-contained HTML page (images inlined, sortable
tables, no external URL), so the page can be mailed or archived and still show everything."""

from __future__ import annotations

import base64
import html
import math
import mimetypes
import numbers
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vptlab.report.tables import Column, Stat, markdown_table
from vptlab.runs import atomic_write


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 6:
            raise ValueError(f"Heading level must be 1..6, got {self.level}")


@dataclass(frozen=True)
class Paragraph:
    """Plain text; `code` spans become <code> in HTML and stay as written in Markdown."""

    text: str


@dataclass(frozen=True)
class Table:
    """Rows drawn through column specs; `id` names the HTML table (for links and `sortTable`)."""

    columns: Sequence[Column]
    rows: Sequence[Mapping[str, Any]]
    id: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG (or other image) on disk: linked from the Markdown, embedded into the HTML."""

    path: Path
    alt: str


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = "yaml"


@dataclass(frozen=True)
class Details:
    """Blocks folded under a summary in HTML; Markdown shows the summary in bold, then them."""

    summary: str
    blocks: Sequence[Block]


@dataclass(frozen=True)
class BulletList:
    items: Sequence[str]


Block = Heading | Paragraph | Table | Image | Code | Details | BulletList


# ---------------------------------------------------------------------------------------------
# Markdown


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    """The blocks as GitHub Markdown; image links are relative to `base`, the folder the
    Markdown file is written to, so the folder can be moved as a whole."""
    return "\n\n".join(_markdown(block, Path(base)) for block in blocks) + "\n"


def _markdown(block: Block, base: Path) -> str:
    match block:
        case Heading(text, level):
            return "#" * level + " " + text
        case Paragraph(text):
            return text
        case Table(columns, rows):
            return markdown_table(columns, rows)
        case Image(path, alt):
            link = Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
            if any(c in link for c in " ()<>"):  # would end the link early
                link = f"<{link}>"
            return f"![{alt.replace(']', '')}]({link})"
        case Code(text, lang):
            fence = "```"
            while fence in text:  # a fence inside the code would close ours
                fence += "`"
            return f"{fence}{lang}\n{text.rstrip()}\n{fence}"
        case Details(summary, inner):
            return "\n\n".join([f"**{summary}**", *(_markdown(b, base) for b in inner)])
        case BulletList(items):
            return "\n".join(f"- {item}" for item in items)
    raise TypeError(f"not a report block: {block!r}")


# ---------------------------------------------------------------------------------------------
# HTML

# The browser itself refuses anything not inline, so a stray external URL cannot slip in
# unnoticed: it is blocked and reported on the console (which the browser check reads).
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1f24;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
code, pre { font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
code { background: #f0f2f4; padding: .1em .3em; border-radius: 3px; }
pre { background: #f6f8fa; padding: .8em 1em; overflow-x: auto; border-radius: 4px; }
pre code { background: none; padding: 0; }
.scroll { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; white-space: nowrap; }
th.r, td.r { text-align: right; }
thead th { background: #f0f2f4; cursor: pointer; user-select: none; }
thead th[aria-sort="ascending"]::after { content: " \\25B2"; }
thead th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #f8f9fa; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.missing { color: #a40e26; background: #ffebe9; padding: .5em .8em; border-radius: 4px; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
"""

# Sorting by a header click; `sortTable(id, column, descending)` for scripts and the test-only
# query `?sort=<table id>:<column>[:desc]` (column counted from 0). Cells sort by `data-sort`
# (a number) when present, else by their text; `data-missing` cells go last either way. After
# load, <body> records how many images decoded, so a headless check can read it from the DOM.
_JS = """
"use strict";
(function () {
  function key(cell) {
    if (!cell || cell.hasAttribute("data-missing")) return null;
    const raw = cell.getAttribute("data-sort");
    return raw === null ? cell.textContent.trim() : Number(raw);
  }
  function compare(a, b) {
    if (typeof a === "number" && typeof b === "number") return a - b;
    if (typeof a === "number") return -1;
    if (typeof b === "number") return 1;
    return a.localeCompare(b, undefined, { numeric: true });
  }
  function sortRows(table, column, descending) {
    const headers = table.tHead ? table.tHead.rows[0].cells : [];
    if (!table.tBodies.length || column < 0 || column >= headers.length) return false;
    const body = table.tBodies[0];
    const rows = Array.from(body.rows, (row, i) => ({ row, i, key: key(row.cells[column]) }));
    rows.sort((a, b) => {
      if (a.key === null || b.key === null) {
        return (a.key === null) - (b.key === null) || a.i - b.i;
      }
      return (descending ? -1 : 1) * compare(a.key, b.key) || a.i - b.i;
    });
    rows.forEach((r) => body.appendChild(r.row));
    Array.from(headers).forEach((th, i) => {
      if (i === column) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
    return true;
  }
  function sortTable(id, column, descending) {
    const table = document.getElementById(id);
    return table !== null && sortRows(table, Number(column), Boolean(descending));
  }
  window.sortTable = sortTable;

  document.querySelectorAll("table.sortable").forEach((table) => {
    if (!table.tHead) return;
    Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
      th.tabIndex = 0;
      const sort = () => sortRows(table, column, th.getAttribute("aria-sort") === "ascending");
      th.addEventListener("click", sort);
      th.addEventListener("keydown", (e) => { if (e.key === "Enter") sort(); });
    });
  });

  const request = new URLSearchParams(window.location.search).get("sort");
  if (request) {
    const parts = request.split(":");
    const descending = parts[parts.length - 1] === "desc";
    if (descending || parts[parts.length - 1] === "asc") parts.pop();
    const column = parts.pop();
    sortTable(parts.join(":"), column, descending);
  }

  window.addEventListener("load", () => {
    const images = Array.from(document.images);
    document.body.dataset.images = String(images.length);
    document.body.dataset.imagesLoaded = String(images.filter((i) => i.naturalWidth > 0).length);
    document.body.dataset.tables = String(document.querySelectorAll("table.sortable").length);
  });
})();
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained page: inline CSS and JS, images as data: URIs, every text escaped and
    nothing fetched from anywhere. `title` names the page (<title>); the blocks carry the
    visible heading, as they do in the Markdown."""
    ids = [b.id for b in _walk(blocks) if isinstance(b, Table) and b.id]
    if len(ids) != len(set(ids)):
        raise ValueError(f"table ids must be unique in a page, got {ids}")
    body = "\n".join(_html(block) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # or the browser asks the file system for one
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


def _walk(blocks: Sequence[Block]) -> Iterator[Block]:
    for block in blocks:
        yield block
        if isinstance(block, Details):
            yield from _walk(block.blocks)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _inline(text: str) -> str:
    """Escaped text with `code` spans as <code>."""
    parts = re.split(r"`([^`\n]+)`", text)
    return "".join(
        f"<code>{_esc(part)}</code>" if i % 2 else _esc(part) for i, part in enumerate(parts)
    )


def _html(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{_inline(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{_inline(text)}</p>"
        case Table(columns, rows, table_id):
            return _html_table(columns, rows, table_id)
        case Image(path, alt):
            return _html_image(Path(path), alt)
        case Code(text, lang):
            return f'<pre><code class="language-{_esc(lang)}">{_esc(text.rstrip())}</code></pre>'
        case Details(summary, inner):
            parts = "\n".join(_html(b) for b in inner)
            return f"<details>\n<summary>{_inline(summary)}</summary>\n{parts}\n</details>"
        case BulletList(items):
            lines = "".join(f"<li>{_inline(item)}</li>\n" for item in items)
            return f"<ul>\n{lines}</ul>"
    raise TypeError(f"not a report block: {block!r}")


def _html_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], table_id: str) -> str:
    def align(column: Column) -> str:
        return ' class="r"' if column.align == "right" else ""

    head = "".join(f'<th{align(c)} scope="col">{_esc(c.title)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = "".join(
            f"<td{align(c)}{_sort_attr(c.value(row))}>{_esc(c.text(row))}</td>" for c in columns
        )
        body.append(f"<tr>{cells}</tr>")
    id_attr = f' id="{_esc(table_id)}"' if table_id else ""
    return (
        f'<div class="scroll"><table class="sortable"{id_attr}>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n"
        "</table></div>"
    )


def _sort_attr(value: Any) -> str:
    """What a cell sorts by: a number by its raw value (not its rounded text), a number over
    seeds by its mean, a missing value (None, NaN) last; text cells sort by their text and need
    nothing."""
    if isinstance(value, Stat):
        value = value.mean
    if value is None:
        return " data-missing"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isnan(number):
            return " data-missing"
        if math.isinf(number):  # JavaScript's Number() reads "Infinity", not Python's "inf"
            return f' data-sort="{"-" if number < 0 else ""}Infinity"'
        return f' data-sort="{number!r}"'
    return ""


def _html_image(path: Path, alt: str) -> str:
    """The image inlined as a data: URI; one that cannot be read leaves a visible note, so a
    report with a lost plot still renders the rest."""
    try:
        data = path.read_bytes()
    except OSError:
        return f'<p class="missing" role="note">missing image: {_esc(path.name)} ({_esc(alt)})</p>'
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def write_report(
    blocks: Sequence[Block], out_dir: Path, title: str, stem: str = "report"
) -> tuple[Path, Path]:
    """`<stem>.md` and `<stem>.html` in `out_dir`, each written atomically (a reader never sees
    half a report); returns their paths, Markdown first. Both are UTF-8 whatever the locale,
    as the page declares."""
    out_dir = Path(out_dir)
    markdown, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    for path, text in ((markdown, to_markdown(blocks, out_dir)), (page, to_html(blocks, title))):
        atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    return markdown, page
