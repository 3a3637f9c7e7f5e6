"""Writers of tiny fake dataset folders in the real on-disk formats (CIFAR pickles, idx, images).

Tests reach them through the `fakes` fixture rather than `import conftest`, which breaks as soon as
another test folder has a conftest.py of its own.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR batches (protocol 2).

    Python 2 `str` became BINSTRING opcodes (bytes under encoding='bytes') and numpy's array
    internals were named `numpy.core.multiarray`; the pure-Python pickler lets us emit both.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_python2(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(obj)


def dump_python3(obj: Any, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(folder: Path, per_batch: int = 3, python2: bool = True) -> Path:
    """A `cifar-10-batches-py` folder with `per_batch` images in each of the six batches."""
    dump = dump_python2 if python2 else dump_python3
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [(i + j) % 10 for j in range(per_batch)],
            b"data": cifar_rows(per_batch, seed=i),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        dump(batch, folder / name)
    label_names = [f"class{k}".encode() for k in range(10)]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": label_names, b"num_vis": 3072}
    dump(meta, folder / "batches.meta")
    return folder


def write_cifar100(folder: Path, n: int = 4) -> Path:
    """A `cifar-100-python` folder with `n` train and `n` test images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("train", "test")):
        batch = {
            b"filenames": [f"f{j}.png".encode() for j in range(n)],
            b"batch_label": name.encode(),
            b"fine_labels": [(37 * j + i) % 100 for j in range(n)],
            b"coarse_labels": [j % 20 for j in range(n)],
            b"data": cifar_rows(n, seed=10 + i),
        }
        dump_python2(batch, folder / name)
    meta = {
        b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
        b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)],
    }
    dump_python2(meta, folder / "meta")
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes, gzip-compressed as the Fashion-MNIST release ships it."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_image(path: Path, color: tuple[int, ...], size: tuple[int, int] = (12, 10)) -> None:
    """A solid-color image; a 1-tuple color gives a gray ('L') image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if len(color) == 1 else "RGB"
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


@pytest.fixture
def fakes() -> SimpleNamespace:
    """The writers above, for test modules."""
    return SimpleNamespace(
        cifar_rows=cifar_rows,
        dump_python2=dump_python2,
        dump_python3=dump_python3,
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        write_idx=write_idx,
        write_image=write_image,
    )
