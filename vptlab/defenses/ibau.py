"""Implicit Backdoor Adversarial Unlearning (`ibau`, Zeng et al. 2022): unlearn the universal
perturbation that hurts the model most on clean data, with the implicit hypergradient.

i-BAU solves the minimax problem

    min_theta  H(delta*(theta), theta),
    delta*(theta) = argmax_delta  mean CE(f_theta(x + delta), y) - reg ||delta||^2

on the defender's clean data, alternating as the authors' code (github.com/YiZeng623/I-BAU,
`defense.py`; BackdoorBench's `defense/i-bau.py` is the same):

1. Each round (an epoch of the one loop) starts from delta = 0 and makes one pass over the clean
   data, in order: per batch one SGD step (lr `perturbation_lr`) on mean(-CE(f(x + delta),
   f(x)'s predictions)) + `perturbation_reg` ||delta||^2. delta is one (1, C, H, W) tensor added
   to every image, unclamped (the authors' clamp to [0, 1] is commented out).
2. Then, per batch, one step of the loop's optimizer on the hypergradient of the outer loss
   H = CE(f_theta(x + patch), y), where `portion` of the batch's images (at least one) carry delta
   and the rest are clean: dH/dtheta = dH/dtheta|_delta + (dphi/dtheta)^T v, with phi(delta,
   theta) = delta - `inner_lr` x grad_delta L_inner(delta, theta) the inner problem's fixed-point
   map (one gradient step on L_inner = mean(-CE(f(x_0 + delta), y_0)) + reg ||delta||^2, on a
   fixed first batch (x_0, y_0) of the clean data, as theirs) and v from `fixed_point_steps`
   iterations v <- (dphi/ddelta)^T v + dH/ddelta from v = 0 (their `hypergrad.fixed_point`,
   Grazzi et al. 2020).

The outer step is a task of the one loop (`ImplicitUnlearning`): its loss has H's value and the
hypergradient as its gradient (H + <phi, v> - <phi, v> detached, v a constant), so `fit`'s
backward and optimizer apply it. Everything runs in eval mode (the authors' `model.eval()`: the
BatchNorm statistics stay, no dropout) and in fp32 (the second derivatives, whatever the loop's
autocast). The hypergradient's Hessian-vector products go through the bare model, so one process
only (refused under DDP: it does not support double backward).

Defaults are the authors' and BackdoorBench's: `fixed_point_steps` (their K) 5, `portion` 0.01,
`perturbation_lr` 10, `perturbation_reg` 0.001, `inner_lr` 0.1. The recipe is the defended run's
`train` section, as every repairer's: rounds are `train.epochs`, the outer optimizer is
`train.optimizer` at `train.lr`. BackdoorBench's: 5 rounds of Adam at lr 1e-4 (the authors':
1e-3), batch 256 (theirs: 100), no weight decay: `train.epochs=5 train.optimizer=adamw
train.weight_decay=0 train.lr=1e-4 train.schedule=constant data.batch_size=256`. With the
authors' 1% of each batch, a batch under 100 images would carry delta on no image (the outer
loss would be plain fine-tuning): here at least one image of each batch does.

Measured on the tests' backdoored SimpleNet (mnist-5k, BadNets 3x3 white corner patch to class 0,
200 clean digits, the defaults, 2-4 rounds of Adam at 3e-4 or 1e-3, seeds 0-2): the round's
perturbation sends nearly every digit to class 5 (or 8), not to the target, so there is nothing
trigger-like to unlearn, and the ASR stays at 60-93 (97 before) at 80-87 CA; larger `portion`s
or smaller `perturbation_lr`s swing it between rounds without removing it. On a Blended (alpha
0.2) SimpleNet i-BAU lowered the ASR from 100 to 13 in one round where `ft` left 99.6, then it
climbed back to 46 by the third round, at 13 points of CA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from vptlab.attacks import frozen_parameters
from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import Batch, make_loader
from vptlab.defenses.adversarial import eval_mode
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL
from vptlab.errors import ConfigError

# The fixed-point iterations stop early when v moves less than this (their `tol`).
FIXED_POINT_TOL = 1e-10


def universal_perturbation(
    model: nn.Module, batches: list[torch.Tensor], lr: float, reg: float
) -> torch.Tensor:
    """The authors' round-start search: delta from 0, one SGD step per batch of `batches` (in
    order) on mean(-CE(f(x + delta), f(x)'s predictions)) + reg ||delta||^2. Returns delta,
    (1, C, H, W)."""
    delta = torch.zeros_like(batches[0][:1], requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=lr)
    with frozen_parameters(model):
        for x in batches:
            with torch.no_grad():
                predicted = model(x).argmax(1)
            loss = -F.cross_entropy(model(x + delta), predicted) + reg * delta.pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return delta.detach()


def hypergradient_loss(
    model: nn.Module,
    batch: Batch,
    delta: torch.Tensor,
    inner: tuple[torch.Tensor, torch.Tensor],
    portion: float,
    inner_lr: float,
    reg: float,
    fixed_point_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): the outer loss H on `batch` (a random `portion` of it, at least one image,
    carrying `delta`), whose gradient w.r.t. the model's parameters is i-BAU's implicit
    hypergradient (see the module docstring); its value is H's."""
    delta = delta.detach().requires_grad_(True)
    n = len(batch.y)
    rows = torch.randperm(n, device=batch.x.device)[: max(1, int(n * portion))]
    patch = torch.zeros(n, 1, 1, 1, device=batch.x.device)
    patch[rows] = 1.0
    logits = model(batch.x + patch * delta)
    outer = F.cross_entropy(logits, batch.y)
    (outer_delta,) = torch.autograd.grad(outer, delta, retain_graph=True)
    x0, y0 = inner
    inner_loss = -F.cross_entropy(model(x0 + delta), y0) + reg * delta.pow(2).sum()
    (inner_grad,) = torch.autograd.grad(inner_loss, delta, create_graph=True)
    mapped = delta - inner_lr * inner_grad  # the fixed-point map phi(delta, theta)
    v = torch.zeros_like(delta)
    for _ in range(fixed_point_steps):
        previous = v
        (jvp,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jvp + outer_delta
        if float((v - previous).norm()) < FIXED_POINT_TOL:
            break
    coupling = (mapped * v.detach()).sum()  # d/dtheta: (dphi/dtheta)^T v
    return outer + coupling - coupling.detach(), logits


@dataclass(frozen=True)
class IBAUOptions:
    """i-BAU's options (see `implicit_backdoor_adversarial_unlearning` for each)."""

    fixed_point_steps: int = 5
    portion: float = 0.01
    perturbation_lr: float = 10.0
    perturbation_reg: float = 0.001
    inner_lr: float = 0.1


class ImplicitUnlearning:
    """i-BAU's outer step as a task of the one loop; the round's perturbation is searched at the
    first step of each epoch (the loop's `set_progress` says which epoch it is)."""

    def __init__(
        self, clean: TensorSplit | Dataset, cfg: ExperimentConfig,
        options: IBAUOptions = IBAUOptions(),  # noqa: B008 (frozen: one shared default is fine)
    ) -> None:  # fmt: skip
        self.clean, self.cfg, self.options = clean, cfg, options
        self.progress = 0.0
        self.round = -1
        self.delta: torch.Tensor | None = None
        self.inner: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_progress(self, epochs_done: float) -> None:
        self.progress = epochs_done

    def batches(self, device: torch.device) -> list[Batch]:
        """The clean data in order, in batches of the recipe's size (the authors' unshuffled
        unlearning loader); the first is the inner problem's fixed batch."""
        data = self.cfg.data
        loader = make_loader(self.clean, data.batch_size, train=False, device=device,
                             seed=self.cfg.seed, num_workers=data.num_workers,
                             img_size=data.img_size)  # fmt: skip
        return list(loader)

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "defense 'ibau' runs on one process: its hypergradient's second derivatives do "
                "not go through DDP; run the defense without torchrun"
            )
        # Eval mode and fp32 (see the module docstring); attention by PyTorch's math kernel,
        # whose graph has second derivatives (the fused kernels' backward has none).
        with eval_mode(raw_model), torch.autocast(batch.x.device.type, enabled=False), \
                sdpa_kernel(SDPBackend.MATH):  # fmt: skip
            if math.floor(self.progress) != self.round or self.delta is None:
                batches = self.batches(batch.x.device)
                if self.inner is None:
                    self.inner = (batches[0].x, batches[0].y)
                o = self.options
                self.delta = universal_perturbation(
                    raw_model, [b.x for b in batches], o.perturbation_lr, o.perturbation_reg
                )
                self.round = math.floor(self.progress)
            assert self.inner is not None
            o = self.options
            return hypergradient_loss(
                raw_model, batch, self.delta, self.inner, o.portion, o.inner_lr,
                o.perturbation_reg, o.fixed_point_steps,
            )  # fmt: skip


class ImplicitBackdoorAdversarialUnlearning:
    """Unlearn, round after round, the universal perturbation that maximizes the clean loss, with
    the implicit hypergradient (see the module docstring)."""

    name = "ibau"
    trains = TRAINS_MODEL

    def __init__(self, options: IBAUOptions = IBAUOptions()) -> None:  # noqa: B008 (frozen)
        self.options = options

    def prepare(self, model: nn.Module) -> nn.Module:
        return model  # nothing to add: the model keeps its structure

    def task(
        self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig
    ) -> ImplicitUnlearning:
        return ImplicitUnlearning(clean.train, cfg, self.options)


@REPAIRERS.register("ibau", repairs_pixel_prompts=False, needs_image_text=False)
def implicit_backdoor_adversarial_unlearning(
    fixed_point_steps: Annotated[int, Field(gt=0)] = 5,
    portion: Annotated[float, Field(gt=0, le=1)] = 0.01,
    perturbation_lr: Annotated[float, Field(gt=0)] = 10.0,
    perturbation_reg: Annotated[float, Field(ge=0)] = 0.001,
    inner_lr: Annotated[float, Field(gt=0)] = 0.1,
) -> ImplicitBackdoorAdversarialUnlearning:
    """fixed_point_steps: the hypergradient's fixed-point iterations (the authors' K); portion:
    the share of each batch's images (at least one) that carry the perturbation in the outer
    loss; perturbation_lr / perturbation_reg: the round-start search's SGD learning rate and the
    weight of ||delta||^2; inner_lr: the step of the inner problem's fixed-point map. Defaults:
    Zeng et al. 2022's code and BackdoorBench's. Rounds and the outer optimizer: the recipe's
    `train` (see ibau.py)."""
    return ImplicitBackdoorAdversarialUnlearning(IBAUOptions(
        fixed_point_steps, portion, perturbation_lr, perturbation_reg, inner_lr))  # fmt: skip
