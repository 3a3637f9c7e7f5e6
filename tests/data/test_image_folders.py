"""imagefolder and miniplaces readers on tiny fake folders of PNG/JPEG images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vptlab.data import ImageFileDataset, load_dataset
from vptlab.errors import DataError

RED, BLUE, GRAY = (255, 0, 0), (0, 0, 255), (128,)


def make_imagefolder(fakes, root: Path, test_name: str = "val") -> None:
    fakes.write_image(root / "train" / "cat" / "a.png", RED)
    fakes.write_image(root / "train" / "cat" / "nested" / "b.png", RED)
    fakes.write_image(root / "train" / "dog" / "c.PNG", BLUE, size=(40, 20))
    (root / "train" / "dog" / "notes.txt").write_text("skipped: not an image suffix")
    fakes.write_image(root / test_name / "dog" / "d.png", GRAY)


def test_imagefolder_labels_sizes_and_range(fakes, tmp_path: Path) -> None:
    make_imagefolder(fakes, tmp_path)
    data = load_dataset("imagefolder", root=str(tmp_path), img_size=8)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert isinstance(data.train, ImageFileDataset) and len(data.train) == 3
    assert data.train.targets == [0, 0, 1] and len(data.test) == 1
    for index, (label, color) in enumerate([(0, RED), (0, RED), (1, BLUE)]):
        x, y = data.train[index]
        assert y == label and x.shape == (3, 8, 8) and x.dtype == torch.float32
        expected = torch.tensor(color, dtype=torch.float32).div(255).view(3, 1, 1)
        assert torch.allclose(x, expected.expand(3, 8, 8), atol=1e-6)
    x, y = data.test[0]  # a gray image becomes 3 equal channels
    assert y == 1 and x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, 128 / 255))


def test_imagefolder_accepts_test_folder(fakes, tmp_path: Path) -> None:
    make_imagefolder(fakes, tmp_path, test_name="test")
    assert len(load_dataset("imagefolder", root=str(tmp_path)).test) == 1


def test_imagefolder_errors(fakes, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="imagefolder: expected train/ and val/.*missing train/ and"
    ):
        load_dataset("imagefolder", root=str(tmp_path))
    make_imagefolder(fakes, tmp_path)
    fakes.write_image(tmp_path / "val" / "bird" / "e.png", RED)
    with pytest.raises(DataError, match="class folders that train/ lacks: bird"):
        load_dataset("imagefolder", root=str(tmp_path))


def make_miniplaces(fakes, root: Path, list_dir: str = "data", categories: bool = True) -> None:
    images = root / "images"
    fakes.write_image(images / "train/a/abbey/00000001.jpg", RED, size=(16, 16))
    fakes.write_image(images / "train/b/bakery/shop/00000001.jpg", BLUE, size=(16, 16))
    fakes.write_image(images / "val/00000001.jpg", BLUE, size=(16, 16))
    lists = root / list_dir
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text(
        "train/a/abbey/00000001.jpg 0\ntrain/b/bakery/shop/00000001.jpg 10\n"
    )
    (lists / "val.txt").write_text("val/00000001.jpg 10\n")
    if categories:
        (lists / "categories.txt").write_text("/a/abbey 0\n/b/bakery/shop 10\n")


@pytest.mark.parametrize("list_dir", [".", "data", "development_kit/data"])
def test_miniplaces_release_layout(fakes, tmp_path: Path, list_dir: str) -> None:
    make_miniplaces(fakes, tmp_path, list_dir)
    data = load_dataset("miniplaces", root=str(tmp_path), img_size=16)
    assert data.num_classes == 100 and len(data.classes) == 100
    assert data.classes[0] == "abbey" and data.classes[10] == "bakery/shop"
    assert data.train.targets == [0, 10] and data.test.targets == [10]
    x, y = data.train[0]
    assert y == 0 and x.shape == (3, 16, 16)
    assert 0.0 <= x.min() and x.max() <= 1.0
    # JPEG is lossy: a solid red square stays red within a few levels.
    assert x[0].mean() > 0.9 and x[1:].mean() < 0.1
    x, y = data.test[0]
    assert y == 10 and x[2].mean() > 0.9


def test_miniplaces_names_from_paths_without_categories(fakes, tmp_path: Path) -> None:
    make_miniplaces(fakes, tmp_path, categories=False)
    data = load_dataset("miniplaces", root=str(tmp_path), img_size=8)
    assert data.classes[0] == "abbey" and data.classes[10] == "bakery/shop"
    assert data.classes[1] == "1"
    assert data.train[1][0].shape == (3, 8, 8)


def test_miniplaces_errors(fakes, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="miniplaces: expected images/ and train.txt, val.txt"):
        load_dataset("miniplaces", root=str(tmp_path))
    make_miniplaces(fakes, tmp_path)
    (tmp_path / "data" / "val.txt").unlink()
    with pytest.raises(DataError, match="missing train.txt and val.txt$"):
        load_dataset("miniplaces", root=str(tmp_path))
    (tmp_path / "data" / "val.txt").write_text("val/00000099.jpg 3\n")
    with pytest.raises(DataError, match=r"lists val/00000099\.jpg but .* does not exist"):
        load_dataset("miniplaces", root=str(tmp_path))
    (tmp_path / "data" / "val.txt").write_text("val/00000001.jpg 100\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected 'relative/path\.jpg label'"):
        load_dataset("miniplaces", root=str(tmp_path))
