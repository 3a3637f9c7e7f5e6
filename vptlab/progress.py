"""Rich progress bars for long loops (training epochs, evaluation passes); the lowest floor, so
the engine and the metrics draw the same bar.

It disappears when disabled or when output is not a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def new_progress() -> Progress:
    """A transient rich Progress with vptlab's columns (description, bar, n/N, elapsed, left)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, transient=True)


@contextmanager
def progress_bar(
    description: str, total: int, enabled: bool = True, completed: int = 0
) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable; a no-op when the bar is disabled. `completed` steps are
    already done (a resumed epoch)."""
    if not enabled:
        yield lambda: None
        return
    with new_progress() as progress:
        task_id = progress.add_task(description, total=total, completed=completed)
        yield lambda: progress.advance(task_id)
