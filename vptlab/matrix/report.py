"""The threat matrix's report, rebuilt from its folders only (`vptlab report DIR`): matrix.json
says which cells belong to the matrix, each cell's cell.json what it measured.

One document, two renderings (vptlab/report/document.py): report.md and a self-contained
report.html with sortable tables and embedded plots. Per threat a table (clean top-1/top-5 and
robust accuracy per budget; or CA, ASR, RA, ASR before, ASR drop and DER; a catastrophic-
overfitting mark where a training run had the robust probe), a clean-vs-robust
scatter per evasion threat, an ASR before / after chart per repair defense, training curves,
example grids, each cell's config and wall time, and the failed and skipped cells with reasons.
The per-threat tables hold no timings, so a resumed matrix gives the same tables as one
uninterrupted run.

With a seeds axis (matrix.json's `seeds`) a threat's table has one row per cell over its seeds:
each number its mean ± sample std over the seeds that finished, `n` their count (the study's
helpers in vptlab/report/tables.py); the plots show the means (the curves with their std), and
the per-seed tables follow in a collapsed appendix.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vptlab.errors import ConfigError
from vptlab.matrix.cells import PLAN_FILE
from vptlab.report.document import (
    Block,
    BulletList,
    Code,
    Details,
    Heading,
    Image,
    Paragraph,
    Table,
    write_report,
)
from vptlab.report.plots import (
    plot_asr_before_after,
    plot_clean_vs_robust,
    plot_curves,
    seed_curve,
)
from vptlab.report.tables import (
    Column,
    at,
    decimals,
    overfitting_column,
    seed_columns,
    seed_rows,
    unreliable_mark,
    unreliable_notes,
)
from vptlab.runs import CELL_FILE

Row = dict[str, Any]
PCT = decimals(2)


def load_cells(out: Path) -> tuple[dict[str, Any], list[Row]]:
    """The plan's config and one row per planned cell: its cell.json when it has one, else the
    plan's entry with status skipped or pending."""
    path = out / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{out} holds no threat matrix: no {PLAN_FILE} there")
    plan = json.loads(path.read_text())
    rows = []
    for entry in plan["cells"]:
        row: Row = {**entry, "status": "skipped" if entry["skip"] else "pending"}
        if not entry["skip"]:
            cell_path = Path(entry["folder"]) / CELL_FILE
            saved = _read(cell_path)
            if saved is not None and saved.get("key") == entry["key"]:
                row = {**row, **saved}
        rows.append(row)
    return plan["config"], rows


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def label_columns() -> list[Column]:
    return [Column("model", at("model")), Column("adaptation", at("adaptation")),
            Column("defense", at("defense")), Column("status", at("status"))]  # fmt: skip


def metric(name: str) -> Column:
    return Column(name, at("metrics", name), PCT, "right")


def evasion_columns(rows: Sequence[Row]) -> list[Column]:
    names: list[str] = []
    for row in rows:
        names += [a["metric"] + "/acc" for a in row.get("attacks", [])
                  if a["metric"] + "/acc" not in names]  # fmt: skip
    cols = [*label_columns(), Column("clean top-1", at("metrics", "clean/top1"), PCT, "right"),
            Column("clean top-5", at("metrics", "clean/top5"), PCT, "right")]  # fmt: skip
    return cols + [Column(n.removesuffix("/acc"), at("metrics", n), PCT, "right",
                          unreliable_mark("unreliable", n.removesuffix("/acc"))) for n in names]


def unreliable_list(rows: Sequence[Row]) -> list[Block]:
    """The reasons behind each marked robust accuracy of an evasion table (sanity checks)."""
    notes = unreliable_notes((row["id"], metric, reasons) for row in rows
                             for metric, reasons in row.get("unreliable", {}).items())  # fmt: skip
    return [BulletList(notes)] if notes else []


def trigger_of(row: Row) -> str | None:
    return next((k.removesuffix("/asr") for k in row.get("metrics", {}) if k.endswith("/asr")),
                None)  # fmt: skip


