"""Backdoor detectors, registered by name in `DETECTORS`: `Detector(model, x) -> scores`, one per
input, higher = more likely to carry (or to have been trained with) a trigger; a model-level
detector scores the model's classes instead.

A detector's registry entry says where it works, its `setting`:
- "inference": it scores incoming inputs; judged by the AUROC of triggered against clean test
  inputs. `strip` (Gao et al. 2019, STRIP): an input is superimposed on N clean images,
  x_i = clamp(x + c_i, 0, 1), as the authors' code does (cv2.addWeighted(background, 1,
  overlay, 1, 0): the two images added, saturated at white); a trigger survives and keeps the
  prediction on the target, so the predictions' entropy stays low, while a clean input's
  superimpositions are classified all over the place. Score = - mean_i H(softmax(f(x_i))).
  `superimpose: blend` mixes instead, x_i = alpha x + (1 - alpha) c_i.
- "training": it scores the training samples and `flag`s the suspects; judged by precision and
  recall of the flagged samples against the poisoned ones. `spectral` (Tran et al. 2018, spectral
  signatures): within each label, the penultimate features of the poisoned samples are shifted
  along one direction, which is then the top singular vector of the centered features. Score =
  squared projection on it (see `spectral_flags` for what is flagged).
- "model": one verdict on the model, from the defender's clean images; the scores are per
  class, not per input. `nc` (Wang et al. 2019, Neural Cleanse: vptlab/defenses/neural_cleanse.py)
  flags the classes whose reverse-engineered trigger is anomalously small; judged by whether the
  attack's target is flagged, and, over a study's clean and backdoored models, by the AUROC of
  its model score (the entry's `score`: the anomaly index).

Both run batched on the model's device; N overlays (STRIP) are N batched passes. The data a
detector is built with (STRIP's clean pool, the labels the samples were trained with) are given
by the detect step; its other keyword options are the user's.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.data.base import seeded_generator
from vptlab.errors import ConfigError
from vptlab.registry import Registry

Setting = Literal["inference", "training", "model"]
Superimpose = Literal["add", "blend"]
_STRIP_STREAM = 0x57219


class Detector(Protocol):
    """Scores a batch of model-ready inputs: higher = more likely to carry a backdoor trigger."""

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


DETECTORS = Registry[Detector]("detector")


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


# --- STRIP -------------------------------------------------------------------------------------


def superimpose(
    x: torch.Tensor, overlay: torch.Tensor, mode: Superimpose = "add", alpha: float = 0.5
) -> torch.Tensor:
    """STRIP's perturbed input: `add`, clamp(x + overlay, 0, 1) (the paper's code,
    cv2.addWeighted with weights 1 and 1, saturating); `blend`, alpha x + (1 - alpha) overlay."""
    if mode == "add":
        return (x + overlay).clamp(0, 1)
    if mode == "blend":
        return (alpha * x + (1 - alpha) * overlay).clamp(0, 1)
    raise ValueError(f"strip superimpose must be add or blend, got {mode!r}")


def _check_strip(overlays: int, superimpose: str, alpha: float) -> None:
    if overlays < 1:
        raise ConfigError(f"strip overlays must be >= 1, got {overlays}")
    if superimpose not in ("add", "blend"):
        raise ConfigError(f"strip superimpose must be add or blend, got {superimpose!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"strip alpha must be in (0, 1), got {alpha}")


@DETECTORS.register("strip", setting="inference")
class Strip:
    """STRIP with a pool of clean held-out images (see `strip_scores`)."""

    def __init__(self, pool: torch.Tensor, overlays: int = 20, superimpose: Superimpose = "add",
                 alpha: float = 0.5, seed: int = 0, batch_size: int = 512) -> None:  # fmt: skip
        _check_strip(overlays, superimpose, alpha)
        self.pool, self.overlays, self.alpha, self.seed = pool, overlays, alpha, seed
        self.superimpose = superimpose
        self.batch_size = batch_size

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return strip_scores(model, x, self.pool, self.overlays, self.alpha, self.seed,
                            self.batch_size, self.superimpose)  # fmt: skip


@torch.no_grad()
def strip_scores(
    model: nn.Module,
    x: torch.Tensor,
    pool: torch.Tensor,
    overlays: int = 20,
    alpha: float = 0.5,
    seed: int = 0,
    batch_size: int = 512,
    mode: Superimpose = "add",
) -> torch.Tensor:
    """Minus the mean prediction entropy of each input superimposed (`superimpose`, `mode`) on
    `overlays` random images of `pool` (clean held-out images): (N,) scores, higher for a likely
    triggered input. `alpha` weighs the input in `blend` mode only."""
    _check_strip(overlays, mode, alpha)
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
            logits = model(superimpose(chunk, other, mode, alpha)).float()
            p = F.softmax(logits, dim=1)
            entropy += -(p * p.clamp_min(1e-12).log()).sum(dim=1)
        scores.append(-(entropy / overlays).cpu())
    return torch.cat(scores)


# --- Spectral signatures -----------------------------------------------------------------------


@DETECTORS.register("spectral", setting="training")
class Spectral:
    """Spectral signatures of inputs labelled `labels` (the labels they were trained with).

    Blind to the attack (docs/defense_protocol.md): `rate` is the defender's assumed upper bound
    on the poisoned share (Tran et al. remove 1.5 x such a bound), fixed up front, never the
    attack's rate; `per_label` chooses, up front too, between flagging in every label (poison
    spread over the labels) and in the one most suspect label (see `spectral_flags`).
    """

    def __init__(self, labels: torch.Tensor, factor: float = 1.5, rate: float = 0.1,
                 per_label: bool = False, batch_size: int = 512) -> None:  # fmt: skip
        if factor <= 0 or not 0 < rate < 1:
            raise ConfigError(f"spectral needs factor > 0 and rate in (0, 1), got {factor}, {rate}")
        self.labels, self.factor, self.batch_size = labels, factor, batch_size
        self.rate, self.per_label = rate, per_label
        self.share: dict[int, float] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        scores, self.share = _spectral(penultimate_features(model, x, self.batch_size), self.labels)
        return scores

    def settings(self) -> dict[str, object]:
        """What the detect step records beside precision and recall."""
        return {"assumed_rate": self.rate, "per_label": self.per_label}

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """The samples flagged as poisoned (sorted indices): see `spectral_flags`; after a call,
        which holds the labels' variance shares."""
        return spectral_flags(scores, self.labels, self.rate, self.factor, self.per_label,
                              self.share)  # fmt: skip


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The features the classifier reads (its pooled input), batched, on the CPU: the final
    features of `forward_intermediates` through `forward_head(pre_logits=True)`."""
    if not callable(getattr(model, "forward_intermediates", None)):
        raise ConfigError(
            f"spectral signatures need a model with forward_intermediates, got {type(model)}"
        )
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in _batches(x, batch_size):
            final, _ = model.forward_intermediates(chunk.to(device), indices=1)
            f = model.forward_head(final, pre_logits=True)
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


# --- Activation clustering ---------------------------------------------------------------------

ClusterAnalysis = Literal["suspect", "smaller"]


@DETECTORS.register("ac", setting="training")
class ActivationClustering:
    """Activation clustering (Chen et al. 2019) of inputs labelled `labels` (the labels they
    were trained with).

    Per label, the penultimate features are reduced to `dims` principal components and split in
    two by 2-means (both seeded); poisoned samples, which the model classifies by the trigger
    rather than by the label's own features, fall in a cluster of their own. `analysis` decides,
    fixed up front, which clusters are flagged:
    - "smaller" (ART's default): the smaller cluster of every label;
    - "suspect" (the default): the smaller cluster of the one label whose split has the highest
      silhouette score, the label that most clearly holds two populations. All-to-one poison
      lands in a single label, as in `spectral_flags(per_label=False)`; "smaller" flags a
      cluster in every clean label too.
    A sample's score is 1 - its cluster's share of its label (0 outside the flagged labels);
    `flag` returns the samples scoring above 0.5, the flagged smaller clusters.

    PCA, not the paper's FastICA: on the BadNets SimpleNet of the tests (mnist-5k, 10% poison,
    400 poisoned of label 0's 800), 2-means on 10 principal components put 398 of the 400
    poisoned samples in one cluster and 2 in the other, on 10 FastICA components 122 and 278.
    At that share the poisoned cluster is barely the smaller one (398 against 402): relative
    size, the paper's criterion, is a coin flip once poison is half of its label.
    """

    def __init__(self, labels: torch.Tensor, dims: int = 10,
                 analysis: ClusterAnalysis = "suspect", seed: int = 0,
                 batch_size: int = 512) -> None:  # fmt: skip
        if dims < 1 or analysis not in ("suspect", "smaller"):
            raise ConfigError(f"ac needs dims >= 1 and analysis suspect or smaller, got {dims}, "
                              f"{analysis!r}")  # fmt: skip
        self.labels, self.dims, self.analysis = labels, dims, analysis
        self.seed, self.batch_size = seed, batch_size
        self.silhouettes: dict[int, float] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feats = penultimate_features(model, x, self.batch_size)
        scores, self.silhouettes = activation_clusters(feats, self.labels, self.dims, self.seed)
        if self.analysis == "suspect" and self.silhouettes:
            suspect = max(self.silhouettes, key=lambda label: self.silhouettes[label])
            scores = torch.where(self.labels.cpu() == suspect, scores, torch.zeros_like(scores))
        return scores

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """The samples in a flagged smaller cluster (sorted indices)."""
        return (scores > 0.5).nonzero().flatten()

    def settings(self) -> dict[str, object]:
        """What the detect step records beside precision and recall."""
        return {"analysis": self.analysis, "dims": self.dims, "silhouettes": self.silhouettes}


def activation_clusters(
    feats: torch.Tensor, labels: torch.Tensor, dims: int = 10, seed: int = 0
) -> tuple[torch.Tensor, dict[int, float]]:
    """Per label: PCA to `dims` components, 2-means, and each sample's score 1 - its cluster's
    share of the label. Returns the (N,) scores and each label's silhouette score."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    scores, silhouettes = torch.zeros(len(feats)), {}
    labels = labels.cpu()
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < 4:
            continue
        a = feats[members].double().numpy()
        reduced = PCA(min(dims, *a.shape), random_state=seed).fit_transform(a)
        assigned = KMeans(2, n_init=10, random_state=seed).fit_predict(reduced)
        if len(set(assigned.tolist())) < 2:
            continue
        silhouettes[label] = float(silhouette_score(reduced, assigned))
        cluster = torch.as_tensor(assigned)
        share = torch.bincount(cluster, minlength=2).double() / len(cluster)
        scores[members] = (1.0 - share[cluster]).float()
    return scores, silhouettes
