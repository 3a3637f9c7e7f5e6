"""Evasion attacks by name: `create_attack("pgd", eps=0.3, steps=20)(model, x, y) -> x_adv`.

Each attack is one small class with its paper's update rule in view; all take and return pixels in
[0,1] and leave the model as they found it (see `base.Attack`).
"""

from __future__ import annotations

from typing import Any

from vptlab.attacks import pgd  # noqa: F401  (registers fgsm, pgd)
from vptlab.attacks.base import ATTACKS, Attack, frozen_parameters
from vptlab.attacks.pgd import FGSM, PGD, check_budget


def create_attack(name: str, **options: Any) -> Attack:
    """Build attack `name` from its keyword options (eps, norm, alpha, steps ...)."""
    return ATTACKS.create(name, **options)


__all__ = ["ATTACKS", "FGSM", "PGD", "Attack", "check_budget", "create_attack", "frozen_parameters"]
