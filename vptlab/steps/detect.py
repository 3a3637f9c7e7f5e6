"""Backdoor detection: a detector (vptlab/defenses/detectors.py, registered in `DETECTORS`)
scores inputs (higher = more suspicious), and the scores are judged here against what is known
to be poisoned, by the detector's setting:

- "inference" (`strip`): scores of the trigger-stamped non-target test images against the same
  images clean; judged by their AUROC.
- "training" (`spectral`, `ac`): scores of the training samples, the detector flags the suspects
  (spectral signatures: 1.5 x its assumed rate bound x N in the one most suspect label, or per
  label with `per_label`, see `spectral_flags`; activation clustering: the smaller of two
  clusters per label, see `ActivationClustering`); judged by precision and recall of the flagged
  samples against the saved poisoned indices.
- "model" (`nc`, Neural Cleanse): one verdict on the model from the defender's clean images
  (5% of the clean train split): its anomaly index, the flagged classes, and whether the
  attack's target is among them. It also runs on clean (never poisoned) runs: over a study's
  clean and backdoored models, `model_detection` judges the detector's score by its AUROC.

Detectors are blind (docs/defense_protocol.md): they get the model, the inputs to score, and
the defender's clean pool (STRIP) or the training labels (spectral), never the trigger, the
target, the poison rate or the poisoned indices; those only judge them, here.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vptlab.data.base import split_labels
from vptlab.data.loaders import make_loader
from vptlab.defenses.detectors import DETECTORS
from vptlab.errors import ConfigError
from vptlab.runs import atomic_write_text, folder_lock

DETECTION_FILE = "detection.json"


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of scores where `positive` should rank above `negative`: the
    probability that a random positive outscores a random negative, ties counting half
    (Mann-Whitney U from average ranks)."""
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Tied scores share their average rank.
    uniq, inverse, counts = scores.unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def precision_recall(flagged: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Precision and recall (%) of flagged sample indices against the truly poisoned ones."""
    flagged_set, truth = set(flagged.tolist()), set(poisoned.tolist())
    hits = len(flagged_set & truth)
    return {
        "precision": 100.0 * hits / len(flagged_set) if flagged_set else 0.0,
        "recall": 100.0 * hits / len(truth) if truth else 0.0,
        "flagged": len(flagged_set),
    }


def model_detection(verdicts: Iterable[dict[str, Any]], score: str) -> dict[str, Any] | None:
    """A model detector judged over a set of models: the AUROC of its `score` (higher = more
    suspect) with the backdoored models (`poisoned`) as positives and the clean ones as
    negatives, and the shares of each its own verdict (`backdoored`) flags: the true and the
    false positive rate at the detector's threshold. None without both kinds of model."""
    rows = [v for v in verdicts if v.get(score) is not None and v.get("poisoned") is not None]
    positive = [v for v in rows if v["poisoned"]]
    negative = [v for v in rows if not v["poisoned"]]
    if not positive or not negative:
        return None

    def flagged(group: list[dict[str, Any]]) -> float:
        return 100.0 * sum(bool(v.get("backdoored")) for v in group) / len(group)

    return {"auroc": auroc(torch.tensor([float(v[score]) for v in positive]),
                           torch.tensor([float(v[score]) for v in negative])),
            "backdoored_models": len(positive), "clean_models": len(negative),
            "tpr": flagged(positive), "fpr": flagged(negative), "score": score}  # fmt: skip


def model_inputs(split: Any, cfg: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as the model sees it (channels repeated, resized to `data.img_size`), on
    the CPU, with its labels; detection runs on small splits (mnist-5k, CIFAR-10 train)."""
    loader = make_loader(split, cfg.data.eval_batch_size, train=False, device=device,
                         img_size=cfg.data.img_size)  # fmt: skip
    xs, ys = zip(*((b.x.cpu(), b.y.cpu()) for b in loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def detect_run(run_dir: str | Path, detector: str, device: str = "auto",
               overlays: int = 20) -> dict[str, Any]:  # fmt: skip
    """Run `detector` (a name in `DETECTORS`) on a poisoned run (a model detector: on any
    finished run) and record the result in its `detection.json`.

    inference detectors (strip): AUROC of the trigger-stamped non-target test images (positives)
    against the same images clean (negatives); STRIP blends them with the defender's clean images
    (5% of the clean train split). training detectors (spectral): precision / recall of the
    flagged training samples against the poisoned indices the run saved. model detectors (nc):
    the verdict from the defender's clean images, and whether the target is flagged.
    `overlays` goes to the detectors that take it (STRIP).
    """
    from vptlab.steps.defend import finished_config, parent_config

    if detector not in DETECTORS:
        raise ConfigError(f"--detector: unknown detector {detector!r}; choose from: "
                          f"{', '.join(DETECTORS.names())}")  # fmt: skip
    run_dir = Path(run_dir)
    if DETECTORS.meta(detector).get("setting") == "model":
        finished_config(run_dir)  # a clean model is a negative of model-level detection
    else:
        parent_config(run_dir)  # a finished, poisoned run, or one clear error
    with folder_lock(run_dir, "detect"):
        return _detect(run_dir, detector, device, overlays)


def _detect(run_dir: Path, detector: str, device: str, overlays: int) -> dict[str, Any]:
    """`detect_run` with the run's folder locked."""
    from vptlab.backdoors.metrics import select_samples
    from vptlab.backdoors.poison import load_poison_record, non_target_index
    from vptlab.defenses.repair import clean_subset
    from vptlab.steps.defend import clean_data, is_poisoned, threat_of
    from vptlab.steps.train import load_run

    cfg, model, splits = load_run(run_dir, device=device)
    dev = next(model.parameters()).device
    record = load_poison_record(run_dir) if is_poisoned(run_dir, cfg) else None
    setting = DETECTORS.meta(detector).get("setting")
    factory = DETECTORS.get(detector)
    taken = inspect.signature(factory).parameters
    options = {k: v for k, v in {"overlays": overlays}.items() if k in taken}
    if setting == "model":
        pool, _ = model_inputs(clean_subset(clean_data(cfg).train, 0.05, cfg.seed), cfg, dev)
        # A detector that keeps its work (nc's search, shared with the nc repair of this run)
        # keeps it in the folder the run lies in.
        cached = {"cache": run_dir.parent} if "cache" in taken else {}
        scorer = DETECTORS.create(detector, seed=cfg.seed, **options, **cached)
        scorer(model, pool)
        verdict = scorer.verdict()
        truth: dict[str, Any] = {"poisoned": False, "target": None, "target_flagged": None}
        if record is not None:
            target = record.config.target
            truth = {"poisoned": True, "target": target, "mode": record.config.mode,
                     "target_flagged": target in verdict["flagged"]}  # fmt: skip
        result = {**verdict, **truth, "samples": len(pool)}
    elif record is None:
        raise ConfigError(f"run {run_dir} was never poisoned: {detector} has nothing to find")
    elif setting == "inference":
        data = clean_data(cfg)
        threat = threat_of(run_dir, cfg, data)
        cfg_p = record.config
        keep = non_target_index(split_labels(data.test), cfg_p.target, cfg_p.mode)
        test = select_samples(data.test, keep)
        x, y = model_inputs(test, cfg, dev)
        triggered = threat.transform(model, x.to(dev), y.to(dev)).cpu()
        pool, _ = model_inputs(clean_subset(data.train, 0.05, cfg.seed), cfg, dev)
        scorer = DETECTORS.create(detector, pool=pool, seed=cfg.seed, **options)
        result = {"auroc": auroc(scorer(model, triggered), scorer(model, x)),
                  "samples": len(x), **options}  # fmt: skip
    elif setting == "training":
        x, y = model_inputs(splits.train, cfg, dev)
        seeded = {"seed": cfg.seed} if "seed" in taken else {}
        scorer = DETECTORS.create(detector, labels=y, **seeded, **options)
        flags = scorer.flag(scorer(model, x))  # blind: its own settings, not the attack's
        result = {**precision_recall(flags, record.poisoned), "poison_rate": record.config.rate,
                  "samples": len(x), **scorer.settings()}  # fmt: skip
    else:
        raise ConfigError(f"detector {detector!r} has setting {setting!r}; a detector works at "
                          "'inference', in 'training' or on the 'model'")  # fmt: skip
    path = run_dir / DETECTION_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[detector] = result
    atomic_write_text(path, json.dumps(saved, indent=2))
    return result
