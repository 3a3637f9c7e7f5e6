"""AutoAttack is the authors' code (pyautoattack): their versions with their iterations, targets
and queries; adversarial images for the whole batch (the clean image where the ensemble fails or
the model errs already) in the ball and in [0,1]; their checks' warnings kept in `flags`; and no
weaker than torchattacks' AutoAttack, the independent reference, at the same budget.

pyautoattack is an optional extra: importing vptlab never needs it, and its absence is one clear
error. The shared contract (budget, modes, seeding, the caller's RNG) is in test_registry.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from vptlab.attacks import AutoAttack, create_attack
from vptlab.errors import ConfigError
from vptlab.models import build_classifier


@pytest.mark.parametrize("name", ["autoattack", "square"])
def test_without_pyautoattack_is_one_config_error(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import pyautoattack -> ImportError
    with pytest.raises(ConfigError, match=r"pyautoattack package.*vptlab\[attacks\]") as err:
        create_attack(name, eps=0.1)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_vptlab_imports_without_pyautoattack():
    code = (
        "import sys; sys.modules['pyautoattack'] = None; sys.modules['torchattacks'] = None\n"
        "import vptlab, vptlab.attacks, vptlab.cli, vptlab.steps.attack\n"
        "vptlab.attacks.create_attack('pgd', eps=0.1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


pyautoattack = pytest.importorskip("pyautoattack")


def authors(version: str, norm: str = "linf", **options):
    model = nn.Linear(4, 10)
    return AutoAttack(eps=0.1, norm=norm, version=version, **options).authors(model, "cpu")


def test_the_authors_iterations_targets_and_queries():
    std = authors("standard")
    assert isinstance(std, pyautoattack.AutoAttack)
    assert std.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (std.apgd.n_iter, std.apgd.n_restarts) == (100, 1)
    assert (std.apgd_targeted.n_iter, std.apgd_targeted.n_target_classes) == (100, 9)
    assert (std.fab.n_iter, std.fab.n_target_classes) == (100, 9)
    assert (std.square.n_queries, std.square.p_init) == (5000, 0.8)
    assert (std.epsilon, std.norm, std.seed) == (0.1, "Linf", 0)
    plus = authors("plus", norm="l2")
    assert plus.norm == "L2" and set(plus.attacks_to_run) == {
        "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}  # fmt: skip
    assert plus.apgd.n_restarts == 5 and plus.fab.n_restarts == 5
    rand = authors("rand")
    assert rand.attacks_to_run == ["apgd-ce", "apgd-dlr"] and rand.apgd.eot_iter == 20
    assert authors("custom", attacks=["apgd-ce"]).attacks_to_run == ["apgd-ce"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"version": "fast"}, "version must be one of standard, plus, rand, custom"),
        ({"version": "custom"}, "version custom needs attacks"),
        ({"version": "custom", "attacks": ["pgd"]}, "version custom needs attacks"),
        ({"attacks": ["apgd-ce"]}, "attacks are set by version 'standard'"),
    ],
)
def test_bad_versions_are_one_line_errors(options, says):
    with pytest.raises(ConfigError) as err:
        create_attack("autoattack", eps=0.1, **options)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_whole_batch_clean_where_it_fails(norm, eps, trained, digits):
    x, y = digits[2][:64], digits[3][:64]
    with torch.no_grad():
        wrong_already = trained(x).argmax(1) != y
    assert wrong_already.any()  # the ~3% the model gets wrong: left as they are
    attack = create_attack("autoattack", eps=eps, norm=norm, version="custom",
                           attacks=["apgd-ce"])  # fmt: skip
    x_adv = attack(trained, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        still_right = trained(x_adv).argmax(1) == y
    assert torch.equal(x_adv[wrong_already], x[wrong_already])
    assert torch.equal(x_adv[still_right], x[still_right])
    assert 0 < still_right.sum() < (~wrong_already).sum()  # a budget that neither side wins


def test_no_weaker_than_torchattacks_autoattack(trained, digits):
    """At a budget that leaves about 40% of the digits standing, the authors' APGD-CE alone (100
    iterations, 5 restarts) does at least as well as torchattacks' whole ensemble (10 iterations),
    up to one digit."""
    torchattacks = pytest.importorskip("torchattacks")
    n, eps = 32, 0.1
    x, y = digits[2][:n], digits[3][:n]
    ours = create_attack("autoattack", eps=eps, version="custom", attacks=["apgd-ce"])
    theirs = torchattacks.AutoAttack(trained, norm="Linf", eps=eps, version="standard",
                                     n_classes=10, seed=0)  # fmt: skip
    with torch.no_grad():
        clean = (trained(x).argmax(1) == y).float().mean().item() * 100
        a_ours = (trained(ours(trained, x, y)).argmax(1) == y).float().mean().item() * 100
        a_theirs = (trained(theirs(x, y)).argmax(1) == y).float().mean().item() * 100
    assert 20 < a_theirs < clean - 20, a_theirs  # not a budget where both sides give 0 or 100
    assert a_ours <= a_theirs + 100 / n, (a_ours, a_theirs)


def test_the_authors_checks_become_flags(trained, digits):
    """A model that outputs probabilities, not logits, is flagged by the authors' check; the
    message is kept once however many batches raise it."""
    probabilities = nn.Sequential(trained, nn.Softmax(dim=1)).eval()
    attack = create_attack("autoattack", eps=0.3, version="custom", attacks=["apgd-ce"])
    for start in (0, 8):
        attack(probabilities, digits[2][start : start + 8], digits[3][start : start + 8])
    assert len(attack.flags) == 1 and "probability distribution" in attack.flags[0]
    plain = create_attack("autoattack", eps=0.3, version="custom", attacks=["apgd-ce"])
    plain(trained, digits[2][:8], digits[3][:8])
    assert plain.flags == []


def test_fewer_classes_fewer_targets():
    torch.manual_seed(0)
    five = build_classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)),
                            (0.5,) * 3, (0.5,) * 3).eval()  # fmt: skip
    x, y = torch.rand(4, 3, 4, 4), torch.arange(4)
    attack = create_attack("autoattack", eps=0.5, version="custom", attacks=["apgd-t"])
    x_adv = attack(five, x, y)
    assert (x_adv - x).abs().max() <= 0.5 + 1e-6
    assert any("target 4 classes instead of the authors' 9" in f for f in attack.flags)
    three = build_classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)),
                             (0.5,) * 3, (0.5,) * 3).eval()  # fmt: skip
    with pytest.raises(ConfigError, match="3 classes; APGD-DLR and APGD-T need at least 4"):
        create_attack("autoattack", eps=0.5)(three, x, y % 3)
