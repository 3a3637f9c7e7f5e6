"""Backdoor detection: a detector scores inputs (higher = more suspicious), and the scores are
judged against what is known to be poisoned.

- `strip` (Gao et al. 2019, STRIP), at inference: an input is blended with N clean images,
  x_i = clamp(0.5 x + 0.5 c_i); a trigger survives the blend and keeps the prediction on the
  target, so the predictions' entropy stays low, while a clean input's blends are classified all
  over the place. Score = - mean_i H(softmax(f(x_i))). Judged by the AUROC of triggered vs clean
  test inputs.
- `spectral` (Tran et al. 2018, spectral signatures), on the training set: within each label,
  the penultimate features of the poisoned samples are shifted along one direction, which is then
  the top singular vector of the centered features. Score = squared projection on it. Flagged:
  the top 1.5 x rate x n_label samples of each label (Tran et al.; all-to-all poison), or for
  all-to-one poison the top 1.5 x rate x N of the one label whose top direction dominates its
  variance most (see `spectral_flags`). Judged by precision and recall of the flagged samples
  against the saved poisoned indices.

Both run batched on the model's device; N overlays (STRIP) are N batched passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.data.base import seeded_generator, split_labels
from vptlab.data.loaders import make_loader
from vptlab.errors import ConfigError
from vptlab.models.base import ImageClassifier
from vptlab.runs import atomic_write_text, folder_lock

DETECTION_FILE = "detection.json"
_STRIP_STREAM = 0x57219


class Detector(Protocol):
    """Scores a batch of model-ready inputs: higher = more likely to carry a backdoor trigger."""

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


class Strip:
    """STRIP with a pool of clean held-out images (see `strip_scores`)."""

    def __init__(self, pool: torch.Tensor, overlays: int = 20, alpha: float = 0.5,
                 seed: int = 0) -> None:  # fmt: skip
        self.pool, self.overlays, self.alpha, self.seed = pool, overlays, alpha, seed

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return strip_scores(model, x, self.pool, self.overlays, self.alpha, self.seed)


DETECTORS = ("strip", "spectral")


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


@torch.no_grad()
def strip_scores(
    model: nn.Module,
    x: torch.Tensor,
    pool: torch.Tensor,
    overlays: int = 20,
    alpha: float = 0.5,
    seed: int = 0,
    batch_size: int = 512,
) -> torch.Tensor:
    """Minus the mean prediction entropy of each input blended with `overlays` random images of
    `pool` (clean held-out images): (N,) scores, higher for a likely triggered input."""
    if overlays < 1 or not 0 < alpha < 1:
        raise ValueError(f"strip needs overlays >= 1 and alpha in (0, 1), got {overlays}, {alpha}")
    model.eval()
    device = next(model.parameters()).device
    g = seeded_generator(seed, _STRIP_STREAM)
    picks = torch.randint(len(pool), (overlays, len(x)), generator=g)
    scores = []
    for start, chunk in zip(range(0, len(x), batch_size), _batches(x, batch_size), strict=True):
        chunk = chunk.to(device)
        entropy = torch.zeros(len(chunk), device=device)
        for i in range(overlays):
            other = pool[picks[i, start : start + len(chunk)]].to(device)
            logits = model((alpha * chunk + (1 - alpha) * other).clamp(0, 1)).float()
            p = F.softmax(logits, dim=1)
            entropy += -(p * p.clamp_min(1e-12).log()).sum(dim=1)
        scores.append(-(entropy / overlays).cpu())
    return torch.cat(scores)


def features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (before the classifier) of an ImageClassifier, batched, on the CPU."""
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"spectral signatures need a vptlab ImageClassifier, got {type(model)}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in _batches(x, batch_size):
            f = model.forward_head(model.forward_features(chunk.to(device)), pre_logits=True)
            out.append(f.float().flatten(1).cpu())
    return torch.cat(out)


