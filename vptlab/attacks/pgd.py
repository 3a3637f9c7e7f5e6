"""FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018) in the Linf and L2 norms.

FGSM:  x' = clip(x + eps * sign(grad_x L(f(x), y)))
       with a random start (FGSM-RS): d_0 = clip(x + U(-eps, eps)) - x,
       x' = clip(x + proj_eps(d_0 + alpha * sign(grad_x L(f(x + d_0), y))))
PGD:   x_0 = x + uniform noise in the eps ball;  x_{t+1} = clip(proj_eps(x_t + alpha * s(g_t)))
       with s = sign for Linf and g / ||g||_2 for L2; restarts keep each sample's worst case.
"""

from __future__ import annotations

import torch
from torch import nn

from vptlab.attacks.base import (
    ATTACKS,
    NORMS,
    Attack,
    per_sample_norm,
    project,
    random_start,
)
from vptlab.errors import ConfigError


def check_budget(norm: str, eps: float, alpha: float | None = None, steps: int = 1) -> None:
    """One-line errors for budgets that cannot be meant: negative, or Linf eps in 0-255 units."""
    if norm not in NORMS:
        raise ConfigError(f"attack norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if eps < 0:
        raise ConfigError(f"attack eps must be >= 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise ConfigError(
            f"attack eps {eps} is above 1: pixels are in [0,1], so 8/255 is written 0.0314 "
            "(eps looks like it was given in 0-255 units)"
        )
    if alpha is not None and alpha <= 0:
        raise ConfigError(f"attack alpha must be > 0, got {alpha}")
    if steps < 1:
        raise ConfigError(f"attack steps must be >= 1, got {steps}")


@ATTACKS.register("fgsm", gradient=True, trains=True)
class FGSM(Attack):
    """One signed-gradient step of size eps (Linf). With `random_start`, the step starts from
    uniform noise in the ball, clipped so that x + delta is an image, and is then projected:
    FGSM-RS as in Wong et al.'s code (`delta = clamp(delta, lower_limit - X, upper_limit - X)`
    before the step). Without that clip, a pixel at 0 with a positive gradient starts below 0 and
    ends short of eps whenever its draw was below -0.25 eps (alpha = 1.25 eps)."""

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        alpha: float | None = None,
        random_start: bool = False,
        targeted: bool = False,
        amp: bool = False,
        seed: int | None = 0,
    ) -> None:
        if norm != "linf":
            raise ConfigError(f"fgsm is an Linf attack; use pgd for norm {norm!r}")
        check_budget(norm, eps, alpha)
        self.norm, self.eps, self.targeted, self.amp, self.seed = norm, eps, targeted, amp, seed
        self.alpha = eps if alpha is None else alpha
        self.random_start = random_start

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(x)
        if self.random_start:
            delta = random_start(x, "linf", self.eps, self.generator(x.device))
            delta = (x + delta).clamp(0, 1) - x
        grad, _ = self.input_gradient(model, x + delta, y)
        delta = project(delta + self.alpha * grad.sign(), "linf", self.eps)
        return (x + delta).clamp(0, 1)


@ATTACKS.register("pgd", gradient=True, trains=True)
class PGD(Attack):
    """Projected gradient ascent on the loss, `steps` steps of size `alpha` (default 2.5 eps /
    steps, Madry et al.), from a random start; `restarts` runs keep each sample's worst case."""

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        amp: bool = False,
        seed: int | None = 0,
    ) -> None:
        check_budget(norm, eps, alpha, steps)
        if restarts < 1:
            raise ConfigError(f"attack restarts must be >= 1, got {restarts}")
        self.norm, self.eps, self.targeted, self.amp, self.seed = norm, eps, targeted, amp, seed
        self.alpha = 2.5 * eps / steps if alpha is None else alpha
        self.steps, self.random_start, self.restarts = steps, random_start, restarts

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator = self.generator(x.device)
        best, best_score = x, None
        for _ in range(self.restarts):
            delta = torch.zeros_like(x)
            if self.random_start:
                delta = random_start(x, self.norm, self.eps, generator)
            delta = (x + delta).clamp(0, 1) - x
            for _ in range(self.steps):
                grad, _ = self.input_gradient(model, x + delta, y)
                step = grad.sign() if self.norm == "linf" else grad / per_sample_norm(grad)
                delta = project(delta + self.alpha * step, self.norm, self.eps)
                delta = (x + delta).clamp(0, 1) - x
            x_adv = x + delta
            if self.restarts == 1:
                return x_adv
            score = self._score(model, x_adv, y)
            if best_score is None:
                best, best_score = x_adv, score
            else:
                better = score > best_score
                best = torch.where(better.view(-1, *([1] * (x.ndim - 1))), x_adv, best)
                best_score = torch.maximum(score, best_score)
        return best

    @torch.no_grad()
    def _score(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Worse for the model ranks higher: success first (misclassified, or the target hit),
        then the loss; a success keeps its place against any failure."""
        logits = self.logits(model, x_adv)
        pred = logits.argmax(1)
        success = (pred == y) if self.targeted else (pred != y)
        return success.double() * 1e6 + self.loss_of(logits, y).double().clamp(-1e5, 1e5)
