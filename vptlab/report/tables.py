"""Tables of run metrics, described once as data: a column spec (title, alignment, where a cell's
value is in a run's metrics and how it is written) and renderers that draw it. The per-run and the
study reports share `RUN_COLUMNS`; the spec holds no Markdown, so an HTML renderer can draw the
same columns (and sort by the raw values)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Row = Mapping[str, Any]
MISSING = "n/a"


def at(*path: str) -> Callable[[Row], Any]:
    """The value at `row[path[0]][path[1]]...`, or None where the row has none."""

    def value(row: Row) -> Any:
        node: Any = row
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    return value


def decimals(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}f}"


def thousands(value: Any) -> str:
    """`1,234`; a mean over seeds (a float) to one decimal, `1,234.5`."""
    fractional = isinstance(value, float) and not value.is_integer()
    return f"{value:,.1f}" if fractional else f"{value:,.0f}"


@dataclass(frozen=True)
class Column:
    """One column: its `title`, how to read its `value` from a row, how to `fmt` it as text, and
    its alignment. A missing value (None) is written as n/a. `mark` appends a row's mark to the
    text (a number's footnote sign); the value, which HTML tables sort by, stays the number."""

    title: str
    value: Callable[[Row], Any]
    fmt: Callable[[Any], str] = str
    align: Literal["left", "right"] = "left"
    mark: Callable[[Row], str] | None = None

    def text(self, row: Row) -> str:
        value = self.value(row)
        if value is None:
            return MISSING
        return self.fmt(value) + (self.mark(row) if self.mark is not None else "")


def percent(title: str, *path: str) -> Column:
    """A right-aligned column of the number at `path`, two decimals (a percentage)."""
    return Column(title, at(*path), decimals(2), "right")


def overfitting(metrics: Row | None) -> str | None:
    """A run's catastrophic-overfitting mark: `epoch E (B -> P)` (its best probe B fell to P at
    epoch E), `no` when the robust probe ran without a fall, None (n/a) without a probe."""
    if not isinstance(metrics, Mapping) or "robust_probe" not in metrics:
        return None
    co = metrics.get("catastrophic_overfitting")
    if not co:
        return "no"
    if co.get("sign") == "fgsm_gap":
        return f"epoch {co['epoch']} (FGSM {co['fgsm']:.1f} vs PGD {co['probe']:.1f})"
    return f"epoch {co['epoch']} ({co['best']:.1f} -> {co['probe']:.1f})"


def overfitting_column(*path: str) -> Column:
    """The catastrophic-overfitting mark of the run metrics at `path` in a row (the row itself
    when no path is given)."""
    return Column("catastrophic overfitting", lambda row: overfitting(at(*path)(row)))


# What was trained, how much of it, how well, how fast. A row is a run's metrics.json. Top-1 is
# the last epoch's: the best test epoch would be an oracle pick.
RUN_COLUMNS: tuple[Column, ...] = (
    Column("run", at("name")),
    Column("status", at("status")),
    Column("model", at("model")),
    Column("mode", at("mode")),
    Column("dataset", at("dataset")),
    Column("trainable params", at("params", "trainable"), thousands, "right"),
    Column("total params", at("params", "total"), thousands, "right"),
    percent("top-1", "final", "test_top1"),
    percent("top-5", "final", "test_top5"),
    overfitting_column(),
    percent("s / epoch", "seconds_per_epoch"),
    Column("wall s", at("wall_seconds"), decimals(1), "right"),
)


# A poisoned run: how it was poisoned and what the backdoor does (metrics.json's `backdoor`).
BACKDOOR_COLUMNS: tuple[Column, ...] = (
    Column("run", at("name")),
    Column("trigger", at("backdoor", "trigger")),
    Column("rate", at("backdoor", "rate"), lambda v: f"{v:g}", "right"),
    Column("target", at("backdoor", "target"), str, "right"),
    Column("mode", at("backdoor", "mode")),
    Column("label", at("backdoor", "label")),
    Column("poisoned", at("backdoor", "poisoned"), thousands, "right"),
    Column("cross ratio", at("backdoor", "cross_ratio"), lambda v: f"{v:g}", "right"),
    percent("CA %", "backdoor", "ca"),
    percent("ASR %", "backdoor", "asr"),
    percent("RA %", "backdoor", "ra"),
)
BACKDOOR_NOTE = (
    "CA: clean test top-1; ASR: test samples not of the target class, with the trigger, "
    "classified as the target; RA: the same samples classified as their true label. Cross "
    "ratio (WaNet): noise-mode samples per poisoned sample, drawn anew in every training batch."
)

DEFENSE_COLUMNS: tuple[Column, ...] = (
    Column("run", at("name")),
    Column("defense", at("defense", "name")),
    Column("trigger", at("defense", "trigger")),
    percent("CA before %", "defense", "ca_before"),
    percent("CA after %", "defense", "ca_after"),
    percent("ASR before %", "defense", "asr_before"),
    percent("ASR after %", "defense", "asr_after"),
    percent("RA after %", "defense", "ra_after"),
    percent("ASR drop", "defense", "asr_drop"),
    Column("DER", at("defense", "der"), decimals(3), "right"),
)


def residual_asr(row: Row) -> Any:
    """A defended run's residual ASR (an adaptive attacker's, against the defended model): its
    `defense.residual_asr`, or `residual.asr`; None where it was not measured."""
    value = at("defense", "residual_asr")(row)
    return value if value is not None else at("residual", "asr")(row)


RESIDUAL_COLUMN = Column("residual ASR %", residual_asr, decimals(2), "right")


def defense_columns(rows: Iterable[Row]) -> tuple[Column, ...]:
    """`DEFENSE_COLUMNS`, and the residual ASR where any row has one."""
    residual = any(residual_asr(row) is not None for row in rows)
    return (*DEFENSE_COLUMNS, RESIDUAL_COLUMN) if residual else DEFENSE_COLUMNS
DEFENSE_NOTE = (
    "Before: the poisoned model; after: the defended one, on the same clean test split. "
    "ASR drop = ASR before - ASR after (points); DER = [max(0, dASR) - max(0, dCA) + 1] / 2 "
    "with dX = X before - X after as fractions: 1 removes the backdoor at no cost in clean "
    "accuracy, 0.5 changes nothing. Residual ASR: the ASR of the strongest trigger of the "
    "original's family and budget (a patch of the same area, or an additive perturbation as "
    "large) that an adaptive attacker, who knows the target and has the defended model, finds "
    "by gradient search."
)

DETECTION_COLUMNS: tuple[Column, ...] = (
    Column("run", at("name")),
    Column("STRIP AUROC", at("detection", "strip", "auroc"), decimals(3), "right"),
    Column("spectral precision %", at("detection", "spectral", "precision"), decimals(1),
           "right"),  # fmt: skip
    Column("spectral recall %", at("detection", "spectral", "recall"), decimals(1), "right"),
    Column("spectral flagged", at("detection", "spectral", "flagged"), thousands, "right"),
    Column("AC precision %", at("detection", "ac", "precision"), decimals(1), "right"),
    Column("AC recall %", at("detection", "ac", "recall"), decimals(1), "right"),
    Column("AC flagged", at("detection", "ac", "flagged"), thousands, "right"),
    Column("NC anomaly index", at("detection", "nc", "anomaly_index"), decimals(2), "right"),
)
DETECTION_NOTE = (
    "STRIP: AUROC of the trigger-stamped non-target test images against the same images clean "
    "(0.5 is chance). Spectral signatures and activation clustering (AC): the flagged training "
    "samples against the poisoned ones (spectral: 1.5 x an assumed poison-rate bound of 0.1, "
    "not the attack's rate; AC: the smaller 2-means cluster of the label whose split is the "
    "clearest, by silhouette); flagging at random gives a precision equal to the poison rate. "
    "Neural Cleanse (NC): the anomaly index of the smallest reverse-engineered trigger among "
    "the classes' (MAD-scaled); above 2 the model is judged backdoored. A detector the study "
    "did not run has no column."
)


def present(columns: Sequence[Column], rows: Sequence[Row], keep: int = 1) -> list[Column]:
    """`columns` without those that no row has a value for (the first `keep` always stay)."""
    return [*columns[:keep], *(c for c in columns[keep:]
                               if any(c.value(row) is not None for row in rows))]  # fmt: skip


def markdown_table(columns: Sequence[Column], rows: Iterable[Row]) -> str:
    """A GitHub Markdown table: the titles, the alignment line, one line per row."""

    def line(cells: Iterable[str]) -> str:
        # A `|` inside a cell would end the cell early.
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "|".join("---:" if c.align == "right" else "---" for c in columns) + "|"
    body = [line(c.text(row) for c in columns) for row in rows]
    return "\n".join([line(c.title for c in columns), rule, *body])


def number(value: Any) -> str:
    """A budget as written in configs and metric names: 0.3, 0.0314, 1."""
    return f"{value:g}"


# The sign after a robust accuracy that failed a sanity check (vptlab/metrics/sanity.py); the
# footnote under the table gives the reasons.
UNRELIABLE = "†"


def unreliable_mark(*path: str) -> Callable[[Row], str]:
    """` †` where the row's reasons at `path` (a list of strings) are not empty."""
    reasons = at(*path)
    return lambda row: f" {UNRELIABLE}" if reasons(row) else ""


def unreliable_notes(flagged: Iterable[tuple[str, str, Sequence[str]]]) -> list[str]:
    """Footnote lines under a table: `† where metric: reason; reason` per unreliable number
    (`where` names the row: a run or a cell, or empty)."""
    lines = []
    for where, metric, reasons in flagged:
        if reasons:
            label = f"{where}, {metric}" if where else metric
            lines.append(f"{UNRELIABLE} {label}: unreliable, " + "; ".join(reasons) + ".")
    return lines


# One attack per row: its budget and the robust accuracy it leaves (robustness.json's rows);
# a row's `unreliable` holds the reasons its number failed a sanity check.
ATTACK_COLUMNS: tuple[Column, ...] = (
    Column("attack", at("metric")),
    Column("norm", at("norm")),
    Column("eps", at("eps"), number, "right"),
    Column("steps", at("steps"), str, "right"),
    Column("restarts", at("restarts"), str, "right"),
    Column("targeted", at("targeted"), lambda v: {True: "yes", False: "no"}.get(v, str(v))),
    Column("top-1 %", at("acc"), decimals(2), "right", unreliable_mark("unreliable")),
    percent("top-5 %", "top5"),
)


def robust_columns(metrics: Sequence[str]) -> tuple[Column, ...]:
    """One row per run (its metrics.json with `robustness`: the suite's flat metrics, and
    `unreliable`: robustness.json's reasons per metric), clean top-1 and then one column per
    attack's robust top-1, titled by the attack's metric name and marked where unreliable."""
    return (
        Column("run", at("name")),
        percent("clean top-1", "robustness", "clean/top1"),
        *(Column(m, at("robustness", f"{m}/acc"), decimals(2), "right",
                 unreliable_mark("unreliable", m)) for m in metrics),
    )


# Over seeds: a study with a `seeds:` axis trains each run once per seed, and its tables give one
# row per run with mean ± sample std over the seeds that finished, and their number n.


@dataclass(frozen=True)
class Stat:
    """A number over seeds: its mean, its sample standard deviation (ddof 1; None from one
    value), `n` the values it is taken over and `of` the finished runs that could have given one
    (None where not known)."""

    mean: float
    std: float | None
    n: int
    of: int | None = None


def aggregate(values: Iterable[Any]) -> Stat | None:
    """Mean, sample std and count of the numbers in `values`; missing ones (None) are left out,
    and None comes back where none is left."""
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return None
    std = statistics.stdev(numbers) if len(numbers) > 1 else None
    return Stat(statistics.fmean(numbers), std, len(numbers))


def stat_text(stat: Stat, fmt: Callable[[Any], str] | None = None) -> str:
    """`96.30 ± 0.41` (two decimals unless `fmt`); one value alone is just the number; ` (n=2)`
    follows where fewer values than finished runs made it."""
    fmt = fmt or decimals(2)
    text = fmt(stat.mean)
    if stat.std is not None:
        text += f" ± {fmt(stat.std)}"
    if stat.of is not None and stat.n < stat.of:
        text += f" (n={stat.n})"
    return text


def finished(row: Row) -> bool:
    """A run whose numbers count: complete, or a row without a status (a detector's scores)."""
    return row.get("status", "complete") == "complete"


def seed_rows(rows: Iterable[Row], key: Callable[[Row], Hashable] | None = None) -> list[Row]:
    """Rows gathered by `key` (a run's seeds share it; by default their `name`), in first-seen
    order: `{"runs": [...]}` per group, the rows `seed_columns` draw."""
    key = key or at("name")
    groups: dict[Hashable, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return [{"runs": runs} for runs in groups.values()]


def seed_columns(columns: Sequence[Column], averaged: Collection[str]) -> tuple[Column, ...]:
    """`columns` over groups of seeds (`seed_rows`): a column titled in `averaged` gives the mean
    ± std of its finished runs, any other its runs' texts (distinct ones joined by ` / `), and a
    last column `n` counts the finished runs."""
    out = [_averaged(c) if c.title in averaged else _shared(c) for c in columns]
    return (*out, Column("n", lambda group: sum(map(finished, group["runs"])), str, "right"))


def _averaged(column: Column) -> Column:
    def value(group: Row) -> Stat | None:
        done = [row for row in group["runs"] if finished(row)]
        stat = aggregate(column.value(row) for row in done)
        return None if stat is None else replace(stat, of=len(done))

    def mark(group: Row) -> str:  # a number over seeds is marked when any seed's is
        assert column.mark is not None
        return next((m for row in group["runs"] if (m := column.mark(row))), "")

    return Column(column.title, value, lambda stat: stat_text(stat, column.fmt), column.align,
                  mark if column.mark is not None else None)  # fmt: skip


def _shared(column: Column) -> Column:
    def value(group: Row) -> str | None:
        if all(column.value(row) is None for row in group["runs"]):
            return None
        return " / ".join(dict.fromkeys(column.text(row) for row in group["runs"]))

    return Column(column.title, value, str, column.align)


# The defenses over a backdoor study's trigger suite: one row per defense, each poisoned run
# (trigger) counted once with its mean over seeds.
SUITE_COLUMNS: tuple[Column, ...] = (
    Column("defense", at("defense")),
    Column("triggers", at("triggers"), str, "right"),
    percent("mean ASR after %", "asr_after", "mean"),
    percent("worst ASR after %", "asr_after", "worst"),
    percent("mean CA cost", "ca_cost", "mean"),
    Column("mean DER", at("der", "mean"), decimals(3), "right"),
)
SUITE_RESIDUAL_COLUMNS: tuple[Column, ...] = (
    percent("mean residual ASR %", "residual_asr", "mean"),
    percent("worst residual ASR %", "residual_asr", "worst"),
)
SUITE_NOTE = (
    "Per defense, over the study's poisoned runs (one per trigger, each its mean over seeds): "
    "the mean and the worst (highest) ASR after the defense, the mean CA cost (CA before - CA "
    "after, points) and the mean DER; triggers: the poisoned runs the defense finished on."
)


def suite_columns(rows: Iterable[Row]) -> tuple[Column, ...]:
    """`SUITE_COLUMNS`, and the residual ASR's where any row has one."""
    residual = any(at("residual_asr", "mean")(row) is not None for row in rows)
    return (*SUITE_COLUMNS, *SUITE_RESIDUAL_COLUMNS) if residual else SUITE_COLUMNS
