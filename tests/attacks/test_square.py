"""Square (the authors' code through pyautoattack) on the trained digits model: it beats random
noise of the same budget by far in Linf and L2, stays in the ball and in [0,1], returns the clean
image where it fails, and is seeded. Its shared contract (modes, RNG) is in test_registry.py."""

from __future__ import annotations

import pytest
import torch

from vptlab.attacks import create_attack

pytest.importorskip("pyautoattack")

N = 160  # test digits attacked: Square at 300 queries takes well under a second on them
QUERIES = 300


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def noise_like(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The strongest noise of the budget: a random corner of the Linf ball, or a random direction
    at the full L2 radius."""
    g = torch.Generator().manual_seed(0)
    if norm == "linf":
        return (x + eps * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)).clamp(0, 1)
    d = torch.randn(x.shape, generator=g)
    return (x + eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)


# Budgets where noise leaves about 98% of the digits correct and Square 30-50% (300 queries).
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.2), ("l2", 1.5)])
def test_beats_noise_of_the_same_budget(norm, eps, trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    attack = create_attack("square", eps=eps, norm=norm, n_queries=QUERIES)
    assert attack.name == f"square-{norm}-{eps:g}"
    x_adv = attack(trained, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and x_adv.dtype == torch.float32
    a_square, a_noise = accuracy(trained, x_adv, y), accuracy(trained, noise_like(x, norm, eps), y)
    assert a_square < a_noise - 40, (a_square, a_noise)


def test_failures_come_back_clean(trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    x_adv = create_attack("square", eps=0.1, n_queries=50)(trained, x, y)
    with torch.no_grad():
        fooled = trained(x_adv).argmax(1) != y
    assert fooled.any() and not fooled.all()
    assert torch.equal(x_adv[~fooled], x[~fooled])


def test_seeded_and_caller_rng_untouched(trained, digits):
    x, y = digits[2][:48], digits[3][:48]
    rng = torch.get_rng_state()
    a = create_attack("square", eps=0.2, n_queries=100, seed=1)(trained, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    b = create_attack("square", eps=0.2, n_queries=100, seed=1)(trained, x, y)
    c = create_attack("square", eps=0.2, n_queries=100, seed=2)(trained, x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_targeted_reaches_targets(trained, digits):
    x, y = digits[2][:48], digits[3][:48]
    target = (y + 1) % 10
    x_adv = create_attack("square", eps=0.3, n_queries=QUERIES, targeted=True)(trained, x, target)
    with torch.no_grad():
        before = (trained(x).argmax(1) == target).float().mean().item()
        hit = (trained(x_adv).argmax(1) == target).float().mean().item()
    assert before < 0.05 and hit > 0.3
