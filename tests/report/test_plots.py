"""Figures over seeds: a run's training curve is its seeds' mean with a ± std band, robust
accuracy vs eps carries error bars."""

from __future__ import annotations

from pathlib import Path

import pytest

from vptlab.report.plots import STD, plot_curves, plot_robust_accuracy, seed_curve


def test_seed_curve_is_the_mean_and_std_per_epoch() -> None:
    seeds = [
        [{"epoch": 1, "train_acc": 50.0, "test_top1": 40.0}, {"epoch": 2, "train_acc": 70.0}],
        [{"epoch": 1, "train_acc": 60.0, "test_top1": 44.0}, {"epoch": 2, "train_acc": 80.0}],
    ]
    first, second = seed_curve(seeds)
    assert first["epoch"] == 1 and first["train_acc"] == 55.0 and first["test_top1"] == 42.0
    assert first[STD]["train_acc"] == pytest.approx(7.0711, abs=1e-4)
    assert second["train_acc"] == 75.0 and "test_top1" not in second
    assert seed_curve([seeds[0]])[0][STD] == {}  # one seed: no band


def test_plots_over_seeds_are_written(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_acc": 50.0 + e, "test_top1": 40.0 + e} for e in (1, 2, 3)]
    other = [{**row, "train_acc": row["train_acc"] + 4} for row in history]
    plot_curves({"a": seed_curve([history, other]), "b": history}, tmp_path / "curves.png")
    plot_robust_accuracy({"a": [(0.0, 90.0, 1.0), (0.1, 50.0, 4.0)], "b": [(0.0, 80.0)]},
                         tmp_path / "robust.png")  # fmt: skip
    for name in ("curves.png", "robust.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
