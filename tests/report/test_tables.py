"""Tables are rendered from a column spec: the run table keeps its columns (no oracle best-test
epoch; a catastrophic-overfitting mark), any spec renders, and over seeds a column gives mean ±
sample std and n."""

from __future__ import annotations

import pytest

from vptlab.report.tables import (
    RUN_COLUMNS,
    Column,
    Stat,
    aggregate,
    at,
    decimals,
    markdown_table,
    overfitting_column,
    present,
    seed_columns,
    seed_rows,
    stat_text,
    unreliable_mark,
)

METRICS = {
    "name": "full",
    "status": "complete",
    "model": "simplenet",
    "mode": "full",
    "dataset": "digits",
    "params": {"trainable": 12345, "total": 1234567},
    "final": {"test_top1": 91.234, "test_top5": 99.5},
    "best_top1": 92.0,  # an old run's oracle number: no table shows it
    "seconds_per_epoch": 1.2345,
    "wall_seconds": 12.34,
}


def test_run_table_keeps_its_columns() -> None:
    stopped = {"name": "x", "status": "diverged", "model": "s", "mode": "linear", "dataset": "d",
               "params": {"trainable": 1, "total": 2}}
    assert markdown_table(RUN_COLUMNS, [METRICS, stopped]) == (
        "| run | status | model | mode | dataset | trainable params | total params | top-1 "
        "| top-5 | catastrophic overfitting | s / epoch | wall s |\n"
        "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|\n"
        "| full | complete | simplenet | full | digits | 12,345 | 1,234,567 | 91.23 | 99.50 "
        "| n/a | 1.23 | 12.3 |\n"
        "| x | diverged | s | linear | d | 1 | 2 | n/a | n/a | n/a | n/a | n/a |"
    )


def test_a_column_no_row_has_is_left_out() -> None:
    columns = [Column("run", at("name")), Column("a", at("a")), Column("b", at("b"))]
    rows = [{"name": "x", "a": 1}, {"name": "y", "a": None}]
    assert [c.title for c in present(columns, rows)] == ["run", "a"]
    assert [c.title for c in present(columns, [])] == ["run"]  # the first column always stays


def test_catastrophic_overfitting_is_marked() -> None:
    probe = {"final": 12.0, "best": 40.0, "best_epoch": 3}
    flagged = {**METRICS, "robust_probe": probe,
               "catastrophic_overfitting": {"epoch": 5, "probe": 12.0, "best": 40.0}}  # fmt: skip
    column = overfitting_column()
    assert column.text(flagged) == "epoch 5 (40.0 -> 12.0)"
    assert column.text({**METRICS, "robust_probe": probe}) == "no"
    assert column.text(METRICS) == "n/a"  # no probe: nothing to say
    assert overfitting_column("train").text({"train": flagged}) == "epoch 5 (40.0 -> 12.0)"


def test_any_spec_renders() -> None:
    columns = [
        Column("attack", at("attack")),
        Column("robust acc", at("metrics", "acc"), decimals(1), "right"),
    ]
    rows = [{"attack": "pgd|linf", "metrics": {"acc": 45.78}}, {"attack": "fgsm"}]
    assert markdown_table(columns, rows).splitlines() == [
        "| attack | robust acc |",
        "|---|---:|",
        "| pgd\\|linf | 45.8 |",
        "| fgsm | n/a |",
    ]
    assert markdown_table(columns, []).count("\n") == 1


def test_aggregate_is_mean_sample_std_and_count() -> None:
    stat = aggregate([96.0, 96.5, 96.4])
    assert stat is not None and stat.n == 3
    assert stat.mean == pytest.approx(96.3) and stat.std == pytest.approx(0.2646, abs=1e-4)
    assert aggregate([7]) == Stat(7.0, None, 1)  # one seed: no spread to speak of
    assert aggregate([None, 2.0, 4.0]) == Stat(3.0, pytest.approx(1.4142, abs=1e-4), 2)
    assert aggregate([None]) is None and aggregate([]) is None


def test_stat_text_writes_plus_minus_only_over_seeds() -> None:
    assert stat_text(Stat(96.3, 0.41, 3)) == "96.30 ± 0.41"
    assert stat_text(Stat(96.3, None, 1)) == "96.30"
    assert stat_text(Stat(0.9123, 0.0131, 3), decimals(3)) == "0.912 ± 0.013"
    assert stat_text(Stat(96.3, 0.41, 2, of=3)) == "96.30 ± 0.41 (n=2)"  # a seed had none


def test_seed_columns_average_the_finished_seeds_of_each_run() -> None:
    columns = [
        Column("run", at("name")),
        Column("status", at("status")),
        Column("acc", at("acc"), decimals(2), "right", unreliable_mark("unreliable")),
    ]
    rows = [
        {"name": "a", "status": "complete", "acc": 90.0},
        {"name": "a", "status": "complete", "acc": 92.0, "unreliable": ["masked"]},
        {"name": "a", "status": "diverged", "acc": 10.0},  # left out of the mean
        {"name": "b", "status": "complete", "acc": 80.0},
    ]
    table = markdown_table(seed_columns(columns, ["acc"]), seed_rows(rows))
    assert table.splitlines() == [
        "| run | status | acc | n |",
        "|---|---|---:|---:|",
        "| a | complete / diverged | 91.00 ± 1.41 † | 2 |",
        "| b | complete | 80.00 | 1 |",
    ]
    missing = [{"name": "c", "status": "complete"}, {"name": "c", "status": "complete"}]
    assert markdown_table(seed_columns(columns, ["acc"]), seed_rows(missing)).endswith(
        "| c | complete | n/a | 2 |"
    )