def backdoor_columns(trigger: str) -> list[Column]:
    return [
        *label_columns(),
        Column("CA %", at("metrics", "clean/top1"), PCT, "right"),
        Column("ASR %", at("metrics", f"{trigger}/asr"), PCT, "right"),
        Column("RA %", at("metrics", f"{trigger}/ra"), PCT, "right"),
        Column("ASR before %", at("before", f"{trigger}/asr"), PCT, "right"),
        Column("ASR drop", at("derived", "asr_drop"), PCT, "right"),
        Column("DER", at("derived", "der"), decimals(3), "right"),
        Column("residual ASR %", at("derived", "residual_asr"), PCT, "right"),
    ]


CELL_COLUMNS = [
    Column("cell", at("id")),
    Column("status", at("status")),
    Column("train s", at("seconds", "train"), decimals(1), "right"),
    Column("defend s", at("seconds", "defend"), decimals(1), "right"),
    Column("evaluate s", at("seconds", "evaluate"), decimals(1), "right"),
    Column("wall s", at("wall_seconds"), decimals(1), "right"),
    Column("training run", at("train_run")),
]


def cell_of(row: Row) -> str:
    """A cell's id without its seed: the row of a threat table over seeds that the seed is in."""
    return "/".join(row[k] for k in ("model", "adaptation", "threat", "defense"))


def seeded(config: dict[str, Any]) -> bool:
    return config.get("seeds") is not None


def over_seeds(columns: Sequence[Column], cells: Sequence[Row], table_id: str) -> Table:
    """A threat table with one row per cell over its seeds: its numbers (the right-aligned
    columns) as mean ± std with `n`, its labels and marks as its seeds' texts."""
    averaged = [c.title for c in columns if c.align == "right"]
    return Table(seed_columns(columns, averaged), seed_rows(cells, cell_of), id=table_id)


def threat_tables(config: dict[str, Any], rows: Sequence[Row],
                  appendix: list[Block] | None = None) -> list[Block]:  # fmt: skip
    """One section per threat: what it is, and its cells' table (skipped cells left out). With a
    seeds axis the table is over the seeds and each seed's table goes to `appendix`."""
    blocks: list[Block] = []
    for threat, spec in config["threats"].items():
        cells = [r for r in rows if r["threat"] == threat and r["status"] != "skipped"]
        text = describe(spec, config["evaluation"].get("limit"), config["evaluation"].get("checks"))
        blocks += [Heading(f"Threat: {threat} ({spec['kind']})"), Paragraph(text)]
        if not cells:
            blocks.append(Paragraph("No cell of this threat runs (all skipped)."))
            continue
        if spec["kind"] == "backdoor":
            trigger = next((t for r in cells if (t := trigger_of(r))), spec["poison"]["trigger"])
            columns = backdoor_columns(trigger)
        else:
            columns = evasion_columns(cells)
        if any("robust_probe" in (r.get("train") or {}) for r in cells):
            # After the labels: a training run that overfit catastrophically is marked beside
            # the numbers measured on it.
            columns.insert(len(label_columns()), overfitting_column("train"))
        if seeded(config):
            blocks.append(over_seeds(columns, cells, f"threat-{threat}"))
            per_seed = [Column("seed", at("seed"), str, "right"), *columns]
            if appendix is not None:
                appendix += [Heading(f"Threat: {threat}", 3),
                             Table(per_seed, cells, id=f"threat-{threat}-seeds")]  # fmt: skip
        else:
            blocks.append(Table(columns, cells, id=f"threat-{threat}"))
        if spec["kind"] != "backdoor":
            blocks += unreliable_list(cells)
    return blocks


