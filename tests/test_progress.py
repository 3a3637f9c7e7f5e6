"""Progress off a terminal (CI, nohup, a pipe): whole lines a person can read, one per finished
bar or evaluation pass, never the blank lines a rich bar leaves there; a rich bar on a terminal."""

from __future__ import annotations

import io
import re

import pytest
from rich.progress import Progress

from vptlab.progress import PlainProgress, new_progress, progress_bar

LINE = re.compile(r"^train epoch (\d)/3: 100% 5/5 \d+\.\ds$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_on_a_pipe_write_one_line_each_and_no_blank_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # pytest's captured stdout is not a terminal, as under CI or `nohup`.
    for epoch in range(1, 4):
        with progress_bar(f"train epoch {epoch}/3", 5) as advance:
            for _ in range(5):
                advance()
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == ""  # ends with a newline
    assert "" not in lines[:-1] and len(lines[:-1]) == 3, lines
    assert [int(LINE.match(line).group(1)) for line in lines[:-1]] == [1, 2, 3]


def test_a_resumed_bar_counts_from_where_it_was_and_a_broken_one_says_where_it_stopped() -> None:
    out = io.StringIO()
    with progress_bar("resumed", 5, completed=3, file=out) as advance:
        advance()
        advance()
    with pytest.raises(RuntimeError), progress_bar("broken", 5, file=out) as advance:
        advance()
        advance()
        raise RuntimeError("stop")
    with progress_bar("disabled", 5, enabled=False, file=out) as advance:
        advance()
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["resumed: 100% 5/5", "broken: 40% 2/5"]


def test_a_renamed_task_writes_a_line_per_stage() -> None:
    out = io.StringIO()
    with new_progress(out) as progress:  # an evaluation: one task, one stage per pass
        assert isinstance(progress, PlainProgress)
        task = progress.add_task("evaluating", total=6)
        for name in ("clean", "pgd"):
            progress.update(task, description=f"evaluating {name}")
            for _ in range(3):
                progress.advance(task)
    lines = [line.rsplit(" ", 1)[0] for line in out.getvalue().splitlines()]
    assert lines == ["evaluating clean: 50% 3/6", "evaluating pgd: 100% 6/6"]


def test_a_long_bar_writes_a_line_now_and_then() -> None:
    out = io.StringIO()
    with PlainProgress(out, every_s=0.0) as progress:
        task = progress.add_task("long", total=3)
        for _ in range(3):
            progress.advance(task)
    assert len(out.getvalue().splitlines()) == 3


def test_a_terminal_gets_the_rich_bar() -> None:
    assert isinstance(new_progress(Terminal()), Progress)
    assert isinstance(new_progress(io.StringIO()), PlainProgress)
