"""The residual ASR's floor: the adaptive attacker's search (vptlab/defenses/adaptive.py) run on
the *clean* model of a backdoor study, once per trigger of the study and seed, with the search
the study used. A universal perturbation of a trigger's family and budget sends some inputs of
even a clean model to the target; a defended model's residual ASR means "still backdoored" only
above this floor.

    python benchmarks/residual_clean_reference.py runs/backdoor-mnist configs/backdoor_mnist.yaml

Writes a Markdown table (trigger, family, budget, clean-model residual ASR mean ± std over the
seeds) to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vptlab.backdoors.metrics import BackdoorThreat
from vptlab.backdoors.poison import load_poison, stored_channels, stored_size
from vptlab.config import load_yaml
from vptlab.defenses.adaptive import residual_metrics
from vptlab.report.tables import aggregate, stat_text
from vptlab.steps.defend import RESIDUAL_FILE
from vptlab.steps.train import load_run


def main(study_dir: Path, config: Path) -> None:
    raw = load_yaml(config)
    search = raw.get("adaptive", True)
    options = search if isinstance(search, dict) else {}
    seeds = raw.get("seeds") or [None]
    triggers = [label for label, spec in raw["runs"].items()
                if spec.get("data", {}).get("poison") is not None]  # fmt: skip
    print("| trigger | family | budget | clean-model residual ASR % | poisoned-model residual "
          "ASR % | n |\n|---|---|---:|---:|---:|---:|")  # fmt: skip
    for label in triggers:
        clean_asr, poisoned_asr, family, budget = [], [], "", 0.0
        for seed in seeds:
            suffix = "" if seed is None else f"-s{seed}"
            poisoned_dir = study_dir / f"{label}{suffix}"
            _, poisoned, data = load_run(poisoned_dir, device="cpu")
            _, clean, _ = load_run(study_dir / f"clean{suffix}", device="cpu")
            _, trigger, poison = load_poison(poisoned_dir)
            threat = BackdoorThreat(trigger, poison.target, poison.mode,
                                    num_classes=data.num_classes, size=stored_size(data.test),
                                    channels=stored_channels(data.test))  # fmt: skip
            # The clean model stands in for the "defended" one; the poisoned one's search, made
            # by the study, is read back from its folder.
            key = json.dumps({"seed": seed or 0, **options}, sort_keys=True)
            cached = poisoned_dir / RESIDUAL_FILE
            before = json.loads(cached.read_text()).get(key) if cached.is_file() else None
            out = residual_metrics(poisoned, clean, data, threat, seed or 0, before=before,
                                   **options)
            clean_asr.append(out["residual_asr"])
            poisoned_asr.append(out["residual_asr_before"])
            family, budget = out["residual"]["family"], out["residual"]["budget"]
        print(f"| {label} | {family} | {budget:.4f} | {stat_text(aggregate(clean_asr))} | "
              f"{stat_text(aggregate(poisoned_asr))} | {len(clean_asr)} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
