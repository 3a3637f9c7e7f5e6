"""Reading tables back out of a report page, for the document and browser tests.

Reached through the `read_tables` fixture rather than by import (see tests/prompts/conftest.py
for why): `read_tables(page)` gives, per table id, its body rows as lists of `Cell`s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest


@dataclass
class Cell:
    """A <td>: its text (entities decoded) and attributes (valueless ones map to None)."""

    attrs: dict[str, str | None]
    text: str = ""


class _TableReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[Cell]]] = {}
        self.rows: list[list[Cell]] | None = None
        self.in_body = False
        self.cell: Cell | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            key = dict(attrs).get("id") or f"table {len(self.tables)}"
            self.rows = self.tables.setdefault(key, [])
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body and self.rows is not None:
            self.rows.append([])
        elif tag == "td" and self.in_body and self.rows:
            self.cell = Cell(dict(attrs))
            self.rows[-1].append(self.cell)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self.cell = None
        elif tag == "tbody":
            self.in_body = False

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.text += data


def _read_tables(page: str) -> dict[str, list[list[Cell]]]:
    reader = _TableReader()
    reader.feed(page)
    reader.close()
    return reader.tables


@pytest.fixture
def read_tables() -> Callable[[str], dict[str, list[list[Cell]]]]:
    return _read_tables
