"""Image-text data for contrastive (CLIP) pretraining: captioned splits and their readers.

A captioned train split is an ordinary split (images, int labels) that also carries one caption
per sample: `CaptionSplit` (tensors) or `ImageTextDataset` (files listed in a CSV/TSV table, the
way CC3M and YFCC subsets ship). Loaders and batches do not change: a batch's `index` says which
captions go with its images, and the contrastive task tokenizes every caption once, with the
model's own tokenizer, and looks them up by that index (engine/tasks.py). The test split is a
labeled one, evaluated zero-shot with the class names and `templates` of its DataSplits.

Registered: `mnist-captions` and `fashion-captions` (offline: mnist-5k / Fashion-MNIST images
with captions drawn, seeded, from varied templates), `digits-captions` (scikit-learn's 8x8 digits
captioned the same way, for unit tests) and `image-text` (a local table).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from vptlab.data.base import DATASETS, DataSplits, TensorSplit, seeded_generator
from vptlab.data.folders import load_image
from vptlab.data.small import load_digits, load_fashion_mnist, load_mnist_5k
from vptlab.errors import DataError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_WORDS = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
# Caption templates: `{name}` is the class word ("seven", "sneaker"), `{symbol}` its short form
# ("7"; the word again where there is none). Varied on purpose: the text tower must learn that
# "a handwritten 7" and "the number seven" are one class.
DIGIT_CAPTIONS = (
    "a photo of the digit {name}",
    "a handwritten {symbol}",
    "the number {name} written by hand",
    "a picture of a {name}",
    "an image of the numeral {symbol}",
    "a scanned {name}, written in ink",
    "a blurry photo of the number {symbol}",
    "a black and white picture of a handwritten {name}",
    "{name}",
    "the digit {symbol}",
)
FASHION_CAPTIONS = (
    "a photo of a {name}",
    "a picture of a {name}",
    "a product photo of the {name}",
    "a low resolution photo of a {name}",
    "a gray image of a {name}",
    "a {name} for sale",
    "a small picture of the {name}",
    "{name}",
)
# Zero-shot templates (one `{}` for the class name), evaluated on the labeled test split.
DIGIT_ZERO_SHOT = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")
FASHION_ZERO_SHOT = ("a photo of a {}.", "a picture of the {}.", "a product photo of a {}.")
_CAPTION_STREAM = 0xCA9  # keeps caption draws apart from the split's own seeded draws
# The registered image-text datasets (their train splits carry captions), for config checks.
CAPTIONED: set[str] = set()


Loader = Callable[..., DataSplits]


def register_captioned(name: str) -> Callable[[Loader], Loader]:
    """`DATASETS.register(name)` for a dataset whose train split carries captions."""
    CAPTIONED.add(name)
    return DATASETS.register(name)


@dataclass
class CaptionSplit(TensorSplit):
    """A TensorSplit with one caption per sample."""

    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.captions) != len(self.y):
            raise ValueError(f"{len(self.captions)} captions for {len(self.y)} images")

    def to(self, device: str | torch.device) -> CaptionSplit:
        return CaptionSplit(self.x.to(device), self.y.to(device), self.captions)

    def take(self, index: torch.Tensor) -> CaptionSplit:
        captions = [self.captions[i] for i in index.tolist()]
        return CaptionSplit(self.x[index], self.y[index], captions)


def split_captions(split: TensorSplit | Dataset) -> list[str]:
    """A split's captions in sample order (through Subsets), or a DataError saying it has none."""
    if isinstance(split, Subset):
        captions = split_captions(split.dataset)
        return [captions[i] for i in split.indices]
    captions = getattr(split, "captions", None)
    if captions is None:
        raise DataError(
            f"the train split ({type(split).__name__}) has no captions: contrastive training "
            "needs an image-text dataset (data.name mnist-captions, fashion-captions or image-text)"
        )
    return list(captions)


def make_captions(
    labels: torch.Tensor,
    names: Sequence[str],
    templates: Sequence[str],
    seed: int,
    symbols: Sequence[str] | None = None,
) -> list[str]:
    """One caption per label: a template drawn by the seed, filled with the class's name/symbol."""
    if not templates:
        raise DataError("caption templates: need at least one")
    symbols = symbols or names
    draws = torch.randint(
        len(templates), (len(labels),), generator=seeded_generator(seed, _CAPTION_STREAM)
    ).tolist()
    return [
        templates[t].format(name=names[label], symbol=symbols[label])
        for t, label in zip(draws, labels.tolist(), strict=True)
    ]


def _check_templates(templates: Sequence[str], where: str) -> None:
    for template in templates:
        try:
            template.format(name="x", symbol="x")
        except (KeyError, IndexError, ValueError) as error:
            raise DataError(
                f"{where}: template {template!r} may use only {{name}} and {{symbol}} ({error})"
            ) from None


def captioned(
    name: str,
    data: DataSplits,
    names: Sequence[str],
    captions: Sequence[str],
    zero_shot: Sequence[str],
    seed: int,
    symbols: Sequence[str] | None = None,
) -> DataSplits:
    """`data` as dataset `name`, with captions drawn for its train split; classes renamed to
    `names` (what the zero-shot prompts say) and the zero-shot `templates` set."""
    _check_templates(captions, f"{data.name} captions")
    train = data.train
    if not isinstance(train, TensorSplit):
        raise DataError(f"{data.name}: captions can be drawn for tensor splits only")
    text = make_captions(train.y, names, captions, seed, symbols)
    return DataSplits(
        name,
        CaptionSplit(train.x, train.y, text),
        data.test,
        data.num_classes,
        classes=list(names),
        templates=list(zero_shot),
    )


