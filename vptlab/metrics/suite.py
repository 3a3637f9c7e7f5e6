"""One evaluation suite: clean top-1/top-5 and, per threat, the metrics of one `predict` pass with
the threat's transform, as one flat dict (`clean/top1`, `pgd-linf-0.3/acc` ...).

A threat is anything with a `name`, a `transform(model, x, y) -> x'` and a
`metrics(preds, clean) -> dict` over per-sample `Predictions`: attacks are wrapped by
`AttackThreat`; backdoor triggers add CA / ASR / RA the same way, from the same predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from rich.progress import Progress
from torch import nn
from torch.utils.data import Dataset, Subset

from vptlab.attacks import Attack
from vptlab.data.base import TensorSplit
from vptlab.data.loaders import Batch, make_loader
from vptlab.metrics.accuracy import Predictions, predict
from vptlab.progress import PlainProgress, new_progress

CLEAN = "clean"


@runtime_checkable
class Threat(Protocol):
    """What the suite evaluates besides clean accuracy: its metrics are named `{name}/{key}`."""

    name: str

    def transform(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def metrics(self, preds: Predictions, clean: Predictions) -> dict[str, float]: ...


class AttackThreat:
    """An evasion attack as a threat: robust top-1 (`acc`), top-5 and loss on its adversarial
    inputs, scored against the true labels.

    Robust accuracy is RobustBench's and AutoAttack's: a sample counts only if it is classified
    correctly both clean and under attack (an attack that lands a misclassified sample on its true
    class does not make it robust), so `acc` never exceeds clean top-1; `top5` likewise needs the
    clean top-5 hit. `loss` is the adversarial loss of every sample.

    A targeted attack aims every sample at the next class, (y + 1) mod classes, and also reports
    how often it hit it (`target_hit`); its name gets a `-targeted` suffix.
    """

    def __init__(self, attack: Attack) -> None:
        self.attack = attack
        self.name = attack.name + ("-targeted" if attack.targeted else "")
        self.num_classes: int | None = None

    def target(self, y: torch.Tensor) -> torch.Tensor:
        assert self.num_classes is not None
        return (y + 1) % self.num_classes

    def transform(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.attack.targeted:
            return self.attack(model, x, y)
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(model(x[:1]).shape[1])
        return self.attack(model, x, self.target(y))

    def metrics(self, preds: Predictions, clean: Predictions) -> dict[str, float]:
        if not torch.equal(preds.index, clean.index):
            raise ValueError(f"{self.name}: clean and adversarial passes saw different samples")
        n = len(preds)
        robust = (preds.correct & clean.correct).sum()
        robust5 = (preds.top5 & clean.top5).sum()
        out = {"acc": 100.0 * int(robust) / n, "top5": 100.0 * int(robust5) / n,
               "loss": float(preds.loss.sum()) / n}  # fmt: skip
        if self.attack.targeted and self.num_classes is not None:
            out["target_hit"] = 100.0 * float((preds.pred == self.target(preds.y)).double().mean())
        return out


def as_threat(item: Attack | Threat) -> Threat:
    return AttackThreat(item) if isinstance(item, Attack) else item


def as_threats(items: Sequence[Attack | Threat]) -> list[Threat]:
    """Attacks wrapped as threats; two threats may not share a metric name."""
    threats = [as_threat(item) for item in items]
    names = [t.name for t in threats]
    for name in names:
        if name == CLEAN or names.count(name) > 1:
            raise ValueError(
                f"two evaluations would both be named {name!r}: give the attacks different "
                "budgets (the name is attack-norm-eps)"
            )
    return threats


def clean_metrics(clean: Predictions) -> dict[str, float]:
    summary = clean.summary()
    return {f"{CLEAN}/{k}": summary[k] for k in ("top1", "top5", "loss")}


def suite_metrics(preds: dict[str, Predictions], threats: Sequence[Threat]) -> dict[str, float]:
    """The flat metrics of `suite_predictions`' output: clean first, then each threat's."""
    clean = preds[CLEAN]
    out = clean_metrics(clean)
    for threat in threats:
        metrics = threat.metrics(preds[threat.name], clean)
        out |= {f"{threat.name}/{k}": v for k, v in metrics.items()}
    return out


def first_samples(split: TensorSplit | Dataset, limit: int | None) -> TensorSplit | Dataset:
    """The first `limit` samples of a split (all of it when None or larger)."""
    if limit is None or limit >= len(split):  # type: ignore[arg-type]
        return split
    if isinstance(split, TensorSplit):
        return TensorSplit(split.x[:limit], split.y[:limit])
    return Subset(split, range(limit))


def limited(loader: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    """The loader's batches up to its first `limit` samples, the last batch cut to size."""
    seen = 0
    for batch in loader:
        if limit is not None and seen + len(batch.y) > limit:
            keep = limit - seen
            if keep > 0:
                yield Batch(batch.x[:keep], batch.y[:keep], batch.index[:keep])
            return
        seen += len(batch.y)
        yield batch


