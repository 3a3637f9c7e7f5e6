"""Sanity checks on a robustness evaluation, after Carlini et al. 2019 ("On Evaluating Adversarial
Robustness") and AutoAttack's flags. A robust accuracy that fails one is **unreliable**: the attack,
not the model, is the likely reason it is high. `run_checks` returns what each check compared and
the reasons each attack's number is unreliable.

- `monotone`: per attack family (attack, norm, targeted), sorted by eps and starting at the clean
  accuracy for eps 0, robust accuracy never rises. Read off the measured numbers: no attack runs.
- `gray_budget`: PGD-20 from a random start at a budget that can turn any image gray (Linf 0.5;
  L2 0.5 * sqrt(C*H*W), the L2 norm of 0.5 on every pixel) leaves <= 5% robust accuracy. Run once
  per norm evaluated; a failure marks every number of that norm (its gradients mislead PGD).
- `more_steps`: each gradient attack (pgd, fgsm) is re-run with `steps_factor` x as many steps and
  `extra_restarts` more restarts (random starts on, else restarts repeat one path) at the same eps,
  with Madry et al.'s step size for that many steps, 2.5 eps / steps, whatever the configured
  alpha: a default alpha is halved for twice the steps, and an alpha too small to cross the ball
  (or too large to settle) shows. FGSM's stronger version is PGD with `steps_factor` steps. The
  number is flagged when the stronger attack leaves more than 1 point less: it had not converged.
- `square`: gradient-free Square (Andriushchenko et al. 2020, `square_queries` queries) at the
  largest budget of each gradient attack family; flagged when it leaves more than 2 points less
  than the gradient attack: gradient masking, which marks every number of the family (masking is
  the model's gradients, not one budget's; the largest budget is where Square is strongest).

`monotone` uses every evaluated sample. The others attack the first `samples` of them (the check
sample) and compare with the configured attack's robust accuracy on the same samples, taken from
the evaluation's own per-sample predictions when given (so the number compared is the one
reported), else from a pass of the configured attack over the check sample. Robust accuracy is
the suite's (RobustBench's: correct clean and under attack). AutoAttack (APGD and Square inside)
and Square itself get `monotone` and `gray_budget` only.

Cost, on the check sample only: one PGD-20 pass per norm, one stronger PGD pass per gradient
attack and nonzero budget (each number is marked on its own, and convergence differs by budget),
and one Square pass per gradient family. Square is the dearest (a forward pass of the check sample
per query), hence once per family and 250 queries by default (AutoAttack's 5,000 is
`checks.square_queries: 5000`). A check that cannot fail (the configured attack already leaves
no more than the tolerated points) is not run. On the demo's SimpleNet (250 samples, three PGD-10
budgets, one torch thread) the checks add 3.3 s to a 4.7 s evaluation of the standard model and
14.8 s to 6.3 s for the PGD-AT one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from vptlab.attacks import ATTACKS, FGSM, PGD, Attack, create_attack
from vptlab.config import ChecksConfig
from vptlab.data.base import TensorSplit
from vptlab.data.loaders import Batch, make_loader
from vptlab.errors import ConfigError
from vptlab.metrics.accuracy import Predictions
from vptlab.metrics.suite import CLEAN, AttackThreat, first_samples, limited, suite_predictions

GRAY_STEPS = 20
MADRY_PATH = 2.5  # the stronger attack's steps add up to 2.5 eps (Madry et al.'s step size)
GRAY_PIXEL = 0.5  # every pixel in [0,1] is within 0.5 of mid-gray
GRAY_MAX_ACC = 5.0  # %: what PGD must reach at the gray budget
STEPS_TOLERANCE = 1.0  # points the stronger attack may find beyond the configured one
SQUARE_TOLERANCE = 2.0  # points Square may find beyond the gradient attack


def family(attack: Attack) -> str:
    """The attack, norm and targeting: what a robust accuracy vs eps line shares."""
    name = f"{type(attack).__name__.lower()}-{attack.norm}"
    return name + ("-targeted" if attack.targeted else "")


def metric_name(attack: Attack) -> str:
    return AttackThreat(attack).name


def gray_eps(norm: str, shape: Sequence[int]) -> float:
    """The smallest budget of `norm` that can move every image of `shape` (C,H,W) to gray."""
    if norm == "linf":
        return GRAY_PIXEL
    return GRAY_PIXEL * math.sqrt(math.prod(shape))


def stronger_attack(attack: Attack, settings: ChecksConfig) -> PGD | None:
    """The configured gradient attack with more steps and restarts (None for other attacks)."""
    if isinstance(attack, PGD):
        steps, restarts, start = attack.steps, attack.restarts, attack.random_start
    elif isinstance(attack, FGSM):
        steps, restarts, start = 1, 1, attack.random_start
    else:
        return None
    steps *= settings.steps_factor
    return PGD(
        eps=attack.eps, norm=attack.norm, alpha=MADRY_PATH * attack.eps / steps, steps=steps,
        random_start=start or settings.extra_restarts > 0,
        restarts=restarts + settings.extra_restarts, targeted=attack.targeted, amp=attack.amp,
        seed=attack.seed,
    )  # fmt: skip


def square_attack(attack: Attack, settings: ChecksConfig) -> Attack:
    """Square at the configured attack's budget (ConfigError when it cannot be built)."""
    if "square" not in ATTACKS:
        raise ConfigError("the square attack is not registered in this version of vptlab")
    return create_attack(
        "square", eps=attack.eps, norm=attack.norm, n_queries=settings.square_queries,
        targeted=attack.targeted, seed=attack.seed,
    )  # fmt: skip


