"""The offline caption source (seeded, varied) and the image-text table reader's errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vptlab.data import TensorSplit, load_dataset
from vptlab.data.captions import (
    DIGIT_CAPTIONS,
    CaptionSplit,
    ImageTextDataset,
    read_image_text_table,
    split_captions,
)
from vptlab.errors import DataError


def test_mnist_captions_are_deterministic_per_seed_and_varied() -> None:
    a = load_dataset("mnist-captions", seed=0)
    b = load_dataset("mnist-captions", seed=0)
    c = load_dataset("mnist-captions", seed=1)
    assert isinstance(a.train, CaptionSplit)
    assert a.train.captions == b.train.captions
    assert a.train.captions != c.train.captions
    # One class, many phrasings: captions of the digit 7 use several templates.
    sevens = {t for t, y in zip(a.train.captions, a.train.y.tolist(), strict=True) if y == 7}
    assert len(sevens) >= len(DIGIT_CAPTIONS) - 1
    assert "a handwritten 7" in sevens and "the number seven written by hand" in sevens
    assert all(("7" in t or "seven" in t) for t in sevens)
    assert a.classes[7] == "seven" and all("{}" in t for t in a.templates)
    assert len(split_captions(a.train)) == len(a.train)


def test_custom_templates_and_a_bad_one() -> None:
    data = load_dataset("mnist-captions", seed=0, templates=["digit {symbol} ({name})"])
    label = int(data.train.y[0])
    assert data.train.captions[0] == f"digit {label} ({data.classes[label]})"
    with pytest.raises(DataError, match="template"):
        load_dataset("mnist-captions", templates=["a {colour} digit"])


def test_a_split_without_captions_says_so() -> None:
    with pytest.raises(DataError, match="no captions"):
        split_captions(TensorSplit(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))


def _image(path: Path) -> None:
    Image.fromarray(np.full((6, 6, 3), 128, dtype=np.uint8)).save(path)


def test_table_reader_reads_paths_and_captions(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    table = tmp_path / "train.tsv"
    table.write_text("filepath\ttitle\nimg/a.png\ta gray square\nimg/b.png\tanother one\n")
    rows = read_image_text_table(table)
    assert [r[1] for r in rows] == ["a gray square", "another one"]
    dataset = ImageTextDataset(table, rows, img_size=4)
    image, label = dataset[1]
    assert image.shape == (3, 4, 4) and label == -1
    assert dataset.captions == ["a gray square", "another one"]


def test_table_reader_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    table = tmp_path / "pairs.csv"
    table.write_text("image,text\na.png,a square\n")
    with pytest.raises(DataError, match=r"pairs\.csv: no image column 'filepath'.*'image'"):
        read_image_text_table(table)
    rows = read_image_text_table(table, image_column="image", caption_column="text")
    assert rows[0][1] == "a square"

    table.write_text("image,text\na.png,a square\nmissing.png,gone\n")
    with pytest.raises(DataError, match=r"pairs\.csv, line 3: image file not found: .*missing"):
        read_image_text_table(table, image_column="image", caption_column="text")

    table.write_text("image,text\na.png,\n")
    with pytest.raises(DataError, match=r"pairs\.csv, line 2: empty 'text'"):
        read_image_text_table(table, image_column="image", caption_column="text")

    with pytest.raises(DataError, match="not found"):
        read_image_text_table(tmp_path / "absent.csv")

    (tmp_path / "broken.png").write_bytes(b"not an image")
    table.write_text("image,text\nbroken.png,a broken file\n")
    rows = read_image_text_table(table, image_column="image", caption_column="text")
    with pytest.raises(DataError, match=r"pairs\.csv, line 2: cannot read image .*broken\.png"):
        ImageTextDataset(table, rows, img_size=4)[0]
