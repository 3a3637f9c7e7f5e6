"""Training curves as one PNG: train and test accuracy per epoch, one line per run, and the
robust-accuracy probe (PGD-10 on held-out samples) beside them when a run recorded it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from vptlab.engine.checkpoint import atomic_write

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(
    histories: dict[str, list[dict[str, Any]]], path: str | Path, title: str = ""
) -> None:
    probe = "probe_robust_acc"
    with_probe = any(probe in row for history in histories.values() for row in history)
    panels = 3 if with_probe else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), sharey=True)
    for label, history in histories.items():
        epochs = [row["epoch"] for row in history]
        line = axes[0].plot(epochs, [row["train_acc"] for row in history], label=label)[0]
        tested = [row for row in history if "test_top1" in row]
        axes[1].plot(
            [row["epoch"] for row in tested],
            [row["test_top1"] for row in tested],
            label=label,
            color=line.get_color(),
            marker="o" if len(tested) < 15 else None,
        )
        probed = [row for row in history if probe in row]
        if with_probe and probed:
            axes[2].plot(
                [row["epoch"] for row in probed],
                [row[probe] for row in probed],
                label=label,
                color=line.get_color(),
                marker="o" if len(probed) < 15 else None,
            )
    names = ("train accuracy", "test top-1", "robust probe (PGD-10)")[:panels]
    for ax, name in zip(axes, names, strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[-1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