def describe(spec: dict[str, Any], limit: int | None, checks: dict[str, Any] | None = None) -> str:
    if spec["kind"] == "evasion":
        budgets = ", ".join(f"{a['name']} {a['norm']} eps {a['eps']:g} ({a['steps']} steps)"
                            for a in spec["attacks"])  # fmt: skip
        samples = f"the first {limit} test samples" if limit else "the test split"
        text = f"Evasion attacks on {samples}, robust top-1 % per budget: {budgets}."
        if checks and checks.get("enabled"):
            checked = min(checks["samples"], limit) if limit else checks["samples"]
            text += (f" Sanity checks on the first {checked} samples; † marks a number that "
                     "failed one (reasons below the table).")
        return text
    if spec["kind"] == "backdoor":
        p = spec["poison"]
        return (f"Backdoor `{p['trigger']}`: {p['rate']:g} of the train split poisoned, target "
                f"{p['target']} ({p['mode']}, {p['label']} label). CA: clean top-1; ASR: "
                "triggered non-target test images classified as the target; RA: triggered images "
                "still classified correctly; ASR before / drop and DER for repair defenses.")
    return "Clean test accuracy."


def scatter_plots(out: Path, config: dict[str, Any], rows: Sequence[Row]) -> list[Block]:
    """Per evasion threat: clean vs robust top-1 at its strongest budget, one series per model /
    adaptation, each point labelled by its defense."""
    blocks: list[Block] = []
    for threat, spec in config["threats"].items():
        if spec["kind"] != "evasion":
            continue
        done = [r for r in rows if r["threat"] == threat and r["status"] == "complete"]
        if not done:
            continue
        strongest = max(spec["attacks"], key=lambda a: a["eps"])
        seeds: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for row in done:
            name = next((a["metric"] for a in row.get("attacks", [])
                         if a["eps"] == strongest["eps"] and a["norm"] == strongest["norm"]),
                        None)  # fmt: skip
            if name is None:
                continue
            seeds.setdefault((f"{row['model']} / {row['adaptation']}", row["defense"]), []).append(
                (row["metrics"]["clean/top1"], row["metrics"][f"{name}/acc"]))
        points: dict[str, list[tuple[float, float, str]]] = {}
        for (series, defense), values in seeds.items():  # a cell's point: its seeds' mean
            clean, robust = mean_of(values)
            points.setdefault(series, []).append((clean, robust, defense))
        path = out / f"clean_vs_robust-{threat}.png"
        plot_clean_vs_robust(points, path, title=f"{threat}: clean vs robust top-1 "
                             f"({strongest['norm']} eps {strongest['eps']:g})")  # fmt: skip
        blocks.append(Image(path, f"clean vs robust accuracy, {threat}"))
    return blocks


def asr_charts(out: Path, config: dict[str, Any], rows: Sequence[Row]) -> list[Block]:
    """Per repair defense: each backdoored cell's ASR before and after it (its seeds' means)."""
    blocks: list[Block] = []
    for defense, spec in config["defenses"].items():
        if spec["kind"] != "repair":
            continue
        seeds: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            trigger = trigger_of(row)
            if row["defense"] == defense and row["status"] == "complete" and trigger:
                seeds.setdefault(f"{row['model']}/{row['adaptation']}/{row['threat']}", []).append(
                    (row["before"][f"{trigger}/asr"], row["metrics"][f"{trigger}/asr"]))
        bars = []
        for label, values in seeds.items():
            before, after = mean_of(values)
            bars.append((label, before, after))
        if bars:
            path = out / f"asr-{defense}.png"
            plot_asr_before_after(bars, path, title=f"ASR before / after defense {defense}")
            blocks.append(Image(path, f"ASR before and after {defense}"))
    return blocks


def mean_of(values: Sequence[tuple[float, ...]]) -> tuple[float, ...]:
    """Each position's mean over a cell's seeds (one seed: its own numbers, exactly)."""
    return tuple(statistics.fmean(column) for column in zip(*values, strict=True))


def curves(out: Path, rows: Sequence[Row]) -> list[Block]:
    """The training runs' histories; seeded, one curve per run over its seeds (mean and std),
    the runs' names without their `-s<seed>`."""
    histories: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        train = row.get("train") or {}
        if not train.get("history"):
            continue
        if row.get("seed") is None:
            histories.setdefault(train["name"], train["history"])
        else:
            stem = train["name"].removesuffix(f"-s{row['seed']}")
            runs.setdefault(stem, {}).setdefault(train["name"], train["history"])
    histories.update({stem: seed_curve(list(by_seed.values())) for stem, by_seed in runs.items()})
    if not histories:
        return []
    plot_curves(histories, out / "curves.png", title="training runs of the matrix")
    return [Heading("Training curves"), Image(out / "curves.png", "training curves")]


