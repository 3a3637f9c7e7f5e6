"""The restricted unpickler: numpy arrays in, code execution out."""

from __future__ import annotations

import builtins
import importlib
import os
import pickle
import struct
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from vptlab.data import load_dataset
from vptlab.data.safe_pickle import RefusedPickle, safe_load, safe_loads
from vptlab.errors import DataError


class Payload:
    """Unpickles to `function(*args)`: the classic pickle exploit."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def exploits(marker: Path) -> dict[str, object]:
    touch = f"touch {marker}"
    return {
        "os.system": Payload(os.system, touch),
        "subprocess": Payload(subprocess.call, ["touch", str(marker)]),
        "eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "exec-in-dict": {b"data": Payload(builtins.exec, f"open({str(marker)!r}, 'w')")},
        "import": Payload(importlib.import_module, "antigravity"),
    }


@pytest.mark.parametrize("name", ["os.system", "subprocess", "eval", "exec-in-dict", "import"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_code_in_a_pickle_is_refused_and_never_run(
    tmp_path: Path, name: str, protocol: int
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(exploits(marker)[name], protocol=protocol))
    with pytest.raises(DataError, match=r"data_batch_1 is not a plain data pickle: refused"):
        safe_load(path)
    assert not marker.exists()


def test_malicious_cifar_batch_through_load_dataset(fakes, tmp_path: Path) -> None:
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}")))
    with pytest.raises(DataError, match=r"test_batch .*refused to import (posix|os)\.system"):
        load_dataset("cifar10", root=str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_and_scalars_load(protocol: int) -> None:
    data = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "n": np.int64(7), "s": b"x"}
    loaded = safe_loads(pickle.dumps(data, protocol=protocol))
    assert np.array_equal(loaded["data"], data["data"]) and loaded["data"].dtype == np.uint8
    assert loaded["n"] == 7 and loaded["s"] == b"x"


def test_python2_cifar_format_loads_with_bytes_keys(fakes, tmp_path: Path) -> None:
    rows = fakes.cifar_rows(2, seed=0)
    fakes.dump_python2({b"data": rows, b"labels": [3, 4]}, tmp_path / "batch")
    assert b"numpy.core.multiarray\n_reconstruct" in (tmp_path / "batch").read_bytes()
    loaded = safe_load(tmp_path / "batch")
    assert set(loaded) == {b"data", b"labels"} and np.array_equal(loaded[b"data"], rows)


def test_codecs_encode_only_for_latin1() -> None:
    """Python 3 protocol-2 pickles spell bytes as _codecs.encode(text, 'latin1'); nothing else."""
    assert safe_loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"
    forged = pickle.dumps(b"ab", protocol=2).replace(b"latin1", b"utf_16")
    with pytest.raises(RefusedPickle, match="refused _codecs.encode"):
        safe_loads(forged)


def test_unreadable_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        safe_load(tmp_path / "absent")


# Hand-written pickles: what a hostile file can say that pickle.dumps of a real array never does.


def p_int(n: int) -> bytes:
    data = pickle.encode_long(n)
    return pickle.LONG1 + bytes([len(data)]) + data


def p_bytes(data: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(data)) + data


def p_str(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def p_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def p_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def p_call(function: bytes, *args: bytes) -> bytes:
    return function + p_tuple(*args) + pickle.REDUCE


def p_dtype(code: str) -> bytes:
    """numpy.dtype(code, False, True) with numpy's own BUILD state, as numpy writes it."""
    state = p_tuple(p_int(3), p_str("|"), pickle.NONE * 3, p_int(-1), p_int(-1), p_int(0))
    call = p_call(p_global("numpy", "dtype"), p_str(code), pickle.NEWFALSE, pickle.NEWTRUE)
    return call + state + pickle.BUILD


def p_array(shape: tuple[int, ...], data: bytes) -> bytes:
    """A uint8 array the way numpy pickles one: _reconstruct(ndarray, (0,), b'b') + BUILD."""
    empty = p_call(
        p_global("numpy.core.multiarray", "_reconstruct"),
        p_global("numpy", "ndarray"),
        p_tuple(p_int(0)),
        p_bytes(b"b"),
    )
    state = p_tuple(p_int(1), p_tuple(*map(p_int, shape)), p_dtype("u1"), pickle.NEWFALSE, data)
    return empty + state + pickle.BUILD