def _digit_captions(
    name: str, splits: DataSplits, templates: list[str] | None, seed: int
) -> DataSplits:
    """A digit dataset with captions drawn from `templates` (default DIGIT_CAPTIONS)."""
    return captioned(
        name, splits, DIGIT_WORDS, templates or DIGIT_CAPTIONS, DIGIT_ZERO_SHOT, seed,
        symbols=[str(d) for d in range(10)],
    )


@register_captioned("mnist-captions")
def load_mnist_captions(
    root: str | None = None, seed: int = 0, templates: list[str] | None = None
) -> DataSplits:
    """mnist-5k with one caption per train image ("a handwritten 7", "the number seven written
    by hand" ...), drawn by the seed from `templates` (default: DIGIT_CAPTIONS); the test split
    is mnist-5k's, evaluated zero-shot over the class words."""
    return _digit_captions("mnist-captions", load_mnist_5k(seed=seed), templates, seed)


@register_captioned("digits-captions")
def load_digits_captions(
    root: str | None = None, seed: int = 0, templates: list[str] | None = None
) -> DataSplits:
    """scikit-learn's 8x8 digits with captions as `mnist-captions` draws them: the tiny
    image-text set of the unit tests (1,437 train pairs)."""
    return _digit_captions("digits-captions", load_digits(seed=seed), templates, seed)


@register_captioned("fashion-captions")
def load_fashion_captions(
    root: str | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    templates: list[str] | None = None,
) -> DataSplits:
    """Fashion-MNIST (Debian package dataset-fashion-mnist, or `root`) with captions such as
    "a picture of a sneaker", drawn by the seed from `templates` (default: FASHION_CAPTIONS)."""
    data = load_fashion_mnist(root=root, seed=seed, limit_train=limit_train, limit_test=limit_test)
    captions = templates or FASHION_CAPTIONS
    return captioned("fashion-captions", data, FASHION_WORDS, captions, FASHION_ZERO_SHOT, seed)


class ImageTextDataset(Dataset):
    """(image, label) pairs from a table of image paths and captions; `captions` in row order.

    Labels are -1: pretraining data has none. Images are RGB, resized to img_size, in [0,1].
    """

    def __init__(
        self, table: Path, rows: Sequence[tuple[Path, str, int]], img_size: int
    ) -> None:
        self.table = table
        self.rows = list(rows)
        self.img_size = img_size
        self.captions = [caption for _, caption, _ in self.rows]
        self.targets = [-1] * len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, _, line = self.rows[index]
        try:
            return load_image(path, self.img_size), -1
        except DataError as error:
            raise DataError(f"{self.table}, line {line}: {error}") from None


def read_image_text_table(
    table: str | Path,
    root: str | Path | None = None,
    image_column: str = "filepath",
    caption_column: str = "title",
    delimiter: str | None = None,
) -> list[tuple[Path, str, int]]:
    """Rows (image path, caption, line number) of a CSV (`,`) or TSV (`\\t`, also for .tsv/.txt)
    table with a header; paths are relative to `root` (default: the table's folder). The column
    names default to open_clip's (`--csv-img-key filepath --csv-caption-key title`).

    Every error is one DataError naming the table and what is wrong: a missing column, an empty
    field or a missing image file (with its line).
    """
    table = Path(table).expanduser()
    if not table.is_file():
        raise DataError(f"image-text table not found: {table}")
    folder = Path(root).expanduser() if root is not None else table.parent
    if delimiter is None:
        delimiter = "," if table.suffix.lower() == ".csv" else "\t"
    rows: list[tuple[Path, str, int]] = []
    try:
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            for column, role in ((image_column, "image"), (caption_column, "caption")):
                if column not in header:
                    raise DataError(
                        f"{table}: no {role} column {column!r}; the header has: "
                        f"{', '.join(repr(h) for h in header) or 'nothing'}"
                    )
            for record in reader:
                line = reader.line_num
                image, caption = record.get(image_column), record.get(caption_column)
                if not image or caption is None or not caption.strip():
                    missing = image_column if not image else caption_column
                    raise DataError(f"{table}, line {line}: empty {missing!r}")
                path = folder / image
                if not path.is_file():
                    raise DataError(f"{table}, line {line}: image file not found: {path}")
                rows.append((path, caption.strip(), line))
    except UnicodeDecodeError as error:
        raise DataError(f"{table}: not UTF-8 text ({error.reason})") from None
    except csv.Error as error:
        raise DataError(f"{table}: malformed table: {error}") from None
    if not rows:
        raise DataError(f"{table}: no rows below the header")
    return rows


@register_captioned("image-text")
def load_image_text(
    root: str | None = None,
    seed: int = 0,
    table: str = "train.csv",
    image_column: str = "filepath",
    caption_column: str = "title",
    img_size: int = 224,
    zero_shot: str = "mnist-captions",
) -> DataSplits:
    """A local image-text table `root/table` (CSV or TSV; see `read_image_text_table`) to
    pretrain on; the test split, class names and templates come from the labeled dataset
    `zero_shot` (a registered dataset name), which is what the run is evaluated on."""
    if root is None:
        raise DataError("image-text: give the folder of the table and images as data.root")
    rows = read_image_text_table(Path(root) / table, root, image_column, caption_column)
    if zero_shot == "image-text":
        raise DataError("image-text: zero_shot must name a labeled dataset")
    evaluation = DATASETS.get(zero_shot)(root=None, seed=seed)
    return DataSplits(
        "image-text",
        ImageTextDataset(Path(root) / table, rows, img_size),
        evaluation.test,
        evaluation.num_classes,
        classes=list(evaluation.classes),
        templates=list(evaluation.templates),
    )