def grids(rows: Sequence[Row]) -> list[Block]:
    blocks: list[Block] = []
    for row in rows:
        images = [Image(Path(row["folder"]) / g, f"{row['id']}: {g}") for g in row.get("grids", [])]
        if images:
            blocks.append(Details(f"{row['id']}", images))
    return [Heading("Examples"), *blocks] if blocks else []


def cells_section(rows: Sequence[Row]) -> list[Block]:
    run = [r for r in rows if r["status"] != "skipped"]
    blocks: list[Block] = [Heading("Cells"), Table(CELL_COLUMNS, run, id="cells")]
    for row in run:
        if row.get("config"):
            text = yaml.safe_dump(row["config"], sort_keys=False)
            blocks.append(Details(f"config of {row['id']}", [Code(text)]))
    failed = [f"{r['id']}: {r.get('error', 'failed')}" for r in rows if r["status"] == "failed"]
    skipped = [f"{r['id']}: {r['skip']}" for r in rows if r["status"] == "skipped"]
    pending = [r["id"] for r in rows if r["status"] == "pending"]
    if failed:
        blocks += [Heading("Failed cells"), BulletList(failed)]
    if skipped:
        blocks += [Heading("Skipped cells"), BulletList(skipped)]
    if pending:
        blocks += [Heading("Pending cells (not run yet)"), BulletList(pending)]
    return blocks


def matrix_blocks(out: Path) -> tuple[str, list[Block]]:
    """The report's blocks: summary, threat tables, plots, curves, grids, cells (and, with a
    seeds axis, the per-seed appendix)."""
    config, rows = load_cells(out)
    title = config.get("title") or f"threat matrix {config['matrix']}"
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("complete", "failed", "skipped", "pending")}  # fmt: skip
    wall = sum(r.get("wall_seconds") or 0.0 for r in rows if r["status"] == "complete")
    summary = (f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + f". Models: {', '.join(config['models'])}; adaptations: "
               f"{', '.join(config['adaptations'])}; threats: {', '.join(config['threats'])}; "
               f"defenses: {', '.join(config['defenses'])}. Sum of the cells' wall times: "
               f"{wall:.0f} s (shared training runs counted in each of their cells).")
    blocks: list[Block] = [Heading(title, 1)]
    if config.get("description"):
        blocks.append(Paragraph(config["description"].strip()))
    blocks.append(Paragraph(summary))
    appendix: list[Block] = []
    if seeded(config):
        blocks.append(Paragraph(seeds_note(config["seeds"], rows)))
    blocks += threat_tables(config, rows, appendix)
    plots = scatter_plots(out, config, rows) + asr_charts(out, config, rows)
    if plots:
        blocks += [Heading("Plots"), *plots]
    blocks += curves(out, rows) + grids(rows) + cells_section(rows)
    if appendix:
        blocks += [Heading("Appendix: per-seed results"),
                   Details("every seed's cells, as run", appendix)]  # fmt: skip
    return title, blocks


def seeds_note(seeds: Sequence[int], rows: Sequence[Row]) -> str:
    """What the numbers of a matrix over seeds are (the cell counts above are per seed)."""
    cells = len({cell_of(r) for r in rows})
    return (f"Seeds: {', '.join(map(str, seeds))}: each of the {cells} cells is run once per "
            "seed (the counts above are per seed). Each number of a threat table is the mean ± "
            "sample std over the seeds that finished, n their count; the plots show the means; "
            "the per-seed tables are in the appendix.")


def write_matrix_report(out: str | Path) -> Path:
    """Rebuild report.md and report.html of the matrix folder `out`; returns report.html."""
    out = Path(out)
    title, blocks = matrix_blocks(out)
    _, html = write_report(blocks, out, title)
    return html