def p_file(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def p_batch(data: bytes, labels: bytes) -> bytes:
    """A CIFAR batch dict {b'data': ..., b'labels': ...} around two pickled values."""
    items = p_bytes(b"data") + data + p_bytes(b"labels") + labels
    return p_file(pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS)


def zero_stride_array(shape: tuple[int, ...], byte: bytes = b"x") -> bytes:
    """numpy.ndarray(shape, 'u1', byte, 0, (0, ...)): every element is that one byte."""
    return p_call(
        p_global("numpy", "ndarray"),
        p_tuple(*map(p_int, shape)),
        p_str("u1"),
        p_bytes(byte),
        p_int(0),
        p_tuple(*[p_int(0)] * len(shape)),
    )


def peak_memory(function, *args) -> int:
    """Peak bytes traced while running function(*args), numpy's array buffers included."""
    tracemalloc.start()
    try:
        function(*args)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def refuse_within(path: Path, data: bytes, limit: int, match: str = "") -> None:
    """safe_load(path) fails with one DataError naming the file, allocating at most `limit`."""
    path.write_bytes(data)

    def load() -> None:
        with pytest.raises(DataError, match=rf"^{path} is not a plain data pickle: refused{match}"):
            safe_load(path)

    assert peak_memory(load) < limit


def test_zero_stride_view_of_one_byte_is_refused(tmp_path: Path) -> None:
    """58 bytes that the old reader turned into a (20000, 3, 32, 32) array of one byte."""
    data = p_file(zero_stride_array((20000, 3, 32, 32)))
    assert len(data) < 100
    refuse_within(tmp_path / "data_batch_1", data, 1 << 20, " to call numpy.ndarray directly")


@pytest.mark.parametrize("shape", [(20000, 3, 32, 32), (1 << 20, 1 << 20)], ids=["61MB", "1TB"])
def test_ndarray_of_a_shape_without_data_is_refused(tmp_path: Path, shape) -> None:
    data = p_file(p_call(p_global("numpy", "ndarray"), p_tuple(*map(p_int, shape))))
    refuse_within(tmp_path / "data_batch_1", data, 1 << 20, " to call numpy.ndarray directly")


def test_array_state_must_hold_all_its_bytes(tmp_path: Path) -> None:
    refuse_within(
        tmp_path / "data_batch_1",
        p_file(p_array((20000, 3072), p_bytes(b"x"))),
        1 << 20,
        r" array of shape \(20000, 3072\) .* needs 61440000 bytes, the file gives 1",
    )
    frombuffer = p_global("numpy.core.numeric", "_frombuffer")
    shape = p_tuple(p_int(20000), p_int(3072))
    data = p_file(p_call(frombuffer, p_bytes(b"x"), p_dtype("u1"), shape, p_str("C")))
    refuse_within(tmp_path / "test_batch", data, 1 << 20, " array of shape")


def test_arrays_sharing_one_buffer_cannot_outgrow_the_file(tmp_path: Path) -> None:
    """A memoized buffer reused by 1000 arrays: 3 MB of arrays from a 16 kB file."""
    first = p_bytes(bytes(3072)) + pickle.BINPUT + b"\x00"
    rest = pickle.BINGET + b"\x00"
    arrays = [p_array((1, 3072), first if i == 0 else rest) for i in range(1000)]
    data = p_file(pickle.EMPTY_LIST + pickle.MARK + b"".join(arrays) + pickle.APPENDS)
    assert len(data) < 1000 * 200
    refuse_within(tmp_path / "data_batch_1", data, 2 << 20, ": its arrays hold more bytes")


@pytest.mark.parametrize(
    "value",
    [
        np.array([1, None, "x"], dtype=object),
        np.zeros(3, dtype=[("a", "u1"), ("b", "f4")]),
        np.zeros((2, 3), dtype=np.float32),
        np.asfortranarray(np.zeros((2, 3), dtype=np.uint8)),
        np.dtype(("u1", (1000, 1000))),
    ],
    ids=["object", "structured", "float", "fortran", "subarray-dtype"],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_only_plain_c_ordered_int_arrays(tmp_path: Path, value, protocol: int) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": value}, protocol=protocol))
    with pytest.raises(DataError, match=rf"^{path} is not a plain data pickle: refused"):
        safe_load(path)


def test_many_empty_containers_are_refused(tmp_path: Path) -> None:
    """One byte per dict is ~70 bytes of memory each: a 200 kB file would take 14 MB."""
    data = p_file(pickle.EMPTY_LIST + pickle.MARK + pickle.EMPTY_DICT * 200_000 + pickle.APPENDS)
    refuse_within(tmp_path / "data_batch_1", data, 2 << 20, ": more objects than")


@pytest.mark.parametrize("python2", [True, False], ids=["python2", "python3"])
def test_real_batches_load_into_arrays_of_their_own(fakes, tmp_path: Path, python2: bool) -> None:
    rows = fakes.cifar_rows(500, seed=0)
    batch = {b"data": rows, b"labels": list(range(10)) * 50, b"ids": np.arange(500)}
    (fakes.dump_python2 if python2 else fakes.dump_python3)(batch, tmp_path / "batch")
    size = (tmp_path / "batch").stat().st_size
    assert peak_memory(safe_load, tmp_path / "batch") < 4 * size
    loaded = safe_load(tmp_path / "batch")
    for key in (b"data", b"ids"):
        array = loaded[key]
        assert np.array_equal(array, batch[key]) and array.dtype == batch[key].dtype
        assert array.flags.c_contiguous and array.flags.writeable
        # numpy keeps large unpickled arrays on a bytes object: it must be exactly theirs.
        own = array.flags.owndata or (type(array.base) is bytes and len(array.base) == array.nbytes)
        assert own
    assert loaded[b"labels"] == batch[b"labels"]


def test_zero_stride_cifar_batch_fails_fast_through_load_dataset(fakes, tmp_path: Path) -> None:
    """A test_batch of 20000 one-byte images: the old reader copied 61 MB out of ~100 bytes."""
    folder = fakes.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1)
    data, labels = zero_stride_array((20000, 3072)), zero_stride_array((20000,), b"\x00")
    (folder / "test_batch").write_bytes(p_batch(data, labels))

    def load() -> None:
        with pytest.raises(DataError, match=r"test_batch is not a plain data pickle: refused"):
            load_dataset("cifar10", root=str(folder))

    assert peak_memory(load) < 2 << 20
