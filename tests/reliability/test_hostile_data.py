"""Corrupt and hostile data through `vptlab train`: each is refused with exit code 2 and one line
(a DataError) that names the offending file, before or during the first batch; nothing in a
pickle runs, and no file makes the reader allocate more than its limit allows.

The unit tests in tests/data check the readers' many malformed variants one function at a time;
here each kind of damage goes through the whole command, as a user meets it: Fashion-MNIST idx /
gzip files, CIFAR pickles, image folders, MiniPlaces lists and an image-text table."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vptlab.data.folders import load_image
from vptlab.errors import DataError

from .helpers import TINY, one_error, write_yaml

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip


def refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Any]) -> str:
    """`vptlab train` of the tiny run on `data` (a data section's keys): its one error line."""
    raw = {**TINY, "output": {**TINY["output"], "dir": str(tmp_path / "runs")},
           "data": {**TINY["data"], **data}}  # fmt: skip
    return one_error(capsys, ["train", "-c", str(write_yaml(tmp_path / "run.yaml", raw))])


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fashion_folder(folder: Path, n: int = 20) -> Path:
    """A whole Fashion-MNIST folder (gzip idx files) of `n` images per split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        for stem, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            (folder / f"{prefix}-{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return folder


def _cut_gzip(data: bytes) -> bytes:
    return gzip.compress(data)[: len(gzip.compress(data)) // 2]


def _flip_gzip(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data))
    for i in range(20, 60):  # inside the deflate stream: bad codes, or a CRC that fails
        packed[i] ^= 0xA5
    return bytes(packed)


IMAGES = np.zeros((20, 28, 28), dtype=np.uint8)
# (damage, file it is done to, what the new file holds, the words the error must say)
IDX_CASES: dict[str, tuple[str, bytes, str]] = {
    "gzip-cut-short": ("train-images-idx3-ubyte.gz", _cut_gzip(idx_bytes(IMAGES)),
                       "cannot read idx file"),
    "gzip-stream-damaged": ("train-images-idx3-ubyte.gz", _flip_gzip(idx_bytes(IMAGES)),
                            "cannot read idx file"),
    "not-gzip": ("train-images-idx3-ubyte.gz", idx_bytes(IMAGES), "Not a gzipped file"),
    "wrong-idx-magic": ("t10k-images-idx3-ubyte.gz",
                        gzip.compress(b"\x00\x00\x0d\x03" + idx_bytes(IMAGES)[4:]),
                        "bad magic number"),
    "header-cut-short": ("train-labels-idx1-ubyte.gz", gzip.compress(b"\x00\x00\x08\x03\x00\x00"),
                         "header cut short (3 dimensions announced)"),
    "values-cut-short": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(IMAGES)[:-100]),
                         "header says shape (20, 28, 28) (15680 values) but the file holds 15580"),
    "bytes-to-spare": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(IMAGES) + b"\x00"),
                       "but the file holds more than that"),
    "labels-out-of-range": ("train-labels-idx1-ubyte.gz",
                            gzip.compress(idx_bytes(np.array([0, 1, 2, 200] + [0] * 16))),
                            "labels must be in 0..9, got 200 at index 3"),
    "images-wrong-size": ("train-images-idx3-ubyte.gz",
                          gzip.compress(idx_bytes(np.zeros((20, 32, 32)))),
                          "holds (20, 32, 32)"),
    "fewer-labels-than-images": ("t10k-labels-idx1-ubyte.gz",
                                 gzip.compress(idx_bytes(np.arange(19) % 10)), "N labels"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(IDX_CASES))
def test_damaged_fashion_mnist_files(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, content, words = IDX_CASES[damage]
    folder = fashion_folder(tmp_path / "fashion")
    (folder / name).write_bytes(content)
    line = refused(capsys, tmp_path, {"name": "fashion-mnist", "root": str(folder)})
    assert "DataError" not in line and str(folder / name) in line and words in line, line


def test_idx_header_announcing_a_bomb_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 40-byte gzip file whose header announces 2^31 28x28 images (1.7 TB)."""
    folder = fashion_folder(tmp_path / "fashion")
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 28, 28)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(1000)))
    tracemalloc.start()
    try:
        line = refused(capsys, tmp_path, {"name": "fashion-mnist", "root": str(folder)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "more than an idx file may hold here" in line and "train-images" in line, line
    assert peak < 64 << 20


class Payload:
    """A pickle that creates `sentinel` when loaded with pickle.load (__reduce__ runs os.system)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


def cifar_folder(folder: Path, n: int = 10) -> Path:
    """A `cifar-10-batches-py` folder of `n` images per batch (Python 3 pickles)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in np.arange(n) % 10]}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar_batch_that_runs_code_is_refused_and_never_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = cifar_folder(tmp_path / "cifar-10-batches-py")
    sentinel = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(sentinel)}))
    line = refused(capsys, tmp_path, {"name": "cifar10", "root": str(folder)})
    assert f"{folder / 'data_batch_3'} is not a plain data pickle: refused to import" in line
    assert not sentinel.exists()
    with open(folder / "data_batch_3", "rb") as f:
        pickle.load(f)  # the control: the file is live, pickle.load runs it
    assert sentinel.exists()


