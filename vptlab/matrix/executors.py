"""Executors run a matrix's independent cells: `local` in this process, one after another (the
default: nothing to start), or `ray`, one Ray task per cell with its own CPU/GPU share, on this
machine or on a cluster. Both return the same `Outcome`s, so the matrix never asks which one ran.

Ray is imported only when a `RayExecutor` is made, so the local path needs neither Ray nor its
start-up time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from vptlab.errors import ConfigError
from vptlab.registry import Registry

# Executors by name (`--executor`); each takes address and num_cpus (Ray's; local refuses them).
EXECUTORS = Registry["Executor"]("executor")
# Cells return small JSON-able dicts and write their tensors to run folders, so a local Ray's
# shared-object store needs little; Ray's default (30% of RAM) would reserve memory for nothing.
OBJECT_STORE_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class Resources:
    """What one cell needs: Ray schedules by it; the local executor runs one cell at a time and
    ignores it."""

    num_cpus: float = 1
    num_gpus: float = 0


@dataclass
class Outcome:
    """One item's result: its `value`, or `ok=False` and a one-line `error` (a matrix table cell,
    a log line); `seconds` is how long `fn` ran."""

    label: str
    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


class Executor(Protocol):
    """Runs `fn(item)` for each `(label, item)` and returns their Outcomes in the order of `items`.

    `on_done` is called once per item as it finishes (progress lines, results written as they
    come). A failing item becomes a failed Outcome and the others go on; `fn` must be a
    module-level function and the items picklable, so that any executor can ship them.
    """

    name: str

    def close(self) -> None:
        """Release what the executor started (a local Ray); also `with executor:`."""

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[tuple[str, Any]],
        resources: Resources,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Outcomes in the order of `items`; see the class docstring."""
        ...


def one_line(err: BaseException) -> str:
    """`Type: first line of its message`: what a failed cell shows instead of a traceback."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def run_item(fn: Callable[[Any], Any], label: str, item: Any) -> Outcome:
    """`fn(item)` as an Outcome. Both executors call it, Ray inside its workers: that is why it is
    module-level and catches the error where it happens (its type and first line survive any
    pickling; the exception object itself may not). Ctrl-C and SystemExit are not caught."""
    start = time.perf_counter()
    try:
        value = fn(item)
    except Exception as err:
        return Outcome(label, False, error=one_line(err), seconds=time.perf_counter() - start)
    return Outcome(label, True, value=value, seconds=time.perf_counter() - start)


class _Closable:
    """`close()` and `with`: the same shutdown code for every executor, whichever was created."""

    def close(self) -> None:
        """Release what the executor started; nothing by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalExecutor(_Closable):
    """In this process, one item after another: nothing to start, nothing to ship."""

    name = "local"

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[tuple[str, Any]],
        resources: Resources,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """See `Executor.map`; `resources` is not enforced (torch keeps this process's threads)."""
        outcomes = []
        for label, item in items:
            outcome = run_item(fn, label, item)
            if on_done is not None:
                on_done(outcome)
            outcomes.append(outcome)
        return outcomes


class RayExecutor(_Closable):
    """One Ray task per item with `resources`' CPUs and GPUs, on a Ray started here (`num_cpus`
    of this machine's cores, all by default) or on a cluster joined at `address` ("auto",
    "ray://head:10001", ...). A Ray already running in this process is used as it is.

    Each task's torch gets `num_cpus` threads (OMP_NUM_THREADS): results then do not depend on
    how many tasks share the machine, and match a local run with that many threads. A task whose
    worker dies is not retried: it is recorded as failed, and a rerun of the matrix resumes it.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'vptlab[ray]'") from None
        if address is not None and num_cpus is not None:
            raise ConfigError(
                f"num_cpus is for a Ray started here; the cluster at {address} has its own"
            )
        self._ray = ray
        self._started = False
        if ray.is_initialized():
            return
        quiet: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING)
        try:
            if address is not None:
                ray.init(address=address, **quiet)
            else:
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    object_store_memory=OBJECT_STORE_BYTES,
                    runtime_env={"env_vars": _worker_env()},
                    ignore_reinit_error=True,
                    **quiet,
                )
        except Exception as err:
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise ConfigError(f"could not {where}: {one_line(err)}") from None
        self._started = True

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[tuple[str, Any]],
        resources: Resources,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """See `Executor.map`; `on_done` fires in completion order, on this (the driver) process.
        Ctrl-C, or an error from `on_done`, cancels the tasks still running and propagates."""
        ray = self._ray
        self._check_fits(resources)
        threads = str(max(1, int(resources.num_cpus)))
        task = ray.remote(run_item).options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
        )
        fn_ref = ray.put(fn)  # shipped once, not once per item
        submitted = time.perf_counter()
        refs = [task.remote(fn_ref, label, item) for label, item in items]
        position = {ref: i for i, ref in enumerate(refs)}
        outcomes: list[Outcome | None] = [None] * len(refs)
        pending = refs
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = position[ref]
                    outcome = outcomes[i] = self._collect(ref, items[i][0], submitted)
                    if on_done is not None:
                        on_done(outcome)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return [outcome for outcome in outcomes if outcome is not None]

    def _collect(self, ref: Any, label: str, submitted: float) -> Outcome:
        """A finished task's Outcome; one whose worker died or could not load `fn` or the item
        reports the original error (Ray's wrapper `cause`), timed from submission."""
        try:
            return self._ray.get(ref)
        except Exception as err:
            cause = getattr(err, "cause", None)
            error = one_line(cause if isinstance(cause, BaseException) else err)
            return Outcome(label, False, error=error, seconds=time.perf_counter() - submitted)

    def _check_fits(self, resources: Resources) -> None:
        """On a Ray started here, a cell bigger than the machine would wait forever: say so now.
        (A cluster may autoscale to fit it, so a joined one is trusted.)"""
        if not self._started:
            return
        total = self._ray.cluster_resources()
        cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
        if resources.num_cpus > cpus or resources.num_gpus > gpus:
            raise ConfigError(
                f"a cell needs {resources.num_cpus:g} CPUs and {resources.num_gpus:g} GPUs but the "
                f"local Ray has {cpus:g} and {gpus:g}"
            )

    def close(self) -> None:
        """Shut Ray down if this executor started it (never a cluster's or someone else's)."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def _worker_env() -> dict[str, str]:
    """PYTHONPATH for the workers of a Ray started here, so that they unpickle cells from the
    vptlab this process imported: a source checkout (a git worktree, say) beside an editable
    install of another checkout would otherwise give the workers the other one's code."""
    import vptlab

    root = Path(vptlab.__file__).resolve().parent.parent
    if root.name in ("site-packages", "dist-packages"):
        return {}  # installed: workers find the same copy, and site-packages must not go first
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([str(root), *inherited])}


def create_executor(name: str, address: str | None = None, num_cpus: int | None = None) -> Executor:
    """The executor called `name`; `address` and `num_cpus` are Ray's (see `RayExecutor`)."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor '{name}'; choose from: {', '.join(EXECUTORS.names())}")
    return EXECUTORS.create(name, address=address, num_cpus=num_cpus)


@EXECUTORS.register("local", distributed=False)
def _local(address: str | None = None, num_cpus: int | None = None) -> Executor:
    if address is not None or num_cpus is not None:
        raise ConfigError("address and num_cpus are for --executor ray; local runs in-process")
    return LocalExecutor()


@EXECUTORS.register("ray", distributed=True)
def _ray(address: str | None = None, num_cpus: int | None = None) -> Executor:
    return RayExecutor(address=address, num_cpus=num_cpus)
