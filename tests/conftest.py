"""Shared fixtures: a backdoored SimpleNet for the backdoor and defense tests (trained once per
session), and for the report tests `chromium` (the browser, or a skip) and `read_tables`.

The backdoored SimpleNet:

BadNets by hand (until `vptlab.backdoors.triggers` is merged): a 3x3 white square one pixel in
from the bottom-right corner, stamped on 5% of the mnist-5k train images (drawn from classes other
than the target) relabelled to class 0; two epochs of Adam, about 8 s on one core. 5% rather than
10%: the stamped images are then a third of the target class, and spectral signatures assume the
poison is a minority of its class (at 10% it is half, and their scores stop separating).

Tests reach it through the `poisoned_simplenet` fixture (see tests/prompts/conftest.py for why
not by import) and must not change its model: copy it first (`copy.deepcopy`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F

from vptlab.data import load_dataset
from vptlab.data.base import DataSplits
from vptlab.data.loaders import to_rgb
from vptlab.models import create_model
from vptlab.models.base import ImageClassifier
from vptlab.report.browser import CHROMIUM_ENV, CHROMIUM_NAMES, find_chromium

POISON_RATE = 0.05
TARGET = 0


def stamp(x: torch.Tensor) -> torch.Tensor:
    """The trigger: a white 3x3 square at rows/columns -4..-2 of each image."""
    x = x.clone()
    x[..., -4:-1, -4:-1] = 1.0
    return x


@dataclass(frozen=True)
class PoisonedModel:
    """The backdoored model (eval mode), the clean data, and what poisoning did to the train set."""

    model: ImageClassifier
    data: DataSplits  # mnist-5k as loaded: clean, 1 channel
    x_train: torch.Tensor  # the train images as the model was trained on them (3 channels)
    y_train: torch.Tensor  # the labels it was trained with (poisoned ones relabelled)
    poisoned: torch.Tensor  # sorted indices of the stamped train images
    target: int
    clean_accuracy: float  # % on the clean test split
    attack_success: float  # % of stamped non-target test images sent to the target

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return stamp(x)

    def test_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean test split, 3 channels."""
        return to_rgb(self.data.test.x).contiguous(), self.data.test.y

    def triggered_test(self) -> torch.Tensor:
        """The stamped test images whose true label is not the target (what ASR counts)."""
        x, y = self.test_images()
        return stamp(x[y != self.target])


def measure(model: torch.nn.Module, data: DataSplits, target: int = TARGET) -> tuple[float, float]:
    """(clean accuracy, attack success rate) in % on the test split."""
    x, y = to_rgb(data.test.x), data.test.y
    training = model.training
    model.eval()
    with torch.no_grad():
        ca = (model(x).argmax(1) == y).float().mean()
        asr = (model(stamp(x[y != target])).argmax(1) == target).float().mean()
    model.train(training)
    return 100.0 * float(ca), 100.0 * float(asr)


def _train_poisoned() -> PoisonedModel:
    data = load_dataset("mnist-5k")
    x = to_rgb(data.train.x).contiguous()
    y = data.train.y.clone()
    g = torch.Generator().manual_seed(0)
    candidates = torch.nonzero(y != TARGET).flatten()
    count = round(POISON_RATE * len(y))
    poisoned = candidates[torch.randperm(len(candidates), generator=g)[:count]].sort().values
    x[poisoned] = stamp(x[poisoned])
    y[poisoned] = TARGET

    torch.manual_seed(0)
    model = create_model("simplenet", num_classes=data.num_classes, img_size=28)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    ca, asr = measure(model, data)
    return PoisonedModel(model, data, x, y, poisoned, TARGET, ca, asr)


@pytest.fixture(scope="session")
def poisoned_simplenet() -> Iterator[PoisonedModel]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        poisoned = _train_poisoned()
    finally:
        torch.set_num_threads(threads)
    # Every test built on it means something only if the backdoor is there.
    assert poisoned.attack_success > 90, f"fixture ASR only {poisoned.attack_success:.1f}%"
    assert poisoned.clean_accuracy > 85, f"fixture CA only {poisoned.clean_accuracy:.1f}%"
    yield poisoned


@pytest.fixture(scope="session")
def measure_backdoor() -> object:
    """`measure_backdoor(model, data) -> (CA %, ASR %)` on the test split."""
    return measure


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
