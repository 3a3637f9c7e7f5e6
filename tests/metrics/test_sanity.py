"""The sanity checks on a robustness evaluation: accuracy that rises with eps, a model whose input
gradient is zero (masked), and a PGD too short to converge are flagged; an honest model under a
converged attack passes every check."""

from __future__ import annotations

import pytest
from torch import nn

from vptlab.attacks import create_attack
from vptlab.config import ChecksConfig
from vptlab.metrics import suite_predictions
from vptlab.metrics.sanity import gray_eps, monotone_checks, run_checks, stronger_attack
from vptlab.metrics.suite import as_threats, suite_metrics

# Small enough for seconds on a CPU; Square with few queries is weaker, never stronger.
FAST = ChecksConfig(samples=64, square_queries=100)


def checked(trained, model: nn.Module, attacks, settings: ChecksConfig = FAST, limit: int = 96):
    cfg, _, splits = trained
    preds = suite_predictions(model, splits.test, attacks, limit=limit, progress=False,
                              img_size=cfg.data.img_size)  # fmt: skip
    metrics = suite_metrics(preds, as_threats(attacks))
    result = run_checks(model, splits.test, attacks, metrics, settings=settings,
                        predictions=preds, img_size=cfg.data.img_size)  # fmt: skip
    return metrics, result


def outcomes(result: dict, check: str) -> dict[str, bool | None]:
    return {r["metrics"][0]: r["passed"] for r in result["results"] if r["check"] == check}


def test_accuracy_rising_with_eps_is_flagged() -> None:
    attacks = [create_attack("pgd", eps=e, steps=3) for e in (0.3, 0.1, 0.2)]  # any order
    targeted = create_attack("pgd", eps=0.2, steps=3, targeted=True)
    metrics = {"clean/top1": 90.0, "pgd-linf-0.1/acc": 30.0, "pgd-linf-0.2/acc": 35.0,
               "pgd-linf-0.3/acc": 32.0,
               # another family: compared with its own budgets and the clean accuracy only
               "pgd-linf-0.2-targeted/acc": 80.0}  # fmt: skip
    results = monotone_checks([*attacks, targeted], metrics, samples=250)
    passed = {r["metrics"][0]: r["passed"] for r in results}
    assert passed == {"pgd-linf-0.1": True, "pgd-linf-0.2": False, "pgd-linf-0.3": False,
                      "pgd-linf-0.2-targeted": True}  # fmt: skip
    rise = next(r for r in results if r["metrics"] == ["pgd-linf-0.3"])
    # compared with the lowest accuracy at a smaller eps, not only the next one
    assert rise["numbers"] == {"pgd-linf-0.3": 32.0, "pgd-linf-0.1": 30.0}
    assert "rises with eps" in rise["reason"] and rise["samples"] == 250
    above_clean = monotone_checks(attacks[1:2], {"clean/top1": 20.0, "pgd-linf-0.1/acc": 30.0})
    assert above_clean[0]["passed"] is False and "(clean)" in above_clean[0]["reason"]


@pytest.mark.slow
def test_honest_model_passes_every_check(trained) -> None:
    _, model, _ = trained
    # converged at these budgets on digits: the stronger re-run finds nothing more; the largest
    # leaves enough for Square to be run against it
    attacks = [create_attack("pgd", eps=e, steps=10) for e in (0.02, 0.05)]
    metrics, result = checked(trained, model, attacks)
    assert metrics["clean/top1"] > metrics["pgd-linf-0.05/acc"] > 50.0
    checks = {r["check"] for r in result["results"]}
    assert checks == {"monotone", "gray_budget", "more_steps", "square"}
    assert all(r["passed"] for r in result["results"]), result["results"]
    square = next(r for r in result["results"] if r["check"] == "square")
    assert set(square["numbers"]) == {"pgd-linf-0.05", "square:pgd-linf-0.05"}  # it ran
    assert square["metrics"] == ["pgd-linf-0.02", "pgd-linf-0.05"]  # it speaks for the family
    assert result["unreliable"] == {"pgd-linf-0.02": [], "pgd-linf-0.05": []}
    assert result["samples"] == FAST.samples and result["settings"] == FAST.model_dump()


@pytest.mark.slow
def test_masked_gradients_are_flagged(trained, gradient_masked) -> None:
    _, model, _ = trained
    masked = gradient_masked(model)
    attacks = [create_attack("pgd", eps=0.2, steps=10)]
    metrics, result = checked(trained, masked, attacks)
    # PGD sees no gradient: it leaves most samples robust, which they are not
    assert metrics["pgd-linf-0.2/acc"] > 50.0
    assert outcomes(result, "square") == {"pgd-linf-0.2": False}
    assert outcomes(result, "gray_budget") == {"pgd-linf-0.2": False}
    reasons = result["unreliable"]["pgd-linf-0.2"]
    assert any("gradient masking" in r for r in reasons)
    assert any("gray out any image" in r for r in reasons)


def test_too_few_steps_are_flagged(trained) -> None:
    _, model, _ = trained
    short = create_attack("pgd", eps=0.15, steps=1, alpha=0.001)
    _, result = checked(trained, model, [short], FAST.model_copy(update={"square_queries": 1}))
    assert outcomes(result, "more_steps") == {"pgd-linf-0.15": False}
    reasons = result["unreliable"]["pgd-linf-0.15"]
    expected = "not converged: PGD with 2 steps and 2 restarts leaves"
    assert any(r.startswith(expected) for r in reasons)
    stronger = stronger_attack(short, FAST)
    assert stronger is not None and (stronger.steps, stronger.restarts) == (2, 2)
    assert stronger.alpha == pytest.approx(2.5 * 0.15 / 2)


def test_off_runs_nothing_and_l2_gray_budget(trained) -> None:
    _, model, _ = trained
    off = ChecksConfig(enabled=False)
    metrics = {"clean/top1": 90.0, "pgd-linf-0.1/acc": 95.0}  # would fail `monotone`
    result = run_checks(model, trained[2].test, [create_attack("pgd", eps=0.1)], metrics,
                        settings=off)  # fmt: skip
    assert result["results"] == [] and result["unreliable"] == {"pgd-linf-0.1": []}
    assert gray_eps("linf", (3, 8, 8)) == 0.5
    assert gray_eps("l2", (3, 8, 8)) == pytest.approx((3 * 8 * 8 * 0.25) ** 0.5)


def test_stronger_attack_of_fgsm_is_pgd() -> None:
    stronger = stronger_attack(create_attack("fgsm", eps=0.1), ChecksConfig(steps_factor=3))
    assert stronger is not None and stronger.steps == 3 and stronger.restarts == 2
    assert stronger.random_start and stronger.eps == 0.1
    assert stronger_attack(create_attack("square", eps=0.1), ChecksConfig()) is None


def test_settings_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="samples"):
        ChecksConfig(samples=0)
    with pytest.raises(ValidationError, match="steps_factor"):
        ChecksConfig(steps_factor=1)
