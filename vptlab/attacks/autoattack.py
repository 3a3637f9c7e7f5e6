"""AutoAttack (Croce & Hein 2020) through torchattacks' implementation: the parameter-free
ensemble APGD-CE, APGD-T, FAB-T and Square, each run on the samples the previous ones left
correct. torchattacks is an optional extra (`pip install vptlab[attacks]`), imported only when
this attack is built, so importing vptlab never needs it.

Our models take [0,1] pixels and normalize inside, which is torchattacks' convention too, so the
model is handed over as it is (wrapped only to return fp32 logits, and with `amp=True` to run
its forward in bf16 autocast on CUDA).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn

from vptlab.attacks.base import ATTACKS, Attack
from vptlab.attacks.pgd import check_budget
from vptlab.errors import ConfigError

VERSIONS = ("standard", "plus", "rand")
TORCHATTACKS_NORMS = {"linf": "Linf", "l2": "L2"}


def import_torchattacks() -> ModuleType:
    """torchattacks, or one ConfigError saying how to install it."""
    try:
        return importlib.import_module("torchattacks")
    except ImportError:
        raise ConfigError(
            "attack 'autoattack' needs the torchattacks package: pip install 'vptlab[attacks]' "
            "(or pip install 'torchattacks>=3.5')"
        ) from None


class FloatLogits(nn.Module):
    """`model` with its forward in bf16 autocast on CUDA and its logits returned in fp32; the
    input (and so the perturbation torchattacks builds) stays fp32."""

    def __init__(self, model: nn.Module, amp: bool) -> None:
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_cuda = x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp and on_cuda):
            return self.model(x).float()


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack's `version` ensemble (standard: APGD-CE, APGD-T, FAB-T, Square) at budget eps.

    torchattacks runs the model in eval mode; the model's modes (module by module) and its
    parameters' `requires_grad` are restored afterwards. torchattacks reseeds the global RNG, so
    it runs inside `torch.random.fork_rng`: the caller's RNG stream is left untouched. `seed=None`
    draws the attack's seed from that stream. `n_classes=None` reads it off the logits.

    Example:
        >>> attack = AutoAttack(eps=8 / 255)                     # doctest: +SKIP
        >>> x_adv = attack(model.eval(), images, labels)         # doctest: +SKIP
        >>> robust = (model(x_adv).argmax(1) == labels).float().mean()  # doctest: +SKIP
    """

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        version: str = "standard",
        n_classes: int | None = None,
        amp: bool = False,
        seed: int | None = 0,
    ) -> None:
        check_budget(norm, eps)
        if version not in VERSIONS:
            raise ConfigError(f"autoattack version must be one of {', '.join(VERSIONS)}, "
                              f"got {version!r}")
        if n_classes is not None and n_classes < 2:
            raise ConfigError(f"autoattack n_classes must be >= 2, got {n_classes}")
        import_torchattacks()  # fail when the attack is built, not half-way through an evaluation
        self.norm, self.eps, self.amp, self.seed = norm, eps, amp, seed
        self.version, self.n_classes = version, n_classes

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        torchattacks = import_torchattacks()
        net = FloatLogits(model, self.amp)
        n_classes = self.n_classes
        if n_classes is None:
            with torch.no_grad():
                n_classes = net(x[:1]).shape[1]
        seed = self.seed if self.seed is not None else int(torch.randint(2**31 - 1, ()))
        attack = torchattacks.AutoAttack(
            net,
            norm=TORCHATTACKS_NORMS[self.norm],
            eps=self.eps,
            version=self.version,
            n_classes=n_classes,
            seed=seed,
        )
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return attack(x, y)
