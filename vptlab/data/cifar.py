"""CIFAR-10 and CIFAR-100 from the official python batches in a local folder, never via pickle.load.

Each batch is a dict with b'data' (N,3072) uint8 rows (R plane, G plane, B plane, 32x32 row-major)
and a label list; `safe_pickle` reads them so a tampered file cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vptlab.data.base import DATASETS, DataSplits, TensorSplit, require_root, subset
from vptlab.data.safe_pickle import safe_load
from vptlab.errors import DataError


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR release keeps its batches and which keys hold labels and class names."""

    name: str
    folder: str  # the folder the release tarball unpacks to
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str
    num_classes: int
    described: str  # the expected files, as an error message names them


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test=("test_batch",),
    meta="batches.meta",
    labels_key="labels",
    names_key="label_names",
    num_classes=10,
    described="data_batch_1..5 and test_batch",
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train=("train",),
    test=("test",),
    meta="meta",
    labels_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    described="train and test",
)


def find_batches_folder(layout: CifarLayout, root: str | None) -> Path:
    """`root` itself or its `cifar-10-batches-py` / `cifar-100-python` child, whichever is whole."""
    where = f"{layout.described} (python version)"
    base = require_root(layout.name, root, where)
    required = layout.train + layout.test
    best_missing: list[str] = list(required)
    for folder in (base, base / layout.folder):
        missing = [name for name in required if not (folder / name).is_file()]
        if not missing:
            return folder
        best_missing = min(best_missing, missing, key=len)
    got = "none" if len(best_missing) == len(required) else f"missing {', '.join(best_missing)}"
    raise DataError(
        f"{layout.name}: expected {layout.described} under {base} "
        f"(or a {layout.folder} folder inside it); got {got}"
    )


def _text_keys(raw: Any, path: Path) -> dict[str, Any]:
    """Python 2 pickles give bytes keys (b'data'), re-saved ones str keys: accept both."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _labels(raw: Any, count: int, path: Path, layout: CifarLayout) -> np.ndarray:
    """The label list (or re-saved int array) as int64, each checked to be a class index.

    Checked element by element before numpy sees them: a list of arrays would otherwise broadcast
    into a huge 2-D array, floats would be truncated and ints past int64 would overflow.
    """
    key, top = layout.labels_key, layout.num_classes - 1
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "iu" or raw.ndim != 1:
            raise DataError(f"{path}: expected '{key}' as a list of ints, got a {raw.dtype} array")
        values = raw.tolist()
    elif isinstance(raw, list | tuple):
        values = raw
    else:
        raise DataError(f"{path}: expected '{key}' as a list of ints, got {type(raw).__name__}")
    if len(values) != count:
        raise DataError(f"{path}: expected '{key}' with {count} labels, got {len(values)}")
    for value in values:
        is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
        if not is_int or not 0 <= value <= top:
            raise DataError(f"{path}: labels must be ints in 0..{top}, got {value!r}")
    return np.asarray(values, dtype=np.int64).reshape(count)


def read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as uint8 (N,3,32,32) images and int64 (N,) labels."""
    batch = _text_keys(safe_load(path), path)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: expected 'data' as an (N, 3072) array, got {shape}")
    if data.dtype != np.uint8:
        # Another integer type would wrap silently (300 -> 44) when read as pixels.
        raise DataError(f"{path}: expected 'data' as uint8 pixels, got {data.dtype}")
    labels = _labels(batch.get(layout.labels_key), len(data), path, layout)
    # Rows are the R plane, then G, then B, each 32x32 row-major: exactly (3, 32, 32) in C order.
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(folder: Path, names: tuple[str, ...], layout: CifarLayout) -> TensorSplit:
    parts = [read_batch(folder / name, layout) for name in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return TensorSplit(torch.from_numpy(x), torch.from_numpy(y))


def read_class_names(folder: Path, layout: CifarLayout) -> list[str]:
    """Class names from the meta file, or "0".."N-1" when the meta file is absent."""
    path = folder / layout.meta
    if not path.is_file():
        return [str(i) for i in range(layout.num_classes)]
    names = _text_keys(safe_load(path), path).get(layout.names_key)
    if (
        not isinstance(names, list | tuple)
        or len(names) != layout.num_classes
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise DataError(f"{path}: expected '{layout.names_key}' with {layout.num_classes} names")
    # Names are only shown to the user: an undecodable byte is replaced rather than fatal.
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def load_cifar(
    layout: CifarLayout,
    root: str | None,
    seed: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSplits:
    folder = find_batches_folder(layout, root)

    def split(names: tuple[str, ...], limit: int | None, split_seed: int) -> TensorSplit:
        raw = subset(_read_split(folder, names, layout), limit, split_seed)
        # Convert after subsetting: the float copy of all 50k images alone is 600 MB.
        return TensorSplit(raw.x.float().div_(255.0), raw.y)

    return DataSplits(
        layout.name,
        split(layout.train, limit_train, seed),
        split(layout.test, limit_test, seed + 1),
        num_classes=layout.num_classes,
        classes=read_class_names(folder, layout),
    )


@DATASETS.register("cifar10")
def load_cifar10(
    root: str | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSplits:
    """CIFAR-10 (50k/10k 3x32x32); root is `cifar-10-batches-py` or its parent folder."""
    return load_cifar(CIFAR10, root, seed, limit_train, limit_test)


@DATASETS.register("cifar100")
def load_cifar100(
    root: str | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSplits:
    """CIFAR-100 with its 100 fine labels; root is `cifar-100-python` or its parent folder."""
    return load_cifar(CIFAR100, root, seed, limit_train, limit_test)