def test_oversized_cifar_batch_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2 GiB batch file (sparse: no disk used) is refused from its size, memory untouched."""
    folder = cifar_folder(tmp_path / "cifar-10-batches-py")
    os.truncate(folder / "test_batch", 2 << 30)
    tracemalloc.start()
    try:
        line = refused(capsys, tmp_path, {"name": "cifar10", "root": str(folder)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{folder / 'test_batch'} is larger than a CIFAR batch may be" in line, line
    assert peak < 64 << 20


@pytest.mark.parametrize(
    ("batch", "words"),
    [({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, "labels must be ints in 0..9"),
     ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [3, 4]}, "as an (N, 3072) array")],
    ids=["label-out-of-range", "images-wrong-size"],
)  # fmt: skip
def test_cifar_batch_with_bad_labels_or_sizes(
    batch: dict[bytes, Any], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = cifar_folder(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_5").write_bytes(pickle.dumps(batch))
    line = refused(capsys, tmp_path, {"name": "cifar10", "root": str(folder)})
    assert str(folder / "data_batch_5") in line and words in line, line


def image_folder(root: Path) -> Path:
    """imagefolder layout: train/{cat,dog}, val/{cat,dog}, one 12x10 RGB image each."""
    for split in ("train", "val"):
        for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), color).save(root / split / label / "a.png")
    return root


def test_unreadable_image_in_a_folder_stops_training_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = image_folder(tmp_path / "images")
    broken = root / "train" / "dog" / "b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    line = refused(capsys, tmp_path, {"name": "imagefolder", "root": str(root)})
    assert line == f"vptlab: error: cannot read image {broken}: not an image format PIL knows"


def test_empty_class_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = image_folder(tmp_path / "images")
    (root / "train" / "bird").mkdir()
    line = refused(capsys, tmp_path, {"name": "imagefolder", "root": str(root)})
    assert f"class folder {root / 'train' / 'bird'} has no images" in line, line


def test_images_of_any_size_and_mode_load_as_rgb_or_fail_naming_the_file(tmp_path: Path) -> None:
    """Sizes are squashed and 8-bit modes converted; 16-bit gray is scaled (not clipped to
    white); 32-bit integer and float pixels, which have no range, are one error each."""
    gray16 = np.full((5, 7), 32896, dtype=np.uint16)  # 32896 / 257 = 128: mid gray
    images = {
        "wide.png": (Image.new("RGB", (300, 20), (0, 255, 0)), (0.0, 1.0, 0.0)),
        "palette.png": (Image.new("RGB", (6, 6), (255, 0, 0)).convert("P"), (1.0, 0.0, 0.0)),
        "cmyk.jpg": (Image.new("CMYK", (6, 6), (0, 255, 255, 0)), (1.0, 0.0, 0.0)),
        "alpha.png": (Image.new("RGBA", (6, 6), (0, 0, 255, 0)), (0.0, 0.0, 1.0)),
        "gray-alpha.png": (Image.new("LA", (6, 6), (128, 7)), (128 / 255,) * 3),
        "bilevel.png": (Image.new("1", (6, 6), 1), (1.0, 1.0, 1.0)),
        "gray16.png": (Image.fromarray(gray16), (128 / 255,) * 3),
    }
    for name, (image, mean) in images.items():
        image.save(tmp_path / name)
        x = load_image(tmp_path / name, 4)
        assert x.shape == (3, 4, 4) and 0 <= x.min() and x.max() <= 1, name
        assert x.mean((1, 2)).tolist() == pytest.approx(mean, abs=0.02), name
    for name, pixels in (("int32.tif", gray16.astype(np.int32)), ("float.tif", gray16 / 65535.0)):
        Image.fromarray(pixels.astype(pixels.dtype)).save(tmp_path / name)
        with pytest.raises(DataError, match=rf"^cannot read image {tmp_path / name}: its "):
            load_image(tmp_path / name, 4)


def miniplaces_folder(root: Path, val_list: str) -> Path:
    for path in ("train/a/abbey/1.jpg", "val/1.jpg"):
        (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (0, 128, 0)).save(root / "images" / path)
    (root / "train.txt").write_text("train/a/abbey/1.jpg 0\n")
    (root / "val.txt").write_text(val_list)
    return root


def test_miniplaces_list_pointing_to_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first listed file is checked at once; a later missing one fails when it is loaded
    (during the first evaluation), naming it."""
    root = miniplaces_folder(tmp_path / "mp", "val/1.jpg 0\nval/2.jpg 5\n")
    line = refused(capsys, tmp_path, {"name": "miniplaces", "root": str(root)})
    assert line == (f"vptlab: error: cannot read image {root / 'images' / 'val' / '2.jpg'}: "
                    "No such file or directory")  # fmt: skip
    (root / "val.txt").write_text("val/9.jpg 0\n")
    line = refused(capsys, tmp_path, {"name": "miniplaces", "root": str(root)})
    assert f"val.txt lists val/9.jpg but {root / 'images' / 'val' / '9.jpg'} does not" in line


def test_miniplaces_label_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = miniplaces_folder(tmp_path / "mp", "val/1.jpg 100\n")
    line = refused(capsys, tmp_path, {"name": "miniplaces", "root": str(root)})
    assert f"{root / 'val.txt'}:1: expected 'relative/path.jpg label' with a label in 0..99" in line


def test_caption_table_without_its_caption_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text("filepath,caption\na.png,a black square\n")
    line = refused(capsys, tmp_path, {"name": "image-text", "root": str(tmp_path)})
    assert line == (f"vptlab: error: {tmp_path / 'train.csv'}: no caption column 'title'; the "
                    "header has: 'filepath', 'caption'")  # fmt: skip
