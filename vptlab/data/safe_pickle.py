"""Load the CIFAR python batches without running code: a pickle may import only numpy array parts.

A plain `pickle.load` calls whatever callable the file names (`os.system` included), so files from a
user's folder go through `safe_load`, whose unpickler admits a fixed allow-list and nothing else.
"""

from __future__ import annotations

import _codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vptlab.errors import DataError

try:  # numpy >= 2 moved the array internals to numpy._core; old pickles still name numpy.core.
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for a callable outside the allow-list: it would have run code."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What Python 3 writes for `bytes` in protocol <= 2 pickles, restricted to latin-1."""
    if encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise RefusedPickle(f"refused _codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, "latin1")


# Everything a CIFAR batch references: the original files (Python 2, protocol 2) name
# numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; files re-saved by Python 3
# may add _codecs.encode (bytes in protocol 2), numpy scalars, or _frombuffer (protocol 5).
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "scalar")] = _multiarray.scalar
    ALLOWED_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = _numeric._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only importable names are ALLOWED_GLOBALS; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refused to import {module}.{name} (only numpy arrays are allowed)"
            ) from None


def safe_loads(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle `data` with the allow-list; `encoding='bytes'` keeps Python 2 strings as bytes."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def safe_load(path: str | Path, encoding: str = "bytes") -> Any:
    """Unpickle the file at `path` with the allow-list; any failure is one DataError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return safe_loads(data, encoding=encoding)
    except RefusedPickle as error:
        raise DataError(f"{path} is not a plain data pickle: {error}") from None
    except Exception as error:  # truncated or corrupt files raise many kinds of error
        message = f"{type(error).__name__}: {error}"
        raise DataError(f"{path} is not a readable pickle: {message}") from None