def spectral_scores(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per label: the squared projection of each centered feature on the top right singular
    vector of that label's centered features. (N,) scores."""
    return _spectral(feats, labels)[0]


def _spectral(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[int, float]]:
    """Scores, and per label the share of its variance along the top direction (sigma_1^2 over
    the sum of sigma_i^2): a poisoned cluster inside a label makes that direction dominate."""
    scores, share = torch.zeros(len(feats)), {}
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < 2:
            continue
        centered = (feats[members] - feats[members].mean(dim=0)).double()
        _, sv, vh = torch.linalg.svd(centered, full_matrices=False)
        scores[members] = (centered @ vh[0]).pow(2).float()
        share[label] = float(sv[0] ** 2 / (sv**2).sum().clamp_min(1e-12))
    return scores, share


def spectral_flags(
    scores: torch.Tensor,
    labels: torch.Tensor,
    rate: float,
    factor: float = 1.5,
    per_label: bool = True,
    share: dict[int, float] | None = None,
) -> torch.Tensor:
    """Indices flagged as poisoned, sorted.

    `per_label` (Tran et al.): the round(factor x rate x n) highest scores of each label, for
    poison spread over the labels (all-to-all). Otherwise the whole budget, round(factor x rate
    x N), goes to the one label whose top direction holds the largest `share` of its variance:
    all-to-one poison lands in a single label, where it is far more than `rate` of the label's
    samples (half of it at 10% poison on 10 balanced classes).
    """
    if per_label:
        flagged = []
        for label in labels.unique():
            members = (labels == label).nonzero().flatten()
            k = min(len(members), round(factor * rate * len(members)))
            if k > 0:
                flagged.append(members[scores[members].topk(k).indices])
        return torch.cat(flagged).sort().values if flagged else torch.empty(0, dtype=torch.long)
    if not share:
        raise ValueError("spectral_flags(per_label=False) needs the labels' variance shares")
    suspect = max(share, key=lambda label: share[label])
    members = (labels == suspect).nonzero().flatten()
    k = min(len(members), round(factor * rate * len(labels)))
    return members[scores[members].topk(k).indices].sort().values


class Spectral:
    """Spectral signatures of inputs labelled `labels` (the labels they were trained with)."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.share: dict[int, float] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        scores, self.share = _spectral(features(model, x), self.labels)
        return scores


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



def model_inputs(split: Any, cfg: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as the model sees it (channels repeated, resized to `data.img_size`), on
    the CPU, with its labels; detection runs on small splits (mnist-5k, CIFAR-10 train)."""
    loader = make_loader(split, cfg.data.eval_batch_size, train=False, device=device,
                         img_size=cfg.data.img_size)  # fmt: skip
    xs, ys = zip(*((b.x.cpu(), b.y.cpu()) for b in loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def detect_run(run_dir: str | Path, detector: str, device: str = "auto",
               overlays: int = 20) -> dict[str, Any]:  # fmt: skip
    """Run `detector` on a poisoned run and record the result in its `detection.json`.

    strip: AUROC of the trigger-stamped non-target test images (positives) against the same
    images clean (negatives), blended with the defender's clean images (5% of the clean train
    split). spectral: precision / recall of the flagged training samples (1.5 x the poison rate
    per label) against the poisoned indices the run saved.
    """
    from vptlab.steps.defend import parent_config

    if detector not in DETECTORS:
        raise ConfigError(f"--detector: unknown detector {detector!r}; choose from: "
                          f"{', '.join(DETECTORS)}")  # fmt: skip
    run_dir = Path(run_dir)
    parent_config(run_dir)  # a finished, poisoned run, or one clear error
    with folder_lock(run_dir, "detect"):
        return _detect(run_dir, detector, device, overlays)


def _detect(run_dir: Path, detector: str, device: str, overlays: int) -> dict[str, Any]:
    """`detect_run` with the run's folder locked."""
    from vptlab.backdoors.metrics import select_samples
    from vptlab.backdoors.poison import load_poison_record, non_target_index
    from vptlab.defenses.repair import clean_subset
    from vptlab.steps.defend import clean_data, threat_of
    from vptlab.steps.train import load_run

    cfg, model, splits = load_run(run_dir, device=device)
    dev = next(model.parameters()).device
    record = load_poison_record(run_dir)
    if detector == "strip":
        data = clean_data(cfg)
        threat = threat_of(run_dir, cfg, data)
        cfg_p = record.config
        keep = non_target_index(split_labels(data.test), cfg_p.target, cfg_p.mode)
        test = select_samples(data.test, keep)
        x, y = model_inputs(test, cfg, dev)
        triggered = threat.transform(model, x.to(dev), y.to(dev)).cpu()
        pool, _ = model_inputs(clean_subset(data.train, 0.05, cfg.seed), cfg, dev)
        strip = Strip(pool, overlays=overlays, seed=cfg.seed)
        result = {"auroc": auroc(strip(model, triggered), strip(model, x)),
                  "samples": len(x), "overlays": overlays}  # fmt: skip
    else:
        x, y = model_inputs(splits.train, cfg, dev)
        spectral = Spectral(y)
        scores = spectral(model, x)
        per_label = record.config.mode == "all2all"
        flags = spectral_flags(scores, y, record.config.rate, per_label=per_label,
                               share=spectral.share)  # fmt: skip
        result = {**precision_recall(flags, record.poisoned), "poison_rate": record.config.rate,
                  "samples": len(x), "per_label": per_label}  # fmt: skip
    path = run_dir / DETECTION_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[detector] = result
    atomic_write_text(path, json.dumps(saved, indent=2))
    return result
