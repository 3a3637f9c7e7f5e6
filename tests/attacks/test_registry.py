"""Every registered attack, checked for free (timm style): a new entry in ATTACKS runs these.

The contract of `Attack`: same shape, fp32 pixels in [0,1] within the eps ball, the model's
train/eval mode (module by module) and each parameter's `requires_grad` restored and no weight
gradients left, seeded (same seed, same x_adv; the global RNG untouched), and it hurts a trained
model more than its clean accuracy.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vptlab.attacks import ATTACKS, create_attack

EPS = 0.3  # large enough that AutoAttack's first stage (APGD) settles every digit: seconds on CPU
# Options an attack needs to run quickly here; an attack not listed runs with eps alone.
FAST: dict[str, dict[str, Any]] = {"pgd": {"steps": 5}, "square": {"n_queries": 200}}
N = 48


def build(name: str, **extra: Any):
    if name in ("autoattack", "square"):
        pytest.importorskip("pyautoattack")
    return create_attack(name, eps=EPS, **(FAST.get(name, {}) | extra))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_in_budget_and_hurts(name, trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    x_adv = build(name)(trained, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = (trained(x).argmax(1) == y).float().mean()
        robust = (trained(x_adv).argmax(1) == y).float().mean()
    assert robust < clean - 0.5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ATTACKS.names())
def test_model_left_as_it_came(name, training, trained, digits):
    x, y = digits[2][:8], digits[3][:8]
    model = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(training)
    model.net[1].eval()  # a mixed-mode model: one BatchNorm held in eval (as frozen backbones are)
    frozen = model.net[0].weight
    frozen.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    try:
        build(name)(model, x, y)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert not frozen.requires_grad
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.load_state_dict(state)  # BatchNorm statistics, had a train-mode forward moved them
        frozen.requires_grad_(True)
        model.eval()


@pytest.mark.parametrize("name", ATTACKS.names())
def test_seeded(name, trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    rng = torch.get_rng_state()
    a = build(name, seed=7)(trained, x, y)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded attack draws from its own stream
    b = build(name, seed=7)(trained, x, y)
    assert torch.equal(a, b)
