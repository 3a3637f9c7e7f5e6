"""A study's backdoor leaderboard, laid out as BackdoorBench's: one row per poisoned run (an
attack), one column per defense, each cell CA / ASR / DER (mean ± std over the seeds), and a
published reference (BackdoorBench's CIFAR-10 figures) in the same layout beside it, with a
cell-by-cell comparison of the qualitative pattern: does the defense remove the attack?

A cell reads what the study already measured: the undefended run's CA and ASR (`none`), a
repair's CA and ASR after and its DER (metrics.json of `<run>-<defense>`), and a training-time
defense's (`<run>+<defense>`, a run trained with it on the same poisoned split) CA and ASR, its
DER taken against the undefended run of the same seed. DER is given in % as BackdoorBench does
(vptlab's other tables give it as a fraction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vptlab.backdoors.metrics import der
from vptlab.report.tables import Stat, aggregate, stat_text

NONE = "none"  # the undefended column


def twin_label(run: str, defense: str) -> str:
    """The label of poisoned run `run` trained with training-time defense `defense`."""
    return f"{run}+{defense}"
REMOVED_BELOW = 20.0  # ASR % under which a defense counts as removing the backdoor
SURVIVES_FROM = 80.0  # ASR % from which the backdoor counts as surviving it
DIGITS = 1


@dataclass(frozen=True)
class Figures:
    """One cell: CA, ASR and DER in %, each over the seeds (or one published value)."""

    ca: Stat | None
    asr: Stat | None
    der: Stat | None

    def text(self) -> str:
        def one(stat: Stat | None) -> str:
            return "n/a" if stat is None else stat_text(stat, lambda v: f"{v:.{DIGITS}f}")

        return " / ".join(one(s) for s in (self.ca, self.asr, self.der))


def verdict(asr: float | None) -> str | None:
    """The qualitative outcome of a defended ASR: removed, partly, survives (None: no figure)."""
    if asr is None:
        return None
    if asr < REMOVED_BELOW:
        return "removed"
    return "survives" if asr >= SURVIVES_FROM else "partly"


Results = Mapping[str, Mapping[str, Any]]


def _seed_runs(results: Results, label: str) -> dict[Any, Mapping[str, Any]]:
    """Run `label`'s finished results by seed."""
    return {m.get("seed"): m for m in results.values()
            if m.get("label") == label and m.get("status") == "complete"}  # fmt: skip


def _backdoor(metrics: Mapping[str, Any]) -> tuple[float | None, float | None]:
    backdoor = metrics.get("backdoor") or {}
    return backdoor.get("ca"), backdoor.get("asr")


def cells(results: Results, runs: Sequence[str], repairs: Sequence[str],
          training: Sequence[str]) -> dict[str, dict[str, Figures]]:  # fmt: skip
    """Per poisoned run label and defense (`none`, each repair, each training-time defense),
    its figures over the seeds. `results` are a study's run metrics by folder, each with its
    `label` and `seed`."""
    table: dict[str, dict[str, Figures]] = {}
    for run in runs:
        seeds = _seed_runs(results, run)
        values: dict[str, list[tuple[float | None, float | None, float | None]]] = {}
        for seed, metrics in seeds.items():
            ca0, asr0 = _backdoor(metrics)
            values.setdefault(NONE, []).append((ca0, asr0, None))
            for defense in repairs:
                result = (metrics.get("defended") or {}).get(defense) or {}
                numbers = result.get("defense") or {}
                if result.get("status") != "complete":
                    continue
                score = numbers.get("der")
                values.setdefault(defense, []).append(
                    (numbers.get("ca_after"), numbers.get("asr_after"),
                     None if score is None else 100.0 * score))  # fmt: skip
            for defense in training:
                twin = _seed_runs(results, twin_label(run, defense)).get(seed)
                if twin is None:
                    continue
                ca, asr = _backdoor(twin)
                known = None not in (ca0, asr0, ca, asr)
                score = 100.0 * der(ca0, ca, asr0, asr) if known else None  # type: ignore[arg-type]
                values.setdefault(defense, []).append((ca, asr, score))
        table[run] = {defense: Figures(*(aggregate(v[i] for v in rows) for i in range(3)))
                      for defense, rows in values.items()}  # fmt: skip
    return table


