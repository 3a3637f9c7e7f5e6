"""The evaluation suite: clean numbers as `evaluate` gives them, robust accuracy per attack that
falls with the budget, a deterministic sample limit, and the per-epoch evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vptlab.attacks import Attack, create_attack
from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.data.loaders import make_loader
from vptlab.engine.distributed import DistInfo
from vptlab.engine.evaluators import EvalContext, RobustAccuracy
from vptlab.metrics import evaluate, evaluate_suite, suite_predictions
from vptlab.metrics.accuracy import Predictions
from vptlab.steps.resolve import resolved


def loader_of(cfg: ExperimentConfig, splits: DataSplits, batch_size: int = 64):
    return make_loader(
        splits.test, batch_size, train=False, device="cpu", img_size=cfg.data.img_size
    )


def test_clean_numbers_equal_evaluate(trained) -> None:
    cfg, model, splits = trained
    loader = loader_of(cfg, splits)
    clean = evaluate(model, loader)
    suite = evaluate_suite(model, loader, [], progress=False)
    assert suite == {"clean/top1": clean["top1"], "clean/top5": clean["top5"],
                     "clean/loss": pytest.approx(clean["loss"])}  # fmt: skip
    assert suite["clean/top1"] > 50.0


@pytest.mark.parametrize("name", ["pgd", "fgsm"])
def test_eps_zero_is_clean_accuracy(trained, name: str) -> None:
    cfg, model, splits = trained
    attack = create_attack(name, eps=0.0, **({"steps": 3} if name == "pgd" else {}))
    suite = evaluate_suite(model, loader_of(cfg, splits), [attack], limit=128, progress=False)
    assert suite[f"{name}-linf-0/acc"] == suite["clean/top1"]
    assert suite[f"{name}-linf-0/top5"] == suite["clean/top5"]


def test_robust_accuracy_falls_with_eps(trained) -> None:
    cfg, model, splits = trained
    attacks = [create_attack("pgd", eps=eps, steps=5) for eps in (0.02, 0.05, 0.1, 0.3)]
    # 128 samples, 5 steps: enough for a clear trend on digits, seconds on a CPU
    suite = evaluate_suite(model, loader_of(cfg, splits), attacks, limit=128, progress=False)
    accs = [suite[f"{a.name}/acc"] for a in attacks]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] <= suite["clean/top1"] and accs[-1] < 10.0 < suite["clean/top1"]


def test_limit_takes_the_first_samples_in_order(trained) -> None:
    cfg, model, splits = trained
    attack = create_attack("fgsm", eps=0.1)
    # A loader whose batches do not divide the limit: the last batch is cut.
    preds = suite_predictions(model, loader_of(cfg, splits, 32), [attack], limit=50,
                              progress=False)  # fmt: skip
    for p in preds.values():
        assert torch.equal(p.index, torch.arange(50))
    # The split path gives the same numbers as the loader path.
    from_loader = evaluate_suite(model, loader_of(cfg, splits, 32), [attack], limit=50,
                                 progress=False)  # fmt: skip
    from_split = evaluate_suite(model, splits.test, [attack], limit=50, progress=True,
                                batch_size=16, img_size=cfg.data.img_size)  # fmt: skip
    assert from_split == pytest.approx(from_loader)
    full = evaluate(model, make_loader(
        type(splits.test)(splits.test.x[:50], splits.test.y[:50]), 64, train=False,
        img_size=cfg.data.img_size,
    ))  # fmt: skip
    assert from_loader["clean/top1"] == full["top1"]
    with pytest.raises(ValueError, match="limit"):
        evaluate_suite(model, splits.test, [attack], limit=0, progress=False)


class FlipToZero:
    """A stand-in trigger threat: the metrics protocol sees both prediction sets."""

    name = "blank"

    def transform(self, model, x, y):
        return torch.zeros_like(x)

    def metrics(self, preds: Predictions, clean: Predictions) -> dict[str, float]:
        return {"asr": 100.0 * float((preds.pred == 0)[clean.y != 0].double().mean())}


def test_threats_and_duplicate_names(trained) -> None:
    cfg, model, splits = trained
    suite = evaluate_suite(model, loader_of(cfg, splits), [FlipToZero()], limit=64,
                           progress=False)  # fmt: skip
    assert set(suite) == {"clean/top1", "clean/top5", "clean/loss", "blank/asr"}
    twice = [create_attack("pgd", eps=0.1, steps=2), create_attack("pgd", eps=0.1, steps=3)]
    with pytest.raises(ValueError, match="pgd-linf-0.1"):
        evaluate_suite(model, loader_of(cfg, splits), twice, progress=False)


def test_targeted_attack_reports_target_hits(trained) -> None:
    cfg, model, splits = trained
    attack = create_attack("pgd", eps=0.3, steps=5, targeted=True)
    suite = evaluate_suite(model, loader_of(cfg, splits), [attack], limit=64, progress=False)
    assert suite["pgd-linf-0.3-targeted/target_hit"] > 50.0


def test_robust_accuracy_evaluator_matches_the_suite(trained) -> None:
    cfg, model, splits = trained
    attacks = [create_attack("fgsm", eps=0.1)]
    ctx = EvalContext(cfg, torch.device("cpu"), None, DistInfo(rank=0, world_size=1,
                                                                local_rank=0))  # fmt: skip
    metrics = RobustAccuracy(splits.test, attacks, limit=40)(model, ctx)
    expected = evaluate_suite(model, loader_of(cfg, splits), attacks, limit=40, progress=False)
    assert metrics == {k: v for k, v in expected.items() if not k.startswith("clean/")}
    assert "clean/top1" in RobustAccuracy(splits.test, attacks, limit=40, clean=True)(model, ctx)


def test_fit_reports_robust_accuracy_per_epoch(tmp_path: Path) -> None:
    from vptlab.engine.evaluators import TestAccuracy
    from vptlab.engine.loop import fit
    from vptlab.steps.build import build_experiment

    cfg = resolved({
        "name": "r", "device": "cpu",
        "data": {"name": "digits", "num_workers": 0},
        "model": {"name": "simplenet"}, "train": {"epochs": 1},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    })  # fmt: skip
    data, model = build_experiment(cfg)
    fgsm = create_attack("fgsm", eps=0.1)
    evaluators = [TestAccuracy(data.test), RobustAccuracy(data.test, [fgsm], limit=32)]
    metrics = fit(model, data, cfg, tmp_path / "r", evaluators=evaluators)
    assert "fgsm-linf-0.1/acc" in metrics["history"][-1]


class _FirstPixelClassifier(nn.Module):
    """Class 1 when the first pixel is above 0.5, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))  # the suite finds the device by it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = (x[:, 0, 0, 0] > 0.5).float()
        return torch.stack([1 - on, on], dim=1) * self.scale


class _LightFirstPixel(Attack):
    """An 'attack' that lights the first pixel: it turns a class-0 error into a hit on class 1."""

    eps = 1.0

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, 0, 0] = 1.0
        return x


def test_robust_needs_correct_clean_and_under_attack() -> None:
    """RobustBench's definition: a sample misclassified clean is never robust, even when the
    perturbation lands it on its true class. Half the samples are label 1 with a dark first pixel
    (wrong clean, right after the 'attack'), half label 1 with a lit one (right both times)."""
    x = torch.zeros(8, 3, 4, 4)
    x[4:, :, 0, 0] = 1.0
    y = torch.ones(8, dtype=torch.long)
    from vptlab.data.base import TensorSplit

    suite = evaluate_suite(_FirstPixelClassifier(), TensorSplit(x, y), [_LightFirstPixel()],
                           progress=False)  # fmt: skip
    assert suite["clean/top1"] == 50.0
    # not 100: the four clean errors stay errors
    assert suite["_lightfirstpixel-linf-1/acc"] == 50.0
    assert suite["_lightfirstpixel-linf-1/acc"] <= suite["clean/top1"]
