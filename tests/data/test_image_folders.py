"""imagefolder and miniplaces readers on tiny fake folders of PNG/JPEG images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

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


@pytest.mark.parametrize("label", ["²", "١", "3x", "-1", "100", ""])
def test_miniplaces_bad_list_label_is_one_data_error(fakes, tmp_path: Path, label: str) -> None:
    """'²'.isdigit() is True but int('²') raises; '١' (Arabic one) would pass int() silently."""
    make_miniplaces(fakes, tmp_path)
    (tmp_path / "data" / "train.txt").write_text(
        f"train/a/abbey/00000001.jpg 0\ntrain/b/bakery/shop/00000001.jpg {label}\n"
    )
    with pytest.raises(DataError, match=r"train\.txt:2: expected 'relative/path\.jpg label'"):
        load_dataset("miniplaces", root=str(tmp_path))


@pytest.mark.parametrize("line", ["/a/abbey ²", "/a/abbey 100", "/a/abbey", "/a/abbey x"])
def test_miniplaces_bad_category_line_is_one_data_error(fakes, tmp_path: Path, line: str) -> None:
    make_miniplaces(fakes, tmp_path)
    (tmp_path / "data" / "categories.txt").write_text(f"/b/bakery/shop 10\n\n{line}\n")
    with pytest.raises(DataError, match=r"categories\.txt:3: expected '/a/abbey 0' with a label"):
        load_dataset("miniplaces", root=str(tmp_path))


def test_miniplaces_unreadable_list_is_one_data_error(fakes, tmp_path: Path) -> None:
    make_miniplaces(fakes, tmp_path)
    (tmp_path / "data" / "val.txt").write_bytes(b"val/\xff\xfe.jpg 3\n")
    with pytest.raises(DataError, match=r"miniplaces: cannot read .*val\.txt: .*utf-8"):
        load_dataset("miniplaces", root=str(tmp_path))


def test_miniplaces_later_missing_file_names_it_when_loaded(fakes, tmp_path: Path) -> None:
    make_miniplaces(fakes, tmp_path)
    (tmp_path / "data" / "val.txt").write_text("val/00000001.jpg 10\nval/00000002.jpg 3\n")
    data = load_dataset("miniplaces", root=str(tmp_path), img_size=8)
    missing = tmp_path / "images" / "val" / "00000002.jpg"
    with pytest.raises(DataError, match=rf"^cannot read image {missing}: No such file"):
        data.test[1]


def test_imagefolder_empty_class_folder_is_one_data_error(fakes, tmp_path: Path) -> None:
    """An empty train/ class would still be a class (a logit) with no sample to learn it from."""
    make_imagefolder(fakes, tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/bird has no images"):
        load_dataset("imagefolder", root=str(tmp_path))


def write_broken_images(fakes, folder: Path) -> dict[str, Path]:
    """Truncated PNG and JPEG, a text file named .png, an empty file and a missing one."""
    files = {}
    for name in ("truncated.png", "truncated.jpg"):
        fakes.write_image(folder / name, RED, size=(64, 64))
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        files[name] = folder / name
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    files.update(text=folder / "text.png", empty=folder / "empty.png", missing=folder / "gone.png")
    return files


def test_unreadable_images_are_one_data_error(fakes, tmp_path: Path) -> None:
    for path in write_broken_images(fakes, tmp_path).values():
        with pytest.raises(DataError, match=rf"^cannot read image {path}: [^\n]+$"):
            ImageFileDataset([(path, 0)], img_size=8)[0]


@pytest.mark.parametrize("pixels", [150, 300], ids=["over-limit-warning", "over-twice-error"])
def test_decompression_bomb_is_refused(fakes, tmp_path: Path, monkeypatch, pixels: int) -> None:
    """Past MAX_IMAGE_PIXELS PIL only warns (an error past twice that): both are refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    fakes.write_image(tmp_path / "bomb.png", RED, size=(pixels // 10, 10))
    with pytest.raises(DataError, match=r"^refused image .*bomb\.png: Image size \(\d+ pixels\)"):
        ImageFileDataset([(tmp_path / "bomb.png", 0)], img_size=8)[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert ImageFileDataset([(tmp_path / "bomb.png", 0)], img_size=8)[0][0].shape == (3, 8, 8)
