"""Report figures as PNGs, each written atomically: training curves (one line per run, with the
robust-accuracy probe and a poisoned run's ASR beside them when recorded; a run over several
seeds is its mean with a shaded ± std band), robust accuracy against the attack budget (with
error bars over seeds), clean against robust accuracy, a backdoor's ASR before and after a
defense, and a grid of clean / adversarial examples."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch

from vptlab.runs import atomic_write

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

PROBE = "probe_robust_acc"
# In a history averaged over seeds (`seed_curve`), each row's std per key.
STD = "std"
PROBE_PANEL = "robust probe (PGD-10)"
BACKDOOR_PANEL = "backdoor ASR (solid), RA (dashed)"


def backdoor_keys(histories: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The `{trigger}/asr` keys recorded by any run, in first-seen order."""
    keys: list[str] = []
    for history in histories.values():
        for row in history:
            keys += [k for k in row if k.endswith("/asr") and k not in keys]
    return keys


def curve_panels(histories: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The panels `plot_curves` draws: accuracy always, the probe and ASR when recorded."""
    panels = ["train accuracy", "test top-1"]
    if any(PROBE in row for history in histories.values() for row in history):
        panels.append(PROBE_PANEL)
    if backdoor_keys(histories):
        panels.append(BACKDOOR_PANEL)
    return panels


def plot_curves(
    histories: dict[str, list[dict[str, Any]]], path: str | Path, title: str = ""
) -> None:
    """One line per run: train accuracy and test top-1 per epoch, and beside them the robust
    probe and, for poisoned runs, the backdoor's ASR and RA on the test split (all in %)."""
    panels = curve_panels(histories)
    asr_keys = backdoor_keys(histories)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True)
    for (label, history), color in zip(histories.items(), _colors(), strict=False):
        _series(axes[0], history, "train_acc", label, color)
        _series(axes[1], history, "test_top1", label, color)
        if PROBE_PANEL in panels:
            _series(axes[panels.index(PROBE_PANEL)], history, PROBE, label, color)
        for key in asr_keys:  # the last panel; a run has one trigger, a study maybe several
            name = f"{label} {key}" if len(asr_keys) > 1 else label
            _series(axes[-1], history, key, name, color)
            _series(axes[-1], history, key.removesuffix("/asr") + "/ra", None, color, "--")
    for ax, name in zip(axes, panels, strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[-1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _series(
    ax: Any, history: list[dict[str, Any]], key: str, label: str | None, color: str,
    style: str = "-",
) -> None:
    """`key` against epoch over the rows that recorded it (markers for short runs), shaded ± its
    std where the history is a mean over seeds."""
    rows = [row for row in history if key in row]
    if rows:
        epochs = [row["epoch"] for row in rows]
        means = [row[key] for row in rows]
        ax.plot(epochs, means, style, label=label, color=color,
                marker="o" if len(rows) < 15 else None)  # fmt: skip
        stds = [row.get(STD, {}).get(key) or 0.0 for row in rows]
        if any(stds):
            ax.fill_between(epochs, [m - d for m, d in zip(means, stds, strict=True)],
                            [m + d for m, d in zip(means, stds, strict=True)], color=color,
                            alpha=0.2, linewidth=0)  # fmt: skip


def _colors() -> Iterator[str]:
    """Matplotlib's colour cycle, endlessly: one colour per run across the panels."""
    return itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])


def seed_curve(histories: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One history from a run's seeds: per epoch, each number's mean over the seeds that
    recorded it, and under `STD` its sample std (where two or more did)."""
    by_epoch: dict[Any, list[dict[str, Any]]] = {}
    for history in histories:
        for row in history:
            by_epoch.setdefault(row["epoch"], []).append(row)
    curve = []
    for epoch, rows in sorted(by_epoch.items()):
        out: dict[str, Any] = {"epoch": epoch, STD: {}}
        for key in dict.fromkeys(k for row in rows for k in row if k not in ("epoch", STD)):
            values = [row[key] for row in rows
                      if isinstance(row.get(key), int | float) and not isinstance(row[key], bool)]
            if values:
                out[key] = statistics.fmean(values)
                if len(values) > 1:
                    out[STD][key] = statistics.stdev(values)
        curve.append(out)
    return curve


def _show(ax: Any, image: torch.Tensor, ylabel: str | None) -> None:
    """One (C,H,W) image in [0,1] in a grid cell, no ticks; the row's name on its first cell."""
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=8)