def reference_cells(reference: Mapping[str, Mapping[str, Mapping[str, float | None]]]
                    ) -> dict[str, dict[str, Figures]]:  # fmt: skip
    """Published figures (`{run: {defense: {ca, asr, der}}}`, in %) as cells."""

    def one(value: float | None) -> Stat | None:
        return None if value is None else Stat(float(value), None, 1)

    return {run: {defense: Figures(one(f.get("ca")), one(f.get("asr")), one(f.get("der")))
                  for defense, f in row.items()}
            for run, row in reference.items()}  # fmt: skip


def table(board: Mapping[str, Mapping[str, Figures]], runs: Sequence[str],
          defenses: Sequence[str]) -> str:  # fmt: skip
    """The leaderboard as Markdown: a row per run, a column per defense (`none` first)."""
    columns = [NONE, *defenses]
    lines = ["| attack | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]  # fmt: skip
    for run in runs:
        row = board.get(run, {})
        cells_text = [row[d].text() if d in row else "n/a" for d in columns]
        lines.append(f"| {run} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def agreement(ours: Mapping[str, Mapping[str, Figures]],
              theirs: Mapping[str, Mapping[str, Figures]], runs: Sequence[str],
              defenses: Sequence[str]) -> tuple[str, dict[str, int]]:  # fmt: skip
    """Per cell, our outcome and the reference's (`verdict` of the mean ASR) and whether they
    agree; with the counts of agreeing and differing cells. A row whose undefended backdoor
    did not take (mean ASR below `SURVIVES_FROM`, ours or theirs) has nothing to remove: its
    cells say so and are not counted."""
    lines = ["| attack | " + " | ".join(defenses) + " |",
             "|---|" + "---|" * len(defenses)]  # fmt: skip
    counts = {"agree": 0, "differ": 0, "not planted": 0}
    for run in runs:
        planted = [_mean_asr(board.get(run, {}).get(NONE)) for board in (ours, theirs)]
        weak = [asr for asr in planted if asr is not None and asr < SURVIVES_FROM]
        if weak:
            counts["not planted"] += 1
            lines.append(f"| {run} | not planted (undefended ASR {min(weak):.1f}%) |"
                         + " |" * (len(defenses) - 1))  # fmt: skip
            continue
        texts = []
        for defense in defenses:
            mine = _mean_asr(ours.get(run, {}).get(defense))
            published = _mean_asr(theirs.get(run, {}).get(defense))
            a, b = verdict(mine), verdict(published)
            if a is None or b is None:
                texts.append(a or "n/a")
                continue
            same = a == b
            counts["agree" if same else "differ"] += 1
            texts.append(f"{a} ({'agrees' if same else 'BackdoorBench: ' + b})")
        lines.append(f"| {run} | " + " | ".join(texts) + " |")
    return "\n".join(lines), counts


def _mean_asr(figures: Figures | None) -> float | None:
    return None if figures is None or figures.asr is None else figures.asr.mean


def leaderboard_section(results: Results, runs: Sequence[str],
                        repairs: Sequence[str], training: Sequence[str],
                        reference: Mapping[str, Any] | None = None) -> list[str]:  # fmt: skip
    """The report's "Leaderboard" lines: ours, and with a `reference` ({source, cells}) the
    published table and the cell-by-cell comparison."""
    defenses = [*repairs, *training]
    board = cells(results, runs, repairs, training)
    lines = ["## Leaderboard", "",
             "Each cell: CA % / ASR % / DER % (mean ± std over the seeds). `none`: the "
             "undefended run (no DER). Training-time defenses (" +
             (", ".join(f"`{t}`" for t in training) or "none here") +
             ") train a model of their own on the same poisoned split; their DER is taken "
             "against the undefended run of the same seed.", "",
             table(board, runs, defenses), ""]  # fmt: skip
    if reference is None:
        return lines
    theirs = reference_cells(reference.get("cells", {}))
    compare, counts = agreement(board, theirs, runs, defenses)
    lines += ["### Reference", "", f"Source: {reference.get('source', 'not given')}.", "",
              table(theirs, runs, defenses), "",
              "### Does the defense remove the attack? vptlab against the reference", "",
              f"Outcome by the mean ASR after the defense: removed below {REMOVED_BELOW:g}%, "
              f"survives from {SURVIVES_FROM:g}%, partly between; an attack whose undefended "
              f"ASR is under {SURVIVES_FROM:g}% is not planted and not compared. Cells with both "
              f"figures: {counts['agree']} agree, {counts['differ']} differ "
              f"({counts['not planted']} attacks not planted).", "",
              compare, ""]  # fmt: skip
    return lines
