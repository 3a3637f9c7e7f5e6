"""Tables are rendered from a column spec: the run table keeps its columns (no oracle best-test
epoch; a catastrophic-overfitting mark), any spec renders."""

from __future__ import annotations

from vptlab.report.tables import (
    RUN_COLUMNS,
    Column,
    at,
    decimals,
    markdown_table,
    overfitting_column,
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
