"""The restricted unpickler: numpy arrays in, code execution out."""

from __future__ import annotations

import builtins
import importlib
import os
import pickle
import subprocess
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
