"""Markdown tables of run metrics, shared by the per-run and the study reports."""

from __future__ import annotations

from typing import Any

RUN_HEADER = (
    "| run | model | mode | dataset | trainable params | total params | top-1 | top-5 "
    "| best top-1 | s / epoch | wall s |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_row(label: str, metrics: dict[str, Any]) -> str:
    """One table row: what was trained, how much of it, how well, how fast."""
    final = metrics.get("final", {})
    params = metrics["params"]
    cells = [
        label,
        metrics["model"],
        metrics["mode"],
        metrics["dataset"],
        f"{params['trainable']:,}",
        f"{params['total']:,}",
        _num(final.get("test_top1"), 2),
        _num(final.get("test_top5"), 2),
        _num(metrics.get("best_top1"), 2),
        _num(metrics.get("seconds_per_epoch"), 2),
        _num(metrics.get("wall_seconds"), 1),
    ]
    return "| " + " | ".join(cells) + " |"