def _finish_grid(fig: Any, path: str | Path, title: str) -> None:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: str | Path) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_robust_accuracy(
    lines: Mapping[str, Sequence[tuple[float, ...]]], path: str | Path, title: str = ""
) -> None:
    """Robust top-1 (%) against eps, one line per label (a run, or an attack family); points
    `(eps, acc, std)` (a mean over seeds) carry error bars of ± std."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, points in lines.items():
        points = sorted(points)
        stds = [p[2] if len(p) > 2 else None for p in points]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    yerr=[d or 0.0 for d in stds] if any(stds) else None, capsize=3)  # fmt: skip
    ax.set_xlabel("eps")
    ax.set_ylabel("robust top-1 %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_clean_vs_robust(
    points: Mapping[str, Sequence[tuple[float, float, str]]], path: str | Path, title: str = ""
) -> None:
    """Clean top-1 (x) against robust top-1 (y), both in %: one marker series per group (e.g.
    "simplenet / full"), each point labelled with its short name (e.g. "pgd-at"). The diagonal
    is "the attack changes nothing": the distance below it is what the attack takes."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 100], [0, 100], ls="--", color="0.6", lw=1, label="robust = clean")
    # Shapes as well as colours keep the groups apart in grayscale prints.
    for (group, series), marker in zip(points.items(), itertools.cycle("osD^vP*X")):
        ax.scatter([p[0] for p in series], [p[1] for p in series], marker=marker, s=40,
                   label=group, zorder=3)  # fmt: skip
        for x, y, label in series:
            ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("clean top-1 %")
    ax.set_ylabel("robust top-1 %")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_asr_before_after(
    rows: Sequence[tuple[str, float, float]], path: str | Path, title: str = ""
) -> None:
    """Per label (e.g. a defense on a trigger) two bars: the attack success rate (%) before the
    defense and after it, each with its value written on top."""
    labels = [row[0] for row in rows]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(rows) + 2), 4))
    before = ax.bar([i - width / 2 for i in x], [row[1] for row in rows], width, label="before",
                    color="tab:red")  # fmt: skip
    after = ax.bar([i + width / 2 for i in x], [row[2] for row in rows], width, label="after",
                   color="tab:blue")  # fmt: skip
    for bars in (before, after):
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    tilt = len(rows) > 4  # long labels side by side would overlap
    ax.set_xticks(list(x), labels, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("ASR %")
    ax.set_ylim(0, 105)  # room for the value labels over a 100% bar
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # inside, it would hide a value
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_adversarial_grid(
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    labels: list[str],
    clean_pred: list[str],
    adversarial_pred: list[str],
    path: str | Path,
    title: str = "",
) -> None:
    """Three rows per sample column: the clean image (true and predicted label), the adversarial
    one (its prediction), and the perturbation stretched to the full gray range to be visible."""
    count = len(clean)
    fig, axes = plt.subplots(3, count, figsize=(1.6 * count, 5.4), squeeze=False)
    delta = adversarial - clean
    scale = delta.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    amplified = 0.5 + delta / (2 * scale)
    rows = (("clean", clean), ("adversarial", adversarial), ("perturbation", amplified))
    for r, (name, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            _show(ax, images[c], name if c == 0 else None)
            if r == 0:
                ax.set_title(f"true {labels[c]}\npred {clean_pred[c]}", fontsize=8)
            elif r == 1:
                wrong = adversarial_pred[c] != labels[c]
                ax.set_title(f"pred {adversarial_pred[c]}", fontsize=8,
                             color="red" if wrong else "black")  # fmt: skip
    _finish_grid(fig, path, title)


def plot_backdoor_examples(
    clean: torch.Tensor,
    triggered: torch.Tensor,
    labels: list[str],
    preds: dict[str, tuple[list[str], list[str]]],
    path: str | Path,
    title: str = "",
) -> None:
    """Two rows per sample column: the clean image and the triggered one, each titled with the
    predictions of every model in `preds` ({"before": (clean preds, triggered preds), ...});
    a prediction other than the true label is red."""
    count = len(clean)
    fig, axes = plt.subplots(2, count, figsize=(1.7 * count, 4.4), squeeze=False)
    for r, (name, images) in enumerate((("clean", clean), ("triggered", triggered))):
        for c in range(count):
            ax = axes[r][c]
            _show(ax, images[c], name if c == 0 else None)
            said = [f"{model} {p[r][c]}" for model, p in preds.items()]
            wrong = any(p[r][c] != labels[c] for p in preds.values())
            head = f"true {labels[c]}\n" if r == 0 else ""
            ax.set_title(head + "\n".join(said), fontsize=7, color="red" if wrong else "black")
    _finish_grid(fig, path, title)
