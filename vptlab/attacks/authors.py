"""What the attacks built on the authors' code (`pyautoattack`: Square, AutoAttack) share: its
import, done when such an attack is built so that importing vptlab never needs it, and a view of
our models that returns fp32 logits.

pyautoattack is Croce & Hein's AutoAttack code on PyPI (MIT); it needs only numpy and torch and
comes with the optional extra `vptlab[attacks]`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn

from vptlab.errors import ConfigError


def import_pyautoattack(attack: str, module: str = "pyautoattack") -> ModuleType:
    """`module` of pyautoattack, or one ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"attack '{attack}' runs the authors' code from the pyautoattack package: "
            "pip install 'vptlab[attacks]' (or pip install --no-deps 'pyautoattack>=0.2')"
        ) from None


class FloatLogits(nn.Module):
    """`model` returning fp32 logits; with `amp`, its forward runs in bf16 autocast on CUDA.

    Autocast is switched off explicitly otherwise, so an attack called inside someone else's
    autocast region (the training loop) still sees fp32 logits. The input, and so the
    perturbation the authors' code builds, stays fp32 either way.
    """

    def __init__(self, model: nn.Module, amp: bool) -> None:
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_cuda = x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp and on_cuda):
            return self.model(x).float()


def draw_seed(seed: int | None) -> int:
    """`seed`, or (for None) one drawn from the caller's RNG stream, as our other attacks do."""
    return seed if seed is not None else int(torch.randint(2**31 - 1, ()))


def rng_devices(x: torch.Tensor) -> list[torch.device]:
    """The CUDA device whose RNG `torch.random.fork_rng` must also save: the authors' code
    reseeds the global generators, which must not leak into the caller's stream."""
    return [x.device] if x.device.type == "cuda" else []
