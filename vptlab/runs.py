"""Run folders on disk: their file names, atomic writes, and one writer per folder.

Every file vptlab writes goes through `atomic_write` (a temp file beside it, then a rename), so a
crash leaves the old file or the new one, complete. A lock file, created with O_EXCL, names the
holder's pid and host.

Every verb that writes a run folder (train, resume, attack, detect, defend, a study or a threat
matrix on its own folder) holds `folder_lock` while it writes, so a second command on the same
folder is refused with one line naming the holder instead of interleaving its files with the
first's. A lock left by a killed process (its pid no longer alive on this host) is stale and taken
over; so are the temp files its unfinished atomic writes left behind.

No torch import here: a lock is taken before anything heavy is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vptlab.errors import FolderLocked, VptlabError

# The files of a run folder.
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
# A threat-matrix cell's result (matrix/<name>/cells/<cell>/).
CELL_FILE = "cell.json"
# The last consistent model file, kept (as a hard link) while its successor and the new state are
# written: a kill between the two writes is repaired from it on resume.
PREVIOUS_MODEL_FILE = ".model.prev.safetensors"
LOCK_FILE = ".vptlab.lock"
# A lock file whose content cannot be read is one whose holder died between creating and
# writing it (microseconds), unless it is that young: then its holder may be writing it now.
UNREADABLE_STALE_SECONDS = 10.0
_held: dict[Path, int] = {}  # folders this process holds, with their nesting depth
# Folders that taking a lock created, with their new parents: removed again if left empty.
_created: dict[Path, list[Path]] = {}


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: str | Path) -> None:
    """Flush a file's content to the disk; a failure (ENOSPC, EIO) means it may not be there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str | Path) -> None:
    """Flush a folder's entries (a rename) to the disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself has happened
    finally:
        os.close(fd)


# How safetensors' writer (Rust) reports a failed write: its own exception type, with the
# operating system's reason inside the message ("I/O error: No space left on device (os error 28)").
_NATIVE_WRITE_FAILURES = ("I/O error", "(os error ")


def _write_failure(error: BaseException) -> str | None:
    """The reason a write failed at the operating system, or None for any other error."""
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause.strerror or str(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = _one_line(error)
    if any(mark in text for mark in _NATIVE_WRITE_FAILURES):
        return text.split("I/O error: ", 1)[-1]
    return None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it over `path`.

    The temp file gets the mode a plain `open` would give (mkstemp makes it 0600), and it is
    flushed to disk before the rename and the folder after it, so a crash leaves either the old
    file or the new one, complete. A write the operating system refuses (a full disk, a file size
    limit, an I/O error) is one VptlabError naming the file, which is left as it was.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except Exception as error:
        reason = _write_failure(error)
        if reason is None:
            raise
        raise VptlabError(f"cannot write {path}: {reason} "
                          f"({path.name} is left as it was)") from None  # fmt: skip
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip


def _read(lock: Path) -> dict[str, Any] | None:
    """The lock's holder, or None when the file is gone, empty or not a holder record."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int)
    return holder if ok and isinstance(holder.get("host"), str) else None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _stale(lock: Path, holder: dict[str, Any] | None) -> bool:
    """Whether the lock's holder is gone. Called for folders this process does not hold, so a
    lock naming this very pid was left by an earlier process that had it (a restarted container
    numbers its processes the same way)."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_STALE_SECONDS
        except FileNotFoundError:
            return True
    if holder["host"] != socket.gethostname():
        return False
    return holder["pid"] == os.getpid() or not pid_alive(holder["pid"])


def _create(lock: Path, verb: str) -> bool:
    """Create the lock file with our record; False if it exists already."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps({**_holder(), "verb": verb}).encode())
        os.fsync(fd)
    except OSError as error:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise VptlabError(f"cannot write lock file {lock}: {error.strerror or error}") from None
    os.close(fd)
    return True


def _take_over(lock: Path, seen: dict[str, Any] | None) -> None:
    """Remove a stale lock, unless another process took it over since we read it.

    The lock is moved aside first (one rename wins), then checked: had a live process replaced the
    stale lock in between, its lock is put back and the folder counts as busy."""
    aside = lock.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
    try:
        # Path.replace, not this module's os.replace: the tests count atomic writes through
        # the latter, and a lock is not a file of the run.
        lock.replace(aside)
    except FileNotFoundError:
        return  # another process removed it first; the O_EXCL create decides who gets it
    if _read(aside) != seen:
        try:
            os.link(aside, lock)  # fails if yet another process holds it now: it stays theirs
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def remove_orphan_temp_files(folder: Path) -> list[Path]:
    """Temp files of atomic writes (`.<name>.<random>.tmp`) left in `folder` by a killed writer.

    Called with the folder's lock held: no live writer of this folder can own one."""
    orphans = sorted(folder.glob(".*.tmp"))
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def _busy(folder: Path, lock: Path, holder: dict[str, Any] | None) -> FolderLocked:
    if holder is None:
        return FolderLocked(f"{folder} is being locked by another vptlab command (its lock file "
                            f"{lock} is not written yet); try again, or remove {lock} if no "
                            "vptlab command uses the folder")  # fmt: skip
    verb = f"`vptlab {holder['verb']}`" if isinstance(holder.get("verb"), str) else "vptlab"
    return FolderLocked(
        f"{folder} is in use by {verb} (pid {holder['pid']} on {holder['host']}, since "
        f"{holder.get('since', '?')}); wait for it to end, or remove {lock} if that process is gone"
    )


def acquire(folder: str | Path, verb: str) -> Path:
    """Take `folder`'s lock for `verb` (creating the folder); returns the lock file's path."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:  # this process already writes it (a verb calling another)
        _held[key] += 1
        return folder / LOCK_FILE
    try:
        if not folder.is_dir():
            new = [folder, *(p for p in folder.parents if not p.exists())]
            folder.mkdir(parents=True)
            _created[key] = new
    except OSError as error:
        raise VptlabError(f"cannot create {folder}: {error.strerror or error}") from None
    lock = folder / LOCK_FILE
    for _ in range(3):  # a race with another taker is settled by O_EXCL within a try or two
        if _create(lock, verb):
            _held[key] = 1
            remove_orphan_temp_files(folder)
            return lock
        holder = _read(lock)
        if not _stale(lock, holder):
            raise _busy(folder, lock, holder)
        _take_over(lock, holder)
    raise _busy(folder, lock, _read(lock))


def release(folder: str | Path) -> None:
    """Give up `folder`'s lock (the outermost holder removes the file, if it is still ours)."""
    folder = Path(folder)
    key = folder.resolve()
    depth = _held.get(key, 0)
    if depth > 1:
        _held[key] = depth - 1
        return
    _held.pop(key, None)
    lock = folder / LOCK_FILE
    holder = _read(lock)
    if holder is not None and holder["pid"] == os.getpid() \
            and holder["host"] == socket.gethostname():  # fmt: skip
        lock.unlink(missing_ok=True)
    # A command that failed before writing anything leaves no empty folder behind.
    for path in _created.pop(key, []):
        try:
            path.rmdir()
        except OSError:
            break  # not empty: it holds what the command wrote


def clear_locked_folder(folder: str | Path) -> None:
    """Delete everything in `folder` but its lock (a run trained again from scratch)."""
    for path in Path(folder).iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextmanager
def folder_lock(folder: str | Path, verb: str) -> Iterator[None]:
    """Hold `folder`'s lock for the body; other ranks of a torchrun launch hold nothing (rank 0
    writes the files)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    acquire(folder, verb)
    try:
        yield
    finally:
        release(folder)
