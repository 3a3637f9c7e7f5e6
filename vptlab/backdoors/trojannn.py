"""TrojanNN (Liu et al. 2018, "Trojaning attack on neural networks"): a patch whose pixels are
optimized to excite chosen internal neurons of a clean model, then pasted like BadNets.

Fit (on the clean train split, `Trigger.fit`):
1. a clean surrogate model (backdoors/surrogate.py: SimpleNet, the attacker's model);
2. the `num_neurons` neurons of its penultimate layer (the pooled features the classifier reads)
   most strongly connected to the layer before: the largest sum of |w| over each neuron's
   incoming weights (the paper's rule; BackdoorBench's `get_most_connected_neuron_idxes` sums
   the classifier's outgoing weights instead);
3. the paper's trigger generation: gradient descent on sum_k (a_k(x') - target_value)^2 over the
   patch's pixels only, a_k the chosen neurons' activations on x' = the patch pasted on clean
   train images, with signed steps of `alpha` clipped to [0, 1] (as BackdoorBench / TrojanZoo:
   alpha 0.1, target value 100, which no activation reaches, so the steps keep raising them).

The learnt patch (and the neurons) are the trigger's state; `apply` pastes the patch at
`location`: x' = (1 - m) x + m p. Defaults: a square 5x5 px patch (the paper's square mask
covers 4-7% of the image: 5x5 is 3% of a 28x28 digit) at the bottom right, 2 neurons (BackdoorBench
preactresnet18), 100 steps on 64 images (BackdoorBench's 1,000 steps on the bare mask: on a
patch this small the signed steps saturate its pixels within tens).

On SimpleNet and digits (tests/backdoors/test_fitted.py) a corner patch reaches only the few
pooled cells under it: the learnt patch holds the neuron where clean digits put it while random
patches lower it by 0.08-0.13, and two neurons can pull the patch in opposite ways (the cost
then raises their sum). As a backdoor it plants like BadNets (test_backdoor_run.py).

What differs from the authors: the paper generates the trigger on the mask alone (no data: its
attacker has none) and then retrains the model on reverse-engineered inputs; here, as in
BackdoorBench, the victim is trained from scratch on the poisoned split, and the patch is
optimized pasted on clean images, where it is used.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from vptlab.backdoors.surrogate import train_surrogate
from vptlab.backdoors.triggers import TRIGGERS, BadNetsTrigger, Corner, Trigger
from vptlab.errors import ConfigError


def most_connected_neurons(model: nn.Module, count: int) -> torch.Tensor:
    """The `count` penultimate-layer neurons (pooled feature channels) of a `StagedCNN`
    classifier with the largest sum of |incoming weights|: the last convolution or linear layer
    before the pool, summed over everything but its output dimension. Sorted, strongest first."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    incoming = [m for m in layers[:-1] if m.weight.shape[0] == model.get_classifier().in_features]
    if not incoming:
        raise ConfigError("trojannn: the surrogate has no layer feeding its classifier's inputs")
    strength = incoming[-1].weight.detach().abs().flatten(1).sum(1)
    return torch.argsort(strength, descending=True)[:count]


def neuron_activations(model: nn.Module, x: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """(N, k) activations of the chosen penultimate neurons (pre-logits features) on x."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return features[:, neurons]


@TRIGGERS.register("trojannn")
class TrojanNNTrigger(Trigger):
    """TrojanNN: a `size` x `size` patch at `location`, optimized on a clean surrogate to drive
    its most connected penultimate neurons to `target_value` (see the module docstring)."""

    name = "trojannn"
    fitted = True
    state_keys = ("patch", "neurons")

    def __init__(
        self,
        seed: int = 0,
        size: Annotated[int, Field(ge=1)] = 5,
        location: Corner = "bottom-right",
        num_neurons: Annotated[int, Field(ge=1)] = 2,
        target_value: float = 100.0,
        steps: Annotated[int, Field(ge=1)] = 100,
        alpha: Annotated[float, Field(gt=0, le=1)] = 0.1,
        images: Annotated[int, Field(ge=1)] = 64,
        surrogate_epochs: Annotated[int, Field(ge=1)] = 2,
    ) -> None:
        super().__init__(seed)
        if size < 1 or num_neurons < 1 or steps < 1 or images < 1 or surrogate_epochs < 1:
            raise ConfigError("trojannn size, num_neurons, steps, images and surrogate_epochs "
                              "must be >= 1")  # fmt: skip
        if not 0 < alpha <= 1:
            raise ConfigError(f"trojannn alpha must be in (0, 1], got {alpha}")
        self.size, self.location, self.num_neurons = size, location, num_neurons
        self.target_value, self.steps, self.alpha = float(target_value), steps, alpha
        self.images, self.surrogate_epochs = images, surrogate_epochs
        self._place = BadNetsTrigger(seed, size=size, location=location)

    def options(self) -> dict[str, Any]:
        return {"size": self.size, "location": self.location, "num_neurons": self.num_neurons,
                "target_value": self.target_value, "steps": self.steps, "alpha": self.alpha,
                "images": self.images, "surrogate_epochs": self.surrogate_epochs}  # fmt: skip

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, target: int) -> None:
        model = train_surrogate(x, y, num_classes, self.seed, epochs=self.surrogate_epochs)
        self.learn_patch(model, x)

    def learn_patch(self, model: nn.Module, x: torch.Tensor) -> None:
        """Steps 2-3 of the fit on a trained (eval-mode) `model` and clean images x."""
        neurons = most_connected_neurons(model, self.num_neurons)
        g = self.generator()
        canvas = x[torch.randperm(len(x), generator=g)[: self.images]].detach().float().cpu()
        patch = torch.rand(x.shape[1], self.size, self.size, generator=g)
        for _ in range(self.steps):
            patch.requires_grad_(True)
            activation = neuron_activations(model, self.paste(canvas, patch), neurons)
            cost = ((activation - self.target_value) ** 2).sum(1).mean()
            (grad,) = torch.autograd.grad(cost, patch)
            patch = (patch.detach() - self.alpha * grad.sign()).clamp(0.0, 1.0)
        self.load_state({"patch": patch.detach(), "neurons": neurons})

    def paste(self, x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """x with `patch` ((1 or C), size, size) pasted at `location`; differentiable in both."""
        h, w = x.shape[-2:]
        row, col = self._place.top_left(h, w)
        mask = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        mask[row : row + self.size, col : col + self.size] = 1.0
        canvas = torch.zeros(patch.shape[0], h, w, dtype=x.dtype, device=x.device)
        canvas[:, row : row + self.size, col : col + self.size] = patch.to(x)
        return (1 - mask) * x + mask * canvas

    @property
    def patch(self) -> torch.Tensor:
        """The learnt (C, size, size) patch."""
        self.require_state()
        return self._state["patch"]

    @property
    def neurons(self) -> torch.Tensor:
        """The surrogate's chosen penultimate neurons, strongest first."""
        self.require_state()
        return self._state["neurons"]

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.patch
        if patch.shape[0] not in (1, x.shape[1]):
            raise ConfigError(f"trojannn: its patch was fitted on {patch.shape[0]}-channel images, "
                              f"got {x.shape[1]} channels")  # fmt: skip
        return self.paste(x, patch)
