"""Adversarial Neuron Pruning (`anp`, Wu & Wang 2021): prune the neurons whose loss on clean data
explodes under a small adversarial perturbation of the neurons themselves.

A backdoored network is sensitive to perturbations of its neurons: scaling the backdoor neurons a
little makes clean inputs fall into the target class. ANP learns a mask m in [0, 1] per neuron
on the defender's clean data,

    min_m  alpha x L(m, 0) + (1 - alpha) x max_{|delta|, |xi| <= eps} L(m + delta, xi),

where L is the cross-entropy of the network whose neuron k computes (m_k + delta_k) gamma_k
x_hat_k + (1 + xi_k) beta_k (gamma, beta: the normalization layer's affine weight and bias), and
then prunes every neuron whose mask ends at or below `threshold`. As the authors' code
(github.com/csdongxian/ANP_backdoor, `optimize_mask_cifar.py`) per iteration: the perturbations
start uniform in [-eps, eps] and take `steps` signed gradient-ascent steps of eps / steps (not
projected back, as theirs); the masks take one SGD step (momentum 0.9, `lr`) on the loss above
and are clipped to [0, 1]. The network is in train mode (batch statistics, as theirs); its
running statistics are put back afterwards, and no weight changes.

Neurons (the model's `net`, a CLIP model's image tower):
- CNNs: the channels of every BatchNorm with an affine weight (the authors' NoisyBatchNorm2d).
- ViTs: the features of every LayerNorm with an affine weight (each block's two norms and the
  final one): BackdoorBench's ViT variant of ANP (`NoiseLayerNorm`, utils/defense_utils/anp).
  timm's channels-first LayerNorm2d (ConvNeXt) masks its channels.
A model with neither is refused with a ConfigError that says so.

Defaults are the authors': eps 0.4, alpha 0.2, one perturbation step, mask lr 0.2 (BackdoorBench's
config: 0.01), threshold 0.2 (the paper's fixed threshold; BackdoorBench sweeps thresholds and keeps
the one with the lowest ASR on its test split, which a blind defender cannot). The one deviation is
the budget: the authors run 2,000 iterations of 128 samples (BackdoorBench: of 256), over 500
clean CIFAR-10 images (512 passes; BackdoorBench: 2,500 images, ~200 passes), hours on a CPU. Here
`iterations` defaults to the recipe's `train.epochs` passes over the clean subset (the budget
every repairer's recipe sets, 10 by default: ~200 iterations on 5% of CIFAR-10 at batch 128);
`iterations=2000` is the authors'. Batches of `data.batch_size` come from the recipe's shuffled,
augmented train loader, pass after pass (theirs: drawn with replacement).

ANP does not fine-tune. Its task trains nothing (`PrunedEvaluation`): each epoch of the one `fit`
is a pass over the clean data in eval mode that records the pruned model's loss and accuracy,
and the run saves the pruned model. The mask search goes into the run's metrics.json as `anp`.

Measured on the tests' backdoored SimpleNet (mnist-5k, BadNets 3x3 corner patch, 200 clean
digits, batch 64): 30 iterations at lr 1 prune 6 of its 320 BatchNorm channels (5 in the last
layer), ASR 97.3 -> 24.4 at CA 92.5 -> 88.5; 100 at the default lr 0.2 prune 4 (ASR 34.6, CA
88.7). On a Blended (alpha 0.2) SimpleNet 30 iterations at lr 1 left the ASR at 100.

Pruning is a mask, not surgery: a buffer `anp_mask` (1 kept, 0 pruned) on each normalization
layer and a forward hook that scales the layer's gamma x_hat part by it, gamma_k x_hat_k + beta_k
-> m_k gamma_k x_hat_k + beta_k (the authors zero gamma_k; the same function). The buffers are in
the state dict, so a saved run reloads: `prepare` puts back all-ones masks and the hooks, and
loading fills the masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from vptlab.attacks import frozen_parameters
from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import Batch, make_loader
from vptlab.defenses.adversarial import batchnorm_statistics_kept, eval_mode
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL, backbone
from vptlab.engine.loop import resolve_device
from vptlab.engine.tasks import Task
from vptlab.errors import ConfigError, VptlabError
from vptlab.models.clip import CLIPNet

MASK = "anp_mask"


@dataclass(frozen=True)
class NeuronSite:
    """A normalization layer whose neurons ANP masks: its module name in the model, the dimension
    of its output that holds the neurons, and how many there are."""

    name: str
    dim: int
    units: int


def neuron_sites(model: nn.Module) -> list[NeuronSite]:
    """The normalization layers ANP masks, in module order (see the module docstring)."""
    net, prefix = backbone(model), "net"
    if isinstance(net, CLIPNet):  # the trigger is in the image: the text tower is left alone
        net, prefix = net.clip.visual, "net.clip.visual"
    sites = []
    for name, module in net.named_modules():
        if isinstance(module, _BatchNorm) and module.affine:
            sites.append(NeuronSite(f"{prefix}.{name}", 1, module.num_features))
        elif (
            isinstance(module, nn.LayerNorm)
            and module.elementwise_affine
            and len(module.normalized_shape) == 1
        ):
            dim = 1 if isinstance(module, LayerNorm2d) else -1
            sites.append(NeuronSite(f"{prefix}.{name}", dim, module.normalized_shape[0]))
    if not sites:
        raise ConfigError(
            f"defense 'anp' cannot prune {type(net).__name__}: it masks the neurons of "
            "normalization layers with an affine weight (BatchNorm channels, LayerNorm features) "
            "and this model has none (see anp.py)"
        )
    return sites


def _scaled(
    output: torch.Tensor, module: nn.Module, dim: int, scale: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A normalization layer's `output` = gamma x_hat + beta with its gamma x_hat part times
    `scale` and its beta times `shift` (None: 1), both per neuron along `dim`."""
    shape = [1] * output.ndim
    shape[dim] = -1
    bias = getattr(module, "bias", None)
    if bias is None:  # a LayerNorm without a bias: gamma x_hat alone
        return output * scale.view(shape).to(output.dtype)
    bias = bias.view(shape).to(output.dtype)
    shifted = bias if shift is None else bias * shift.view(shape).to(output.dtype)
    return (output - bias) * scale.view(shape).to(output.dtype) + shifted


