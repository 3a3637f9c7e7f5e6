"""Shared fixtures: for the report tests `chromium` (the browser, or a skip) and `read_tables`;
`gradient_masked` for the masking checks; the adaptive attacker's and Neural Cleanse's searches
at a test size in every test. (The backdoored SimpleNet of the defense tests is `backdoored`, in
tests/defenses/conftest.py.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from html.parser import HTMLParser

import pytest
import torch

from vptlab.report.browser import CHROMIUM_ENV, CHROMIUM_NAMES, find_chromium


@pytest.fixture(scope="session", autouse=True)
def cheap_searches() -> Iterator[None]:
    """Test-sized searches for the whole session, session-scoped fixtures included (a
    function-scoped patch would miss the defenses those fixtures run):

    - the adaptive attacker's search that every `vptlab defend` runs: 2 starts x 30 steps
      without the scanned start (~3 s on SimpleNet, against ~25 s at the defaults; it still
      finds the shared BadNets backdoor at 98.9%). tests/defenses/test_adaptive.py sizes its own.
    - every Neural Cleanse search (`nc`, repairer and detector) a test does not size itself: 3
      steps of one mini-batch of 8 images per class (~1 s on SimpleNet, against ~5 min at the
      defaults): enough for the registry tests, which check what it may see and that it runs
      through the one loop. tests/defenses/test_neural_cleanse.py sizes its own.

    Processes a test starts (the CLI, Ray, kill-and-resume) run at the defaults: those tests
    turn the adaptive search off."""
    from vptlab.defenses import adaptive, neural_cleanse

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adaptive, "DEFAULTS", adaptive.SearchSize(starts=2, steps=30, scan=False))
        small = replace(neural_cleanse.DEFAULTS, steps=3, batches=1, batch_size=8)
        patch.setattr(neural_cleanse, "DEFAULTS", small)
        yield


# The report tests: the browser, and tables read back out of a page.

@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        why = f"no Chromium: set {CHROMIUM_ENV} or put one of {', '.join(CHROMIUM_NAMES)} on PATH"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must have it (.ci/run installs Debian's chromium)")
        pytest.skip(why)
    return found


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


# A gradient-masked model by construction, for the tests of the masking checks.


class _ZeroGradient(torch.autograd.Function):
    """The identity whose gradient is zero: PGD sees a flat loss, the model is unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.zeros_like(grad)


class Masked(torch.nn.Module):
    """A model behind a zero input gradient (gradient masking by construction)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_ZeroGradient.apply(x))


@pytest.fixture
def gradient_masked() -> Callable[[torch.nn.Module], torch.nn.Module]:
    """`gradient_masked(model)`: the same function with a zero input gradient."""
    return Masked
