"""CIFAR-10/100 readers on fake folders in the official python-pickle format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vptlab.data import load_dataset
from vptlab.errors import DataError


def check_cifar_split(split, n: int) -> None:
    assert split.x.shape == (n, 3, 32, 32) and split.x.dtype == torch.float32
    assert split.y.shape == (n,) and split.y.dtype == torch.int64
    assert 0.0 <= split.x.min() and split.x.max() <= 1.0


@pytest.mark.parametrize("python2", [True, False], ids=["python2-pickles", "python3-pickles"])
def test_cifar10_reads_batches_in_order(fakes, tmp_path: Path, python2: bool) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=3, python2=python2)
    data = load_dataset("cifar10", root=str(folder))
    check_cifar_split(data.train, 15)
    check_cifar_split(data.test, 3)
    assert data.train.y.tolist() == [(i + j) % 10 for i in range(5) for j in range(3)]
    assert data.num_classes == 10 and data.classes == [f"class{k}" for k in range(10)]


def test_cifar10_pixel_order_is_rgb_planes(fakes, tmp_path: Path) -> None:
    """Row layout: 1024 red values, 1024 green, 1024 blue, each plane 32x32 row-major."""
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2)
    rows = fakes.cifar_rows(2, seed=5)  # seed 5 wrote test_batch
    data = load_dataset("cifar10", root=str(folder))
    for channel, row, col in [(0, 0, 0), (1, 3, 7), (2, 31, 30), (2, 5, 0)]:
        raw = rows[1, channel * 1024 + row * 32 + col]
        assert data.test.x[1, channel, row, col].item() == pytest.approx(raw / 255.0)


def test_cifar10_accepts_the_parent_folder(fakes, tmp_path: Path) -> None:
    fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1)
    assert len(load_dataset("cifar10", root=str(tmp_path)).train) == 5


def test_cifar10_limits_are_seeded_subsets(fakes, tmp_path: Path) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=4)
    a = load_dataset("cifar10", root=str(folder), seed=1, limit_train=7, limit_test=2)
    b = load_dataset("cifar10", root=str(folder), seed=1, limit_train=7, limit_test=2)
    assert (len(a.train), len(a.test)) == (7, 2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_cifar100_fine_labels_and_names(fakes, tmp_path: Path) -> None:
    fakes.write_cifar100(tmp_path / "cifar-100-python", n=4)
    data = load_dataset("cifar100", root=str(tmp_path))
    check_cifar_split(data.train, 4)
    assert data.train.y.tolist() == [(37 * j) % 100 for j in range(4)]
    assert data.test.y.tolist() == [(37 * j + 1) % 100 for j in range(4)]
    assert data.num_classes == 100 and data.classes[:2] == ["fine0", "fine1"]
    rows = fakes.cifar_rows(4, seed=10)
    assert data.train.x[2, 1, 4, 9].item() == pytest.approx(rows[2, 1024 + 4 * 32 + 9] / 255.0)


def test_missing_cifar_files_name_what_is_expected(fakes, tmp_path: Path) -> None:
    message = (
        rf"^cifar10: expected data_batch_1\.\.5 and test_batch under {tmp_path} "
        r"\(or a cifar-10-batches-py folder inside it\); got none$"
    )
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="cifar100: expected train and test .* got none"):
        load_dataset("cifar100", root=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no root folder"):
        load_dataset("cifar10")
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="got missing data_batch_3$"):
        load_dataset("cifar10", root=str(tmp_path))


def test_malformed_batch_is_a_data_error(fakes, tmp_path: Path) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2)
    cropped = {b"data": fakes.cifar_rows(2, 0)[:, :100], b"labels": [0, 1]}
    fakes.dump_python2(cropped, folder / "data_batch_2")
    with pytest.raises(DataError, match=r"data_batch_2: expected 'data' as an \(N, 3072\)"):
        load_dataset("cifar10", root=str(folder))
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": 1})[:10])
    with pytest.raises(DataError, match="data_batch_2 is not a readable pickle"):
        load_dataset("cifar10", root=str(folder))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (7, "expected 'labels' as a list of ints, got int"),
        ([0, 2**70], r"labels must be ints in 0\.\.9, got 1180591620717411303424"),
        ([0, 1.7], r"labels must be ints in 0\.\.9, got 1\.7"),
        ([0, -1], r"labels must be ints in 0\.\.9, got -1"),
        ([0, 10], r"labels must be ints in 0\.\.9, got 10"),
        ([0], "expected 'labels' with 2 labels, got 1"),
        # Two references to one array: numpy would broadcast them into a (2, 1000) label array.
        ([np.zeros(1000, np.uint8)] * 2, r"labels must be ints in 0\.\.9, got array"),
        (np.zeros((2, 1), np.int64), "expected 'labels' as a list of ints, got a int64 array"),
    ],
    ids=["int", "overflow", "float", "negative", "too-large", "too-few", "arrays", "2-d"],
)
def test_malformed_labels_are_one_data_error(fakes, tmp_path: Path, labels, message) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2)
    fakes.dump_python2({b"data": fakes.cifar_rows(2, 0), b"labels": labels}, folder / "test_batch")
    with pytest.raises(DataError, match=rf"^{folder / 'test_batch'}: {message}"):
        load_dataset("cifar10", root=str(folder))


def test_int_label_arrays_of_resaved_files_load(fakes, tmp_path: Path) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2, python2=False)
    batch = {"data": fakes.cifar_rows(2, 0), "labels": np.array([3, 9], dtype=np.int32)}
    fakes.dump_python3(batch, folder / "test_batch")
    assert load_dataset("cifar10", root=str(folder)).test.y.tolist() == [3, 9]


def test_pixels_must_be_uint8(fakes, tmp_path: Path) -> None:
    """int64 pixels of 300 would silently wrap to 44 as uint8."""
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2)
    rows = fakes.cifar_rows(2, 0).astype(np.int64) + 100
    fakes.dump_python2({b"data": rows, b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(DataError, match=r"test_batch: expected 'data' as uint8 pixels, got int64"):
        load_dataset("cifar10", root=str(folder))


@pytest.mark.parametrize("names", [3, [b"cat"] * 9 + [7]], ids=["int", "not-text"])
def test_malformed_class_names_are_one_data_error(fakes, tmp_path: Path, names) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1)
    fakes.dump_python2({b"label_names": names}, folder / "batches.meta")
    with pytest.raises(DataError, match=r"batches\.meta: expected 'label_names' with 10 names"):
        load_dataset("cifar10", root=str(folder))


def test_undecodable_class_name_is_shown_not_fatal(fakes, tmp_path: Path) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1)
    names = [b"caf\xe9"] + [f"c{k}".encode() for k in range(1, 10)]
    fakes.dump_python2({b"label_names": names}, folder / "batches.meta")
    assert load_dataset("cifar10", root=str(folder)).classes[0] == "caf\ufffd"