class NeuronMask:
    """Forward hook of a normalization layer: gamma x_hat + beta -> m gamma x_hat + beta, the
    mask m its `anp_mask` buffer (read from the module it is called with, so a deep copy of the
    model masks with the copy's buffer)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        mask = getattr(module, MASK)
        if output.shape[self.dim] != mask.numel():
            raise VptlabError(
                f"anp: {type(module).__name__} outputs {output.shape[self.dim]} neurons along "
                f"dim {self.dim}, its mask has {mask.numel()}"
            )
        return _scaled(output, module, self.dim, mask)


@dataclass(eq=False)
class NeuronPerturbation:
    """Forward hook of the search on one layer, after the mask's: the mask being learned, and
    the perturbations of the layer's weight (delta) and bias (xi) while `state["perturbed"]`
    (one dict shared by every layer's hook)."""

    dim: int
    mask: torch.Tensor
    noise: torch.Tensor
    noise_bias: torch.Tensor
    state: dict[str, bool]

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.state["perturbed"]:
            return _scaled(output, module, self.dim, self.mask + self.noise, 1.0 + self.noise_bias)
        return _scaled(output, module, self.dim, self.mask)


def mask_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each site's `anp_mask` buffer (1 kept, 0 pruned), by module name: the model's own tensors."""
    buffers = {}
    for site in neuron_sites(model):
        module = model.get_submodule(site.name)
        if MASK not in module._buffers:
            raise ConfigError("this model has no ANP masks: apply AdversarialNeuronPruning.prepare")
        buffers[site.name] = getattr(module, MASK)
    return buffers


@contextmanager
def perturbable(
    model: nn.Module, sites: Sequence[NeuronSite]
) -> Iterator[list[NeuronPerturbation]]:
    """Search hooks on every site (after the mask hook), removed on exit."""
    state: dict[str, bool] = {"perturbed": False}
    device = next(model.parameters()).device
    hooks = [
        NeuronPerturbation(s.dim, torch.ones(s.units, device=device),
                           torch.zeros(s.units, device=device),
                           torch.zeros(s.units, device=device), state)
        for s in sites
    ]  # fmt: skip
    handles = [
        model.get_submodule(site.name).register_forward_hook(hook)
        for site, hook in zip(sites, hooks, strict=True)
    ]
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


class AdversarialNeuronPruning:
    """Learn neuron masks under adversarial neuron perturbation on the clean subset, prune the
    neurons whose mask ends at or below `threshold`; no fine-tuning (see the module docstring)."""

    name = "anp"
    trains = TRAINS_MODEL

    def __init__(
        self,
        eps: float = 0.4,
        alpha: float = 0.2,
        steps: int = 1,
        lr: float = 0.2,
        threshold: float = 0.2,
        iterations: int | None = None,
    ) -> None:
        self.eps, self.alpha, self.steps, self.lr = eps, alpha, steps, lr
        self.threshold, self.iterations = threshold, iterations

    def prepare(self, model: nn.Module) -> nn.Module:
        """An all-ones `anp_mask` buffer and the masking hook on every site (once per model)."""
        for site in neuron_sites(model):
            module = model.get_submodule(site.name)
            if MASK not in module._buffers:
                device = next(model.parameters()).device
                module.register_buffer(MASK, torch.ones(site.units, device=device))
                module.register_forward_hook(NeuronMask(site.dim))
        return model

    def budget(self, split: TensorSplit | Dataset, cfg: ExperimentConfig) -> int:
        """The search's iterations: `iterations`, else `train.epochs` passes over `split`."""
        if self.iterations is not None:
            return self.iterations
        return cfg.train.epochs * math.ceil(len(split) / cfg.data.batch_size)  # type: ignore[arg-type]

    def search(
        self, model: nn.Module, split: TensorSplit | Dataset, cfg: ExperimentConfig
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The learned masks of a prepared model, one per site (in [0, 1]), on `split`; and the
        search's last pass's clean loss and accuracy (unperturbed, as trained)."""
        device = resolve_device(cfg.device)
        model.to(device)
        sites = neuron_sites(model)
        for buffer in mask_buffers(model).values():
            buffer.fill_(1.0)
        data = cfg.data
        loader = make_loader(split, data.batch_size, train=True, device=device, seed=cfg.seed,
                             crop_pad=data.augment.crop_pad, flip=data.augment.flip,
                             num_workers=data.num_workers, img_size=data.img_size)  # fmt: skip
        iterations = self.budget(split, cfg)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        done, epoch, last = 0, 0, {"loss": math.nan, "top1": math.nan}
        with perturbable(model, sites) as hooks, frozen_parameters(model), \
                batchnorm_statistics_kept(model):  # fmt: skip
            model.train()  # batch statistics, as the authors' mask training
            masks = [hook.mask.requires_grad_(True) for hook in hooks]
            noises = [t for hook in hooks for t in (hook.noise, hook.noise_bias)]
            optimizer = torch.optim.SGD(masks, lr=self.lr, momentum=0.9)
            while done < iterations:
                loader.set_epoch(epoch, 0)
                loss_sum, correct, seen = 0.0, 0, 0
                for batch in loader:
                    loss, logits = self.step(model, batch, hooks, noises, optimizer, generator)
                    loss_sum += float(loss) * len(batch.y)
                    correct += int((logits.argmax(1) == batch.y).sum())
                    seen += len(batch.y)
                    done += 1
                    if done == iterations:
                        break
                last = {"loss": loss_sum / seen, "top1": 100.0 * correct / seen}
                epoch += 1
            learned = [mask.detach().clone() for mask in masks]
        return learned, last

    def step(
        self,
        model: nn.Module,
        batch: Batch,
        hooks: list[NeuronPerturbation],
        noises: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration of the authors' `mask_train`: the neuron perturbation's ascent, then the
        masks' step on alpha x natural + (1 - alpha) x perturbed loss. Returns that loss and the
        unperturbed logits."""
        state = hooks[0].state
        loss_rob: torch.Tensor | float = 0.0
        if self.eps > 0:
            with torch.no_grad():
                for noise in noises:
                    noise.uniform_(-self.eps, self.eps, generator=generator)
            state["perturbed"] = True
            for noise in noises:
                noise.requires_grad_(True)
            for _ in range(self.steps):
                loss = -F.cross_entropy(model(batch.x).float(), batch.y)
                grads = torch.autograd.grad(loss, noises)
                with torch.no_grad():
                    for noise, grad in zip(noises, grads, strict=True):
                        noise.sub_(self.eps / self.steps * grad.sign())
            for noise in noises:
                noise.requires_grad_(False)
            loss_rob = F.cross_entropy(model(batch.x).float(), batch.y)
        state["perturbed"] = False
        logits = model(batch.x).float()
        loss = self.alpha * F.cross_entropy(logits, batch.y) + (1 - self.alpha) * loss_rob
        optimizer.zero_grad(set_to_none=True)
        masks = [hook.mask for hook in hooks]
        for mask, grad in zip(masks, torch.autograd.grad(loss, masks), strict=True):
            mask.grad = grad
        optimizer.step()
        with torch.no_grad():
            for mask in masks:
                mask.clamp_(0.0, 1.0)
        return loss.detach(), logits.detach()

    def prune(
        self, model: nn.Module, split: TensorSplit | Dataset, cfg: ExperimentConfig
    ) -> dict[str, Any]:
        """Search the masks on `split` and prune a prepared model: its `anp_mask` buffers are 0
        where the learned mask is <= `threshold`, 1 elsewhere. Returns what was done."""
        learned, last = self.search(model, split, cfg)
        buffers = mask_buffers(model)
        by_layer = {}
        for (name, buffer), mask in zip(buffers.items(), learned, strict=True):
            buffer.copy_((mask > self.threshold).to(buffer.dtype))
            by_layer[name] = int((buffer == 0).sum())
        values = torch.cat(learned)
        pruned = int((values <= self.threshold).sum())
        return {
            "neurons": values.numel(),
            "pruned": pruned,
            "ratio": pruned / values.numel(),
            "threshold": self.threshold,
            "iterations": self.budget(split, cfg),
            "pruned_by_layer": by_layer,
            "mask_mean": float(values.mean()),
            "search_loss": last["loss"],
            "search_top1": last["top1"],
        }

    def before_fit(
        self,
        model: nn.Module,
        clean: DataSplits,
        cfg: ExperimentConfig,
        run_dir: Path,
    ) -> dict[str, Any]:
        """Search and prune on the clean subset; what was done goes into metrics.json as `anp`."""
        return {"anp": self.prune(model, clean.train, cfg)}

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
        return PrunedEvaluation()


class PrunedEvaluation:
    """A task that trains nothing: the model's cross-entropy on the batch, in eval mode and
    without a graph, so the loop's epochs record the pruned model on the clean data and save it
    as it is (no weight has a gradient: the optimizer skips them all, weight decay included)."""

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with eval_mode(raw_model), torch.no_grad():
            logits = raw_model(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y)
        return loss.requires_grad_(True), logits  # a leaf: the loop's backward reaches nothing


@REPAIRERS.register("anp", repairs_pixel_prompts=False, needs_image_text=False)
def adversarial_neuron_pruning(
    eps: Annotated[float, Field(ge=0)] = 0.4,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.2,
    steps: Annotated[int, Field(gt=0)] = 1,
    lr: Annotated[float, Field(gt=0)] = 0.2,
    threshold: Annotated[float, Field(ge=0, lt=1)] = 0.2,
    iterations: Annotated[int, Field(gt=0)] | None = None,
) -> AdversarialNeuronPruning:
    """eps: the neuron perturbation's bound (relative to each weight and bias); alpha: the
    natural loss's weight beside the perturbed one; steps: the perturbation's ascent steps;
    lr: the masks' SGD learning rate (momentum 0.9); threshold: neurons whose mask ends at or
    below it are pruned; iterations: the search's mask steps (default: `train.epochs` passes over
    the clean subset; the authors': 2000). Defaults: Wu & Wang 2021's code."""
    return AdversarialNeuronPruning(eps, alpha, steps, lr, threshold, iterations)
