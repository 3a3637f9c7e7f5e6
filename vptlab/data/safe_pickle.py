"""Load the CIFAR python batches without running code or letting the file claim unbounded memory.

A plain `pickle.load` calls whatever callable the file names (`os.system` included), and even
numpy's own constructors, called by a hostile file, build a (20000, 3, 32, 32) view of one byte
(zero strides) or allocate any shape they are given. So files from a user's folder go through
`safe_load`, whose unpickler admits a fixed allow-list of names, builds each numpy array only from
its own bytes in the file, and refuses a file that would need more memory than its size justifies.
"""

from __future__ import annotations

import _codecs
import io
import math
import pickle
import stat
from pathlib import Path
from typing import Any

import numpy as np

from vptlab.errors import DataError

try:  # numpy >= 2 moved the array internals to numpy._core; old pickles still name numpy.core.
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

ARRAY_KINDS = "ui"  # images are uint8; re-saved files may hold the labels as an int array
SCALAR_KINDS = "biuf"  # numpy scalars in re-saved dicts (counts, sizes)
# Objects that cost one or two bytes of pickle but tens of bytes of memory (empty containers, MARK,
# memo entries): one per 16 bytes of file, plus room for small files. Real batches use far fewer.
_OBJECTS_PER_BYTE = 1 / 16
_OBJECTS_FLOOR = 4096
# The largest official batch (CIFAR-100 `train`) is 158 MB; a file past this is refused unread.
MAX_FILE_BYTES = 1 << 30


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list: code, or memory it does not hold."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What Python 3 writes for `bytes` in protocol <= 2 pickles, restricted to latin-1."""
    if encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise RefusedPickle(f"refused _codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, "latin1")


class _NdarrayName:
    """Stands for `numpy.ndarray`, which a pickle may name only as `_reconstruct`'s first argument.

    Called directly, `ndarray(shape, dtype, buffer, offset, strides)` makes views larger than their
    buffer or allocates any shape, so calling (or NEWOBJ-ing) it is refused.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
        raise RefusedPickle("refused to call numpy.ndarray directly (it builds arrays of any size)")


# Everything a CIFAR batch references: the original files (Python 2, protocol 2) name
# numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; files re-saved by Python 3
# may add _codecs.encode (bytes in protocol 2), numpy scalars, or _frombuffer (protocol 5).
# Values are RestrictedUnpickler methods (checked versions of numpy's) or plain callables.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): "_dtype",
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = "_reconstruct"
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "scalar")] = "_scalar"
    ALLOWED_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = "_frombuffer"

# Opcodes no CIFAR batch uses that build instances of arbitrary classes or reach outside the file.
_REFUSED_OPCODES = ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID",
                    "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER")  # fmt: skip
# One- or two-byte opcodes that each create a container or a memo entry (see _OBJECTS_PER_BYTE).
_COUNTED_OPCODES = ("MARK", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "TUPLE1", "TUPLE2", "TUPLE3",
                    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")  # fmt: skip


def _refused_opcode(name: str) -> Any:
    def load(self: RestrictedUnpickler) -> None:
        raise RefusedPickle(f"refused pickle opcode {name}")

    return load


def _counted_opcode(load: Any) -> Any:
    def counted(self: RestrictedUnpickler) -> None:
        self._objects_left -= 1
        if self._objects_left < 0:
            raise RefusedPickle("refused: more objects than a file of this size can describe")
        load(self)

    return counted


def _text_bytes(data: Any, what: str) -> bytes | bytearray:
    """Raw array or scalar bytes; Python 2 strings come back as str under encoding='latin1'."""
    if isinstance(data, str):
        return data.encode("latin1")
    if isinstance(data, bytes | bytearray):
        return data
    raise RefusedPickle(f"refused {what}: its data is a {type(data).__name__}, not bytes")


def _check_shape(shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple)
        or len(shape) > 32
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise RefusedPickle(f"refused array shape {shape!r}")
    return shape


def _plain_dtype(dtype: Any, kinds: str) -> np.dtype:
    """`dtype` if it is a plain number type of one of `kinds` (no fields, subarray or objects)."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.kind not in kinds
        or dtype.hasobject
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.flags != 0
    ):
        raise RefusedPickle(f"refused dtype {dtype!r} (only {kinds!r} number kinds are allowed)")
    return dtype


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose only importable names are ALLOWED_GLOBALS, bounded by the file's size.

    It is the pure-Python unpickler because only that one lets us check each array's state
    (BUILD) before numpy sees it. Every array must be C-ordered, of a plain int dtype, and made
    from exactly shape x itemsize bytes of the file, copied into a buffer of its own; all arrays
    together may not exceed the file's size, so no array is a view of another's or of too little
    data. With the count of cheap objects bounded too, a hostile file makes the reader allocate at
    most about twenty times its size (a list of one-byte items); a real batch takes about twice.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    for _name in _REFUSED_OPCODES:
        dispatch[getattr(pickle, _name)[0]] = _refused_opcode(_name)
    for _name in _COUNTED_OPCODES:
        dispatch[getattr(pickle, _name)[0]] = _counted_opcode(dispatch[getattr(pickle, _name)[0]])
    del _name

    def __init__(self, file: io.BytesIO, size: int, encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self._array_bytes_left = size
        self._objects_left = int(size * _OBJECTS_PER_BYTE) + _OBJECTS_FLOOR
        self._unbuilt: dict[int, Any] = {}  # arrays and dtypes made here, awaiting their BUILD

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refused to import {module}.{name} (only numpy arrays are allowed)"
            ) from None
        return getattr(self, found) if isinstance(found, str) else found

    def _charge(self, nbytes: int) -> None:
        self._array_bytes_left -= nbytes
        if self._array_bytes_left < 0:
            raise RefusedPickle("refused: its arrays hold more bytes than the file does")

    def _dtype(self, spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        # Always a copy: the BUILD that follows then cannot alter numpy's shared uint8 dtype.
        if isinstance(spec, bytes):
            spec = spec.decode("ascii", "replace")
        if not isinstance(spec, str):
            raise RefusedPickle(f"refused dtype {spec!r} (only simple type codes are allowed)")
        try:
            dtype = np.dtype(spec, align=False, copy=True)
        except (TypeError, ValueError):
            raise RefusedPickle(f"refused dtype {spec!r}") from None
        self._unbuilt[id(dtype)] = _plain_dtype(dtype, SCALAR_KINDS)
        return dtype

    def _reconstruct(self, subtype: Any, shape: Any, code: Any) -> np.ndarray:
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + BUILD(its state).
        if subtype is not _NdarrayName or shape != (0,) or code not in (b"b", "b"):
            raise RefusedPickle(f"refused _reconstruct of {shape!r} {code!r}")
        array = _multiarray._reconstruct(np.ndarray, (0,), b"b")
        self._unbuilt[id(array)] = array
        return array

    def _scalar(self, dtype: Any, data: Any = None) -> Any:
        dtype = _plain_dtype(dtype, SCALAR_KINDS)
        raw = _text_bytes(data, "numpy scalar")
        if len(raw) != dtype.itemsize:
            raise RefusedPickle(f"refused numpy scalar of {len(raw)} bytes for {dtype}")
        return _multiarray.scalar(dtype, bytes(raw))

    def _frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
        # Protocol 5 arrays: a bytearray, then the dtype, shape and order to view it with.
        shape = _check_shape(shape)
        dtype, raw = self._array_bytes(shape, dtype, order in ("F", b"F"), buffer)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def _array_bytes(self, shape: tuple[int, ...], dtype: Any, fortran: Any, data: Any) -> Any:
        """The checked dtype and raw bytes of a C-ordered int array; its bytes are charged."""
        dtype = _plain_dtype(dtype, ARRAY_KINDS)
        if fortran and sum(n > 1 for n in shape) > 1:
            raise RefusedPickle(f"refused Fortran-ordered array of shape {shape}")
        raw = _text_bytes(data, "array")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(raw) != nbytes:
            raise RefusedPickle(
                f"refused array of shape {shape} and dtype {dtype}: it needs {nbytes} bytes, "
                f"the file gives {len(raw)}"
            )
        self._charge(nbytes)
        return dtype, raw

    def load_build(self) -> None:
        """BUILD sets the state of an array or dtype made above, once; of nothing else."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if self._unbuilt.pop(id(inst), None) is not inst:
            raise RefusedPickle(f"refused to set the state of a {type(inst).__name__}")
        if isinstance(inst, np.dtype):
            self._build_dtype(inst, state)
        else:
            self._build_array(inst, state)

    dispatch[pickle.BUILD[0]] = load_build

    def _build_dtype(self, dtype: np.dtype, state: Any) -> None:
        # (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata]):
        # only the byte order may be set; the rest would make a structured or object dtype.
        if (
            not isinstance(state, tuple)
            or len(state) not in (8, 9)
            or state[0] not in (3, 4)
            or state[1] not in ("|", "<", ">", "=", b"|", b"<", b">", b"=")
            or state[2:8] != (None, None, None, -1, -1, 0)
            or state[8:] not in ((), (None,))
        ):
            raise RefusedPickle(f"refused dtype state {state!r}")
        itemsize = dtype.itemsize
        dtype.__setstate__(state)
        if _plain_dtype(dtype, SCALAR_KINDS).itemsize != itemsize:
            raise RefusedPickle(f"refused dtype state {state!r}")

    def _build_array(self, array: np.ndarray, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw bytes); very old pickles omit the version.
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise RefusedPickle("refused array state (expected version, shape, dtype, order, data)")
        _, shape, dtype, fortran, data = state
        shape = _check_shape(shape)
        dtype, raw = self._array_bytes(shape, dtype, fortran, data)
        if raw is data:
            # numpy keeps a large array on the bytes it is given instead of copying them: give it
            # bytes of its own, so that no two arrays (or a bytes value) ever share a buffer.
            raw = bytes(memoryview(raw))
        array.__setstate__((1, shape, dtype, False, raw))


def safe_loads(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle `data` with the allow-list; `encoding='bytes'` keeps Python 2 strings as bytes."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), size=len(data), encoding=encoding)
    loaded = unpickler.load()
    if any(isinstance(obj, np.ndarray) for obj in unpickler._unbuilt.values()):
        raise RefusedPickle("refused: an array without its data (no BUILD)")
    return loaded


def safe_load(path: str | Path, encoding: str = "bytes") -> Any:
    """Unpickle the file at `path` with the allow-list; any failure is one DataError naming it.

    A file larger than `MAX_FILE_BYTES` is refused before it is read (the reader holds the whole
    file, and up to twice its size again while unpickling)."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"cannot read {path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise DataError(f"{path} is larger than a CIFAR batch may be ({info.st_size:,} > "
                            f"{MAX_FILE_BYTES:,} bytes): refused unread")  # fmt: skip
        with open(path, "rb") as f:
            data = f.read(info.st_size + 1)  # no more than it had: a growing file ends here
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) != info.st_size:
        raise DataError(f"cannot read {path}: it changed while being read")
    try:
        return safe_loads(data, encoding=encoding)
    except RefusedPickle as error:
        raise DataError(f"{path} is not a plain data pickle: {error}") from None
    except Exception as error:  # truncated or corrupt files raise many kinds of error
        message = f"{type(error).__name__}: {error}"
        raise DataError(f"{path} is not a readable pickle: {message}") from None
