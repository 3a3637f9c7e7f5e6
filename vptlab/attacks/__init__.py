"""Evasion attacks by name: `create_attack("pgd", eps=0.3, steps=20)(model, x, y) -> x_adv`.

`autoattack` and `square` run the authors' code (AutoAttack and Square Attack from pyautoattack)
and need the optional extra `vptlab[attacks]`; torchattacks is only the tests' reference.
Each attack is one small class with its paper's update rule in view; all take and return pixels in
[0,1] and leave the model as they found it (see `base.Attack`).
"""

from __future__ import annotations

from typing import Any

from vptlab.attacks import autoattack, pgd, square  # noqa: F401
from vptlab.attacks.autoattack import AutoAttack
from vptlab.attacks.base import ATTACKS, Attack, frozen_parameters
from vptlab.attacks.pgd import FGSM, PGD, check_budget
from vptlab.attacks.square import Square

# Imported for their registrations: fgsm, pgd, autoattack, square.
from vptlab.registry import import_plugins


def create_attack(name: str, **options: Any) -> Attack:
    """Build attack `name` from its keyword options (eps, norm, alpha, steps ...).

    An unknown name, an option the attack does not take or a value of the wrong type is one
    ConfigError naming it: `attack.stepz: unknown option; attack 'pgd' takes: eps, norm, ...`.
    """
    checked = ATTACKS.check_options(name, options, where="attack")
    return ATTACKS.create(name, **checked)


# Every module registers its plug-ins on import: a new file here is found without an edit.
import_plugins(__name__, __path__)

__all__ = [
    "ATTACKS",
    "FGSM",
    "PGD",
    "Square",
    "Attack",
    "AutoAttack",
    "check_budget",
    "create_attack",
    "frozen_parameters",
]
