"""Progress for long loops (training epochs, evaluation passes); the lowest floor, so the engine
and the metrics report progress the same way.

On a terminal (or in Jupyter) it is a transient rich bar. Anywhere else (CI, `nohup`, a pipe) a
bar would leave blank lines in the log, so it writes plain lines instead: one when a bar
completes (`train epoch 3/10: 100% 250/250 12.3s`), one when a bar's description changes after
some progress (an evaluation moving on to its next pass), and one every `PLAIN_EVERY_S` seconds
of a long bar, so a log shows that a run is alive. Nothing at all when disabled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 60.0  # a plain line at least this often while a bar runs


@dataclass
class _PlainTask:
    description: str
    total: int | None
    completed: int
    start: float
    last_line: float
    written: int  # `completed` when the last line was written (-1: none yet)


class PlainProgress:
    """The part of rich's `Progress` that vptlab uses (`add_task`, `advance`, `update`, a
    context manager), writing whole lines to `file` instead of redrawing a bar."""

    def __init__(self, file: IO[str], every_s: float = PLAIN_EVERY_S) -> None:
        self.file = file
        self.every_s = every_s
        self.tasks: list[_PlainTask] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        # A bar left unfinished (an error, an unknown total) still says where it stopped.
        for task in self.tasks:
            if task.completed != task.written and task.completed > 0:
                self._line(task)

    def add_task(self, description: str, total: float | None = None, completed: int = 0,
                 **_: Any) -> int:  # fmt: skip
        now = time.perf_counter()
        total = None if total is None else int(total)
        self.tasks.append(_PlainTask(description, total, completed, now, now, completed))
        return len(self.tasks) - 1

    def update(self, task_id: int, *, description: str | None = None, advance: int = 0,
               **_: Any) -> None:  # fmt: skip
        task = self.tasks[task_id]
        if description is not None and description != task.description:
            if task.completed != task.written and task.completed > 0:
                self._line(task)  # the previous stage, where it ended
            task.description = description
        if advance:
            self.advance(task_id, advance)

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.completed += int(advance)
        done = task.total is not None and task.completed >= task.total
        if done or time.perf_counter() - task.last_line >= self.every_s:
            self._line(task)

    def _line(self, task: _PlainTask) -> None:
        now = time.perf_counter()
        if task.total:
            count = f"{100 * task.completed // task.total}% {task.completed}/{task.total}"
        else:
            count = f"{task.completed}"
        self.file.write(f"{task.description}: {count} {now - task.start:.1f}s\n")
        self.file.flush()
        task.last_line, task.written = now, task.completed


def new_progress(file: IO[str] | None = None) -> Progress | PlainProgress:
    """Progress on `file` (default: rich's console, stdout): a transient rich Progress with
    vptlab's columns (description, bar, n/N, elapsed, left) on a terminal, plain lines
    otherwise."""
    console = get_console() if file is None else Console(file=file)
    if not (console.is_terminal or console.is_jupyter):
        return PlainProgress(console.file)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=True)


@contextmanager
def progress_bar(
    description: str,
    total: int,
    enabled: bool = True,
    completed: int = 0,
    file: IO[str] | None = None,
) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable; a no-op when the bar is disabled. `completed` steps are
    already done (a resumed epoch)."""
    if not enabled:
        yield lambda: None
        return
    with new_progress(file) as progress:
        task_id = progress.add_task(description, total=total, completed=completed)
        yield lambda: progress.advance(task_id)