def _batch_count(loader: Iterable[Batch], limit: int | None) -> int | None:
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    batch_size = getattr(loader, "batch_size", None)
    if limit is not None and batch_size:
        bounded = math.ceil(limit / batch_size)
        total = bounded if total is None else min(total, bounded)
    return total


class _Bar:
    """A rich bar over every batch of every pass, labelled with the pass being run.

    """

    def __init__(self, progress: Progress | PlainProgress | None, total: int | None) -> None:
        self.progress = progress
        self.task = progress.add_task("evaluating", total=total) if progress else None

    def begin(self, name: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=f"evaluating {name}")

    def step(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)


@contextmanager
def _bar(passes: int, batches: int | None, enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    with new_progress() as progress:
        yield _Bar(progress, None if batches is None else passes * batches)


def _counted(loader: Iterable[Batch], step: Callable[[], None]) -> Iterator[Batch]:
    for batch in loader:
        yield batch
        step()


def suite_predictions(
    model: nn.Module,
    loader_or_split: Iterable[Batch] | TensorSplit | Dataset,
    threats: Sequence[Attack | Threat],
    *,
    amp_dtype: torch.dtype | None = None,
    limit: int | None = None,
    progress: bool = True,
    batch_size: int = 256,
    img_size: int | None = None,
) -> dict[str, Predictions]:
    """Per-sample predictions, clean (`"clean"`) and under each threat (by its name): one
    `predict` pass each over the first `limit` samples in loader order.

    A split (TensorSplit or Dataset) is read in order on the model's device in batches of
    `batch_size`, resized to `img_size` if given (as the run's `data.img_size`);
    a loader is used as it is and must give the same order on every pass.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    wrapped = as_threats(threats)
    if isinstance(loader_or_split, TensorSplit | Dataset):
        device = next(model.parameters()).device
        split = first_samples(loader_or_split, limit)
        loader: Iterable[Batch] = make_loader(
            split, batch_size, train=False, device=device, img_size=img_size
        )
    else:
        loader = loader_or_split
    passes: list[tuple[str, Callable | None]] = [(CLEAN, None)]
    passes += [(t.name, t.transform) for t in wrapped]
    preds: dict[str, Predictions] = {}
    with _bar(len(passes), _batch_count(loader, limit), progress) as bar:
        for name, transform in passes:
            bar.begin(name)
            batches = _counted(limited(loader, limit), bar.step)
            preds[name] = predict(model, batches, amp_dtype, transform)
    return preds


def evaluate_suite(
    model: nn.Module,
    loader_or_split: Iterable[Batch] | TensorSplit | Dataset,
    attacks: Sequence[Attack | Threat],
    *,
    amp_dtype: torch.dtype | None = None,
    limit: int | None = None,
    progress: bool = True,
    batch_size: int = 256,
    img_size: int | None = None,
) -> dict[str, float]:
    """Clean `clean/top1`, `clean/top5`, `clean/loss` and, per attack (or threat), its metrics:
    `pgd-linf-0.3/acc` (robust top-1 in %), `.../top5`, `.../loss`. See `suite_predictions`."""
    threats = as_threats(attacks)
    preds = suite_predictions(
        model, loader_or_split, threats, amp_dtype=amp_dtype, limit=limit, progress=progress,
        batch_size=batch_size, img_size=img_size,
    )  # fmt: skip
    return suite_metrics(preds, threats)