def _named(attack: Attack, name: str) -> AttackThreat:
    """The attack as a threat under its own name (a check's pass may share a budget with an
    evaluated attack, and metric names must be unique)."""
    threat = AttackThreat(attack)
    threat.name = name
    return threat


def check_sample(
    model: nn.Module,
    split: TensorSplit | Dataset | Iterable[Batch],
    samples: int,
    batch_size: int,
    img_size: int | None,
) -> TensorSplit:
    """The first `samples` evaluated samples as the model sees them (3 channels, resized), on
    the model's device: a split small enough to attack several more times."""
    if isinstance(split, TensorSplit | Dataset):
        device = next(model.parameters()).device
        first = first_samples(split, samples)
        split = make_loader(first, batch_size, train=False, device=device, img_size=img_size)
    xs, ys = [], []
    for batch in limited(split, samples):
        xs.append(batch.x)
        ys.append(batch.y)
    if not xs:
        raise ValueError("no samples to check (empty split)")
    return TensorSplit(torch.cat(xs).float(), torch.cat(ys))


def head(preds: Predictions, n: int) -> Predictions:
    """The first `n` samples' predictions."""
    return Predictions(*(getattr(preds, f)[:n] for f in Predictions.__dataclass_fields__))


def robust_acc(adversarial: Predictions, clean: Predictions) -> float:
    """Robust top-1 in %: correct clean and correct under attack, as the suite counts it."""
    if not torch.equal(adversarial.y, clean.y):
        raise ValueError("clean and adversarial predictions are of different samples")
    return 100.0 * int((adversarial.correct & clean.correct).sum()) / len(clean)


def monotone_checks(
    attacks: Sequence[Attack], metrics: Mapping[str, float], samples: int | None = None
) -> list[dict[str, Any]]:
    """Check (a): per family, each robust accuracy against the lowest at a smaller eps."""
    by_family: dict[str, list[Attack]] = {}
    for attack in attacks:
        by_family.setdefault(family(attack), []).append(attack)
    results = []
    for name, members in by_family.items():
        lowest, lowest_at = metrics[f"{CLEAN}/top1"], CLEAN
        for attack in sorted(members, key=lambda a: a.eps):
            metric = metric_name(attack)
            acc = metrics[f"{metric}/acc"]
            passed = acc <= lowest
            results.append({
                "check": "monotone", "metrics": [metric],
                "compared": f"{metric} against the lowest accuracy of {name} at a smaller eps "
                            f"({lowest_at}); accuracy must not rise with eps",
                "numbers": {metric: acc, lowest_at: lowest}, "samples": samples,
                "passed": passed,
                "reason": None if passed else (
                    f"accuracy rises with eps: {acc:.2f}% at eps {attack.eps:g} is above "
                    f"{lowest:.2f}% ({lowest_at})"),
            })  # fmt: skip
            if acc < lowest:
                lowest, lowest_at = acc, metric
    return results


