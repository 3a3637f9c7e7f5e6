"""FGSM and PGD on a trained digits model: ordering of strengths, targeted PGD, restarts, our PGD
beside torchattacks', adapted (prompted) ViTs, and one-line errors for budgets that cannot be meant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vptlab.attacks import PGD, create_attack
from vptlab.config import PromptConfig
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.prompts import adapt

N = 160  # test digits attacked: enough for ordering by several points, cheap on a shared CPU


@torch.no_grad()
def loss_and_acc(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).float().mean().item()


def test_pgd_beats_fgsm_beats_noise(trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    eps = 0.1
    # The strongest noise of the budget: a random corner of the Linf ball.
    noise = (x + eps * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0))
             .mul(2).sub(1)).clamp(0, 1)
    fgsm = create_attack("fgsm", eps=eps)(trained, x, y)
    pgd = create_attack("pgd", eps=eps, steps=10)(trained, x, y)
    (l_noise, a_noise), (l_fgsm, a_fgsm), (l_pgd, a_pgd) = (
        loss_and_acc(trained, xa, y) for xa in (noise, fgsm, pgd)
    )
    assert l_pgd > l_fgsm > l_noise
    assert a_pgd <= a_fgsm < a_noise - 20  # noise barely hurts; gradients do


def test_targeted_pgd_reaches_target(trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    target = (y + 1) % 10
    x_adv = create_attack("pgd", eps=0.3, steps=20, targeted=True)(trained, x, target)
    with torch.no_grad():
        hit = (trained(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.8


def test_restarts_never_worse_per_sample(trained, digits):
    x, y = digits[2][:N], digits[3][:N]
    one = PGD(eps=0.08, steps=5, seed=3)(trained, x, y)
    best = PGD(eps=0.08, steps=5, seed=3, restarts=3)(trained, x, y)
    with torch.no_grad():
        l_one, l_best = (F.cross_entropy(trained(xa), y, reduction="none") for xa in (one, best))
        w_one, w_best = ((trained(xa).argmax(1) != y) for xa in (one, best))
    assert (w_best >= w_one).all()  # a sample fooled once stays fooled
    same = w_best == w_one
    assert (l_best[same] >= l_one[same] - 1e-6).all()
    assert w_best.sum() + (l_best > l_one + 1e-6).sum() > w_one.sum()  # restarts found something


def test_same_as_torchattacks_pgd(trained, digits):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits[2], digits[3]
    eps, alpha, steps = 0.1, 0.025, 10
    ours = create_attack("pgd", eps=eps, alpha=alpha, steps=steps)(trained, x, y)
    torch.manual_seed(0)
    theirs = torchattacks.PGD(trained, eps, alpha, steps, random_start=True)(x, y)
    _, a_ours = loss_and_acc(trained, ours, y)
    _, a_theirs = loss_and_acc(trained, theirs, y)
    assert abs(a_ours - a_theirs) <= 1.0, (a_ours, a_theirs)


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_prompted_vit(name):
    torch.manual_seed(0)
    model = adapt(create_model("vit-tiny-test", num_classes=10, img_size=32), "prompt",
                  PromptConfig(num_prompts=4))
    model.train()  # frozen backbone in eval, prompts and head in train: modes must come back so
    modes = [m.training for m in model.modules()]
    assert not all(modes) and any(modes)
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    x_adv = create_attack(name, eps=0.03, steps=2)(model, x, y) if name == "pgd" else \
        create_attack(name, eps=0.03)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.03 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "options", "says"),
    [
        ("cw", {"eps": 0.1}, "unknown attack 'cw'"),
        ("pgd", {"eps": -0.1}, "eps must be >= 0"),
        ("pgd", {"eps": 0.1, "steps": 0}, "steps must be >= 1"),
        ("pgd", {"eps": 8.0}, "0-255 units"),
        ("fgsm", {"eps": 8.0}, "0-255 units"),
        ("pgd", {"eps": 0.1, "alpha": 0.0}, "alpha must be > 0"),
        ("pgd", {"eps": 0.1, "restarts": 0}, "restarts must be >= 1"),
        ("pgd", {"eps": 0.1, "norm": "l1"}, "norm must be one of"),
        ("fgsm", {"eps": 0.1, "norm": "l2"}, "fgsm is an Linf attack"),
        ("pgd", {"eps": 0.1, "stepz": 3}, "attack.stepz: unknown option"),
        ("pgd", {"eps": 0.1, "steps": "many"}, "attack.steps"),
        ("autoattack", {"eps": 0.1, "version": "fast"}, "version must be one of"),
        ("autoattack", {"eps": 2.0}, "0-255 units"),
    ],
)
def test_bad_options_are_one_line_config_errors(name, options, says):
    with pytest.raises(ConfigError) as err:
        create_attack(name, **options)
    assert says in str(err.value) and "\n" not in str(err.value)
