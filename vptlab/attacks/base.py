"""What every attack shares: the call shape `attack(model, x, y) -> x_adv`, pixels in [0,1], the
model left as it came (train/eval mode and `requires_grad` of every parameter), seeded noise, and
fp32 logits: bf16 autocast on CUDA only for an attack built with `amp=True` (the perturbation
itself stays fp32 either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.registry import Registry

ATTACKS = Registry["Attack"]("attack")
NORMS = ("linf", "l2")


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient while an attack differentiates w.r.t. the input (it saves the
    weight gradients' work); each parameter's `requires_grad` and each module's train/eval flag
    are restored afterwards, even if the attack raised.

    Modes are restored module by module, not by `model.train(mode)`: a model may hold mixed
    modes (an adapted model keeps its frozen backbone in eval while its prompts train), and an
    attack that switches the model to eval (torchattacks does) must not flatten them.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


class Attack:
    """Base class: `__call__(model, x, y)` returns adversarial images in [0,1], shape of `x`.

    Attacks do not change the model's mode: evaluation calls them on a model in eval mode, and
    adversarial training decides itself in which mode its inner attack runs. `targeted=True`
    reads `y` as the target labels. `seed=None` draws random starts from the global RNG (which
    the training loop checkpoints); an int gives the same noise for the same batch on every call.
    `amp=True` runs the model's forwards in bf16 autocast on CUDA: faster, but a bf16 gradient
    can mislead an attack, so numbers meant for review keep the fp32 default.
    """

    norm: str = "linf"
    eps: float = 0.0
    targeted: bool = False
    amp: bool = False
    seed: int | None = 0

    @property
    def name(self) -> str:
        """The attack and its budget, as metric names use it: `pgd-linf-0.3`."""
        return f"{type(self).__name__.lower()}-{self.norm}-{self.eps:g}"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with frozen_parameters(model):
            return self.perturb(model, x.detach().float(), y).detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- helpers the update rules share ---------------------------------------------------

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's fp32 logits; with `amp`, the forward runs in bf16 on CUDA. Autocast is
        switched off explicitly otherwise, so an attack inside the training loop's autocast
        region still computes in fp32. The input stays fp32."""
        on_cuda = x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp and on_cuda):
            return model(x).float()

    def loss_of(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss to ascend: cross-entropy, or minus it towards a target."""
        loss = F.cross_entropy(logits, y, reduction="none")
        return -loss if self.targeted else loss

    def input_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient of the summed loss w.r.t. x, per-sample loss), x in fp32."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_of(self.logits(model, x), y)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return grad, loss.detach()


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped (B, 1, 1, 1) to broadcast against images."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The nearest perturbation inside the eps ball of `norm`."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / per_sample_norm(delta)).clamp(max=1.0)


def random_start(
    x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A uniform draw from the Linf ball, or a random direction at a uniform radius for L2."""
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device)
    radius = torch.rand((len(x), *([1] * (x.ndim - 1))), generator=generator, device=x.device)
    return direction / per_sample_norm(direction) * radius * eps