def run_checks(
    model: nn.Module,
    split: TensorSplit | Dataset | Iterable[Batch],
    attacks: Sequence[Attack],
    metrics: Mapping[str, float],
    *,
    settings: ChecksConfig | None = None,
    predictions: Mapping[str, Predictions] | None = None,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 256,
    img_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The four checks on an evaluation of `model` under `attacks` over `split` (the split, or
    the loader, the evaluation read in order), whose suite metrics are `metrics`.

    `predictions` are the evaluation's per-sample predictions (`suite_predictions`' output); the
    configured attacks' numbers on the check sample are read from them instead of re-attacking.
    Returns `settings`, `samples` (the check sample's size), `seconds`, `results` (one entry per
    check and number: check, metrics it concerns, what was compared, the numbers, samples,
    passed, reason) and `unreliable`: per attack metric, the reasons its number is unreliable
    (empty when every check passed).
    """
    settings = settings or ChecksConfig()
    names = {metric_name(a): a for a in attacks}
    unreliable: dict[str, list[str]] = {name: [] for name in names}
    out: dict[str, Any] = {"settings": settings.model_dump(mode="json"), "samples": 0,
                           "seconds": 0.0, "results": [], "unreliable": unreliable}  # fmt: skip
    if not settings.enabled or not attacks:
        return out
    start = time.perf_counter()
    results = monotone_checks(attacks, metrics, len(predictions[CLEAN]) if predictions else None)
    sample = check_sample(model, split, settings.samples, batch_size, img_size)
    n = len(sample)
    configured: dict[str, float] | None = None
    if predictions is not None:  # the reported numbers' own passes, cut to the check sample
        clean = head(predictions[CLEAN], n)
        configured = {name: robust_acc(head(predictions[name], n), clean) for name in names}
    plan = _Plan(names, settings, sample.x.shape[1:], configured)
    preds = suite_predictions(model, sample, plan.passes(), amp_dtype=amp_dtype,
                              progress=progress, batch_size=batch_size)  # fmt: skip
    if configured is None:
        configured = {name: robust_acc(preds[name], preds[CLEAN]) for name in plan.stronger}
    results += plan.compare(preds, configured)
    for result in results:
        if result["passed"] is False:
            for name in result["metrics"]:
                unreliable[name].append(result["reason"])
    out.update(samples=len(sample), seconds=time.perf_counter() - start, results=results)
    return out


class _Plan:
    """The attack passes of checks (b)-(d) on the check sample, and their comparisons."""

    def __init__(self, attacks: Mapping[str, Attack], settings: ChecksConfig,
                 shape: Sequence[int], configured: Mapping[str, float] | None) -> None:  # fmt: skip
        self.attacks, self.settings, self.configured = attacks, settings, configured
        self.grays = {a.norm: gray_eps(a.norm, shape) for a in attacks.values()}
        # (c) per gradient attack and nonzero budget; (d) per gradient family at its largest
        self.stronger = {name: s for name, a in attacks.items()
                         if a.eps > 0 and (s := stronger_attack(a, settings)) is not None}
        largest: dict[str, str] = {}
        for name in self.stronger:
            key = family(attacks[name])
            if key not in largest or attacks[name].eps > attacks[largest[key]].eps:
                largest[key] = name
        self.square: dict[str, Attack | str] = {}
        for name in largest.values():
            try:
                self.square[name] = square_attack(attacks[name], settings)
            except ConfigError as error:  # pyautoattack missing: the other checks still run
                self.square[name] = str(error)

    def needless(self, name: str, tolerance: float) -> bool:
        """Whether a check cannot fail: the configured attack leaves no more than `tolerance` on
        the check sample, and no attack leaves less than 0 (this spares most passes at large
        budgets of a model without robustness)."""
        return self.configured is not None and self.configured[name] <= tolerance

    def passes(self) -> list[AttackThreat]:
        out = [_named(PGD(eps=eps, norm=norm, steps=GRAY_STEPS, random_start=True), f"gray-{norm}")
               for norm, eps in self.grays.items()]  # fmt: skip
        out += [_named(s, f"stronger:{name}") for name, s in self.stronger.items()
                if not self.needless(name, STEPS_TOLERANCE)]  # fmt: skip
        out += [_named(s, f"square:{name}") for name, s in self.square.items()
                if isinstance(s, Attack) and not self.needless(name, SQUARE_TOLERANCE)]
        if self.configured is None:
            out += [_named(self.attacks[name], name) for name in self.stronger]
        return out

    def compare(
        self, preds: Mapping[str, Predictions], configured: Mapping[str, float]
    ) -> list[dict[str, Any]]:
        clean, n = preds[CLEAN], len(preds[CLEAN])
        results = []
        for norm, eps in self.grays.items():
            acc = robust_acc(preds[f"gray-{norm}"], clean)
            passed = acc <= GRAY_MAX_ACC
            results.append({
                "check": "gray_budget",
                "metrics": [name for name, a in self.attacks.items() if a.norm == norm],
                "compared": f"PGD-{GRAY_STEPS} (random start) at {norm} eps {eps:.4g}, which can "
                            f"turn any image gray, against a {GRAY_MAX_ACC:g}% ceiling",
                "numbers": {f"gray-{norm}": acc, "ceiling": GRAY_MAX_ACC}, "samples": n,
                "passed": passed,
                "reason": None if passed else (
                    f"PGD-{GRAY_STEPS} at {norm} eps {eps:.4g} (enough to gray out any image) "
                    f"leaves {acc:.2f}% > {GRAY_MAX_ACC:g}%: gradients may be masked"),
            })  # fmt: skip
        for name, stronger in self.stronger.items():
            what = (f"{name} as configured against PGD with {stronger.steps} steps of alpha "
                    f"{stronger.alpha:.4g} and {stronger.restarts} restarts")  # fmt: skip
            if f"stronger:{name}" not in preds:
                results.append(_cannot_fail("more_steps", [name], what, configured[name], n))
                continue
            acc = robust_acc(preds[f"stronger:{name}"], clean)
            passed = acc >= configured[name] - STEPS_TOLERANCE
            results.append({
                "check": "more_steps", "metrics": [name], "compared": what,
                "numbers": {name: configured[name], f"stronger:{name}": acc}, "samples": n,
                "passed": passed,
                "reason": None if passed else (
                    f"not converged: PGD with {stronger.steps} steps and {stronger.restarts} "
                    f"restarts leaves {acc:.2f}%, {configured[name] - acc:.2f} points below "
                    f"{configured[name]:.2f}% on the first {n} samples"),
            })  # fmt: skip
        for name, square in self.square.items():
            key, eps = family(self.attacks[name]), self.attacks[name].eps
            marked = [m for m in self.stronger if family(self.attacks[m]) == key]
            what = (f"{name} (the largest budget of {key}) against gradient-free Square "
                    f"({self.settings.square_queries} queries) at the same budget")  # fmt: skip
            if not isinstance(square, Attack):  # pyautoattack missing
                results.append({"check": "square", "metrics": marked, "compared": what,
                                "numbers": {}, "samples": n, "passed": None, "reason": None,
                                "skipped": square})  # fmt: skip
                continue
            if f"square:{name}" not in preds:
                results.append(_cannot_fail("square", marked, what, configured[name], n, name))
                continue
            acc = robust_acc(preds[f"square:{name}"], clean)
            passed = acc >= configured[name] - SQUARE_TOLERANCE
            results.append({
                "check": "square", "metrics": marked, "compared": what,
                "numbers": {name: configured[name], f"square:{name}": acc}, "samples": n,
                "passed": passed,
                "reason": None if passed else (
                    f"gradient masking: at eps {eps:g} Square leaves {acc:.2f}%, "
                    f"{configured[name] - acc:.2f} points below {name}'s {configured[name]:.2f}% "
                    f"on the first {n} samples"),
            })  # fmt: skip
        return results


def _cannot_fail(
    check: str, metrics: list[str], what: str, configured: float, n: int, name: str | None = None
) -> dict[str, Any]:
    """A check not run because it cannot fail: the configured attack already leaves so little
    that no attack could leave the tolerated points less."""
    name = name or metrics[0]
    return {"check": check, "metrics": metrics,
            "compared": f"{what}; not run: {name} leaves {configured:.2f}% of the first {n} "
                        "samples, nothing for a stronger attack to find",
            "numbers": {name: configured}, "samples": n, "passed": True, "reason": None}
