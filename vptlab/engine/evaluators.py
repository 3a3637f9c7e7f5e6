"""What `fit` measures after an epoch: a list of evaluators, each a model -> named numbers.

The default is clean top-1/top-5 on the test split. Robust accuracy and backdoor metrics plug in
as further evaluators built on `predict`, so they share its single pass and its sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from vptlab.attacks import Attack
from vptlab.config import ExperimentConfig
from vptlab.data.base import TensorSplit
from vptlab.data.loaders import StreamLoader, TensorLoader, make_loader
from vptlab.engine.distributed import DistInfo, all_gather_rows
from vptlab.metrics.accuracy import InputTransform, Predictions, predict
from vptlab.metrics.suite import CLEAN, Threat, as_threats, first_samples, suite_metrics
from vptlab.models.clip import DEFAULT_TEMPLATES, clip_net


@dataclass(frozen=True)
class EvalContext:
    """Where and how evaluation runs: the run's config, its device, autocast dtype and rank."""

    cfg: ExperimentConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: DistInfo


def eval_loader(split: Dataset, ctx: EvalContext) -> TensorLoader | StreamLoader:
    """An evaluation loader over `split` with the run's batch size, device and rank shard."""
    data = ctx.cfg.data
    return make_loader(
        split, data.eval_batch_size, train=False, device=ctx.device, seed=ctx.cfg.seed,
        num_workers=data.num_workers, img_size=data.img_size, rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
    )  # fmt: skip


class Evaluator(Protocol):
    """Returns flat named metrics (`test_top1`, `badnets/asr` ...) that go into the history."""

    def __call__(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]: ...


def gather_predictions(preds: Predictions, info: DistInfo) -> Predictions:
    """Every rank's shard of predictions, on every rank (ranks evaluate disjoint shards)."""
    if info.world_size == 1:
        return preds
    fields = Predictions.__dataclass_fields__
    return Predictions(*(all_gather_rows(getattr(preds, f), info) for f in fields))


class SplitPredictions:
    """Predictions of a model on one split, sharded over ranks and gathered back."""

    def __init__(self, split: TensorSplit | Dataset, transform: InputTransform | None = None):
        self.split = split
        self.transform = transform
        self._loader: TensorLoader | StreamLoader | None = None

    def __call__(self, model: nn.Module, ctx: EvalContext) -> Predictions:
        if self._loader is None:  # built once: a TensorLoader copies its split to the device
            self._loader = eval_loader(self.split, ctx)
        preds = predict(model, self._loader, ctx.amp_dtype, self.transform)
        return gather_predictions(preds, ctx.dist)


class TestAccuracy:
    """Clean loss, top-1 and top-5 on a split, as `{prefix}_loss`, `{prefix}_top1`, ..."""

    def __init__(self, split: TensorSplit | Dataset, prefix: str = "test") -> None:
        self.predictions = SplitPredictions(split)
        self.prefix = prefix

    def __call__(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        summary = self.predictions(model, ctx).summary()
        return {f"{self.prefix}_{k}": summary[k] for k in ("loss", "top1", "top5")}


class ZeroShotAccuracy(TestAccuracy):
    """Zero-shot top-1/top-5 of an image-text model, reported as `test_top1` ... like any run's.

    First rebuilds the model's zero-shot head from its text tower as it is now (class names
    through the `templates` ensemble; see models/clip.py), then scores the split through it. The
    head is saved with the model at the checkpoint that follows, so attacks, triggers and
    `evaluate_suite` on the run's model see the classifier measured here.
    """

    def __init__(
        self,
        split: TensorSplit | Dataset,
        classes: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        prefix: str = "test",
    ) -> None:
        super().__init__(split, prefix)
        self.classes = list(classes)
        self.templates = list(templates) or list(DEFAULT_TEMPLATES)

    def __call__(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        clip_net(model).set_zero_shot_head(self.classes, self.templates)
        return super().__call__(model, ctx)


class RobustAccuracy:
    """The evaluation suite on a split, per epoch: each attack's (or threat's) metrics
    (`pgd-linf-0.3/acc`, ...), and with `clean=True` also `clean/top1` ... (TestAccuracy already
    reports those by default). `limit` keeps the first samples of the split: attacks are costly."""

    def __init__(
        self,
        split: TensorSplit | Dataset,
        attacks: Sequence[Attack | Threat],
        limit: int | None = None,
        clean: bool = False,
    ) -> None:
        self.threats = as_threats(attacks)
        split = first_samples(split, limit)
        self.clean = clean
        self.clean_predictions = SplitPredictions(split)
        self.predictions = [SplitPredictions(split, t.transform) for t in self.threats]

    def __call__(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        preds = {CLEAN: self.clean_predictions(model, ctx)}
        for threat, predictions in zip(self.threats, self.predictions, strict=True):
            preds[threat.name] = predictions(model, ctx)
        metrics = suite_metrics(preds, self.threats)
        if not self.clean:
            metrics = {k: v for k, v in metrics.items() if not k.startswith(f"{CLEAN}/")}
        return metrics
