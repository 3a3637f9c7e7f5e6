"""ANP and i-BAU at their authors' budgets on finished poisoned runs of a study, beside the budget
the study gave them: does a repair that "changes nothing" in the study act when it gets the
budget its paper used?

- anp: `iterations` mask steps (the authors': 2,000 of 128 samples; the backdoorbench_fashion
  preset: its recipe's 10 passes over 200 clean images, 20 steps).
- ibau: rounds of Adam at 1e-4 (BackdoorBench's step). BackdoorBench makes ~50 outer steps (5
  rounds over 2,500 images at batch 256); over 200 clean images at batch 128 a round is 2 steps,
  so 25 rounds give the same number of steps (the preset: 5 rounds, 10 steps).

    python benchmarks/repair_budgets.py runs/backdoorbench-fashion/badnets-s0 [...]

Each repair goes to `<run>-anp2000` / `<run>-ibau25` beside the run (blind, 5% clean data, no
adaptive attacker) and a Markdown table (run, repair, budget, ASR and CA before -> after,
pruned neurons, seconds) goes to stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from vptlab.steps.defend import defend

SETTINGS = ["device=cpu", "output.progress=false", "data.num_workers=0"]
# (label, defense, recipe): the authors' budgets (see the module docstring).
BUDGETS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("anp2000", {"name": "anp", "options": {"iterations": 2000}},
     {"epochs": 10, "eval_every": 10}),
    ("ibau25", {"name": "ibau"},
     {"epochs": 25, "eval_every": 25, "lr": 1e-4, "weight_decay": 0.0}),
]  # fmt: skip


def main(runs: list[Path]) -> None:
    print("| run | repair | budget | ASR before -> after | CA before -> after | pruned | s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for run in runs:
        for label, defense, recipe in BUDGETS:
            start = time.perf_counter()
            metrics = defend(run, {**defense, "clean_fraction": 0.05},
                             [*SETTINGS, f"name={run.name}-{label}"], train=recipe,
                             adaptive=False)  # fmt: skip
            d = metrics["defense"]
            pruned = metrics.get("anp", {}).get("pruned", "")
            print(f"| {run.name} | {defense['name']} | {label} | {d['asr_before']:.1f} -> "
                  f"{d['asr_after']:.1f} | {d['ca_before']:.1f} -> {d['ca_after']:.1f} | "
                  f"{pruned} | {time.perf_counter() - start:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
