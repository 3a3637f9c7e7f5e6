"""Fine-pruning (`fp`, Liu et al. 2018): prune the units clean data leave dormant, then fine-tune.

A backdoor tends to live in units of the last feature layer that clean inputs barely activate and
the trigger switches on. The defense records each unit's mean absolute activation over the clean
subset, masks units to zero from the most dormant up, in steps of `step` x units, and stops before
the step whose clean accuracy (on the clean subset) falls more than `acc_drop` points below the
unpruned model's, or at `max_ratio` x units. Then the pruned model is fine-tuned on the same clean
data through the loop (the mask stays). The pruned count, the curve and the site go into the run's
metrics.json under `fine_pruning`.

Where it prunes (the model's `net`, timm's attribute names):
- ViTs (`blocks[-1].mlp`, ours and timm's): the hidden neurons of the last block's MLP, at the
  output of its activation (GELU outputs can be negative, hence absolute activations).
- CNNs: the channels of the last feature map, the output of `features` (SimpleNet, VGG-style),
  `layer4` (ResNets) or `stages` (timm's staged CNNs, NCHW); it has `net.num_features` channels.
Any other model is refused with a ConfigError that says so.

Units are masked, not cut out: a buffer `prune_mask` (1 kept, 0 pruned) on the site module and a
forward hook that multiplies the site's output by it. The buffer is in the state dict, so a saved
model round-trips: `prepare` puts back an all-ones mask and the hook, and loading fills the mask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import StreamLoader, TensorLoader, make_loader
from vptlab.defenses.features import has_intermediates
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL, backbone, clean_task
from vptlab.engine.loop import resolve_device
from vptlab.engine.tasks import Task
from vptlab.errors import ConfigError, VptlabError
from vptlab.metrics.accuracy import predict

MASK = "prune_mask"
CNN_SITES = ("features", "layer4", "stages")


class MaskOutput:
    """Forward hook: the module's output times its `prune_mask` along `dim`.

    Reads the mask from the module it is called with (no reference of its own), so a deep copy
    of the model masks with the copy's buffer.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        mask = getattr(module, MASK)
        if output.shape[self.dim] != mask.numel():
            raise VptlabError(
                f"fine-pruning: {type(module).__name__} outputs {output.shape[self.dim]} units "
                f"along dim {self.dim}, its mask has {mask.numel()}"
            )
        shape = [1] * output.ndim
        shape[self.dim] = -1
        return output * mask.view(shape).to(output.dtype)


def pruning_site(model: nn.Module) -> tuple[str, int, int]:
    """(module name in `model`, unit dimension of its output, number of units) where fp prunes."""
    net = backbone(model)
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
        mlp = getattr(blocks[-1], "mlp", None)
        if isinstance(getattr(mlp, "act", None), nn.Module) and hasattr(mlp, "fc1"):
            return f"net.blocks.{len(blocks) - 1}.mlp.act", -1, int(mlp.fc1.out_features)
    channels = getattr(net, "num_features", None)
    for name in CNN_SITES:
        if isinstance(getattr(net, name, None), nn.Module) and isinstance(channels, int):
            return f"net.{name}", 1, channels
    raise ConfigError(
        f"defense 'fp' cannot prune {type(net).__name__}: it prunes the last MLP of ViT blocks "
        f"or the last feature map of a CNN's {' / '.join(CNN_SITES)} (see fine_pruning.py)"
    )


def pruning_mask(model: nn.Module) -> torch.Tensor:
    """The mask buffer `prepare` added (1 kept, 0 pruned); the model's own tensor, not a copy."""
    name, _, _ = pruning_site(model)
    module = model.get_submodule(name)
    if MASK not in module._buffers:
        raise ConfigError("this model has no pruning mask: apply FinePruning.prepare first")
    return getattr(module, MASK)


def mean_activations(
    model: nn.Module, split: TensorSplit | Dataset, cfg: ExperimentConfig
) -> torch.Tensor:
    """Each unit's mean |activation| at the pruning site over `split`, in eval mode (float64).

    A CNN's last feature map is the last of `forward_intermediates` where the family provides
    it; a ViT's MLP hidden units (which it does not return) and the families without it are
    read by a forward hook on the site (defenses/features.py's fallback).
    """
    name, dim, units = pruning_site(model)
    device = next(model.parameters()).device
    total = torch.zeros(units, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)

    def record(output: torch.Tensor) -> None:
        nonlocal count
        a = output.detach().double().abs().movedim(dim, -1).reshape(-1, units)
        total.add_(a.sum(0))
        count = count + a.shape[0]

    loader = _eval_loader(split, cfg, device)
    from_intermediates = dim == 1 and has_intermediates(model)
    handle = None
    if not from_intermediates:
        handle = model.get_submodule(name).register_forward_hook(
            lambda module, args, output: record(output)
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if from_intermediates:
                    last = model.forward_intermediates(batch.x, indices=1,
                                                       intermediates_only=True)[-1]  # fmt: skip
                    if last.ndim != 4 or last.shape[1] != units:
                        raise VptlabError(
                            f"fine-pruning: the last intermediate of {type(model).__name__} has "
                            f"shape {tuple(last.shape)}, not the {units} channels of {name}"
                        )
                    record(last)
                else:
                    model(batch.x)
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    return (total / count).cpu()


def _eval_loader(
    split: TensorSplit | Dataset, cfg: ExperimentConfig, device: torch.device
) -> TensorLoader | StreamLoader:
    data = cfg.data
    return make_loader(split, data.eval_batch_size, train=False, device=device, seed=cfg.seed,
                       num_workers=data.num_workers, img_size=data.img_size)  # fmt: skip


class FinePruning:
    """Prune the most dormant last-layer units on clean data (within `max_ratio` and `acc_drop`),
    then fine-tune. See the module docstring for the sites and the mask."""

    name = "fp"
    trains = TRAINS_MODEL

    def __init__(self, max_ratio: float = 0.8, acc_drop: float = 4.0, step: float = 0.05) -> None:
        self.max_ratio, self.acc_drop, self.step = max_ratio, acc_drop, step

    def prepare(self, model: nn.Module) -> nn.Module:
        """An all-ones `prune_mask` buffer and the masking hook on the site (once per model)."""
        name, dim, units = pruning_site(model)
        module = model.get_submodule(name)
        if MASK not in module._buffers:
            device = next(model.parameters()).device
            module.register_buffer(MASK, torch.ones(units, device=device))
            module.register_forward_hook(MaskOutput(dim))
        return model

    def prune(
        self, model: nn.Module, split: TensorSplit | Dataset, cfg: ExperimentConfig
    ) -> dict[str, Any]:
        """Set the mask of a prepared model: the most dormant units first, in steps, while the
        clean accuracy on `split` stays within `acc_drop` points. Returns what was done."""
        device = resolve_device(cfg.device)
        model.to(device)
        mask = pruning_mask(model)  # after the move: `to` replaces the buffer's tensor
        mask.fill_(1.0)
        activation = mean_activations(model, split, cfg)
        order = torch.argsort(activation, stable=True).to(mask.device)  # most dormant first
        units = mask.numel()
        loader = _eval_loader(split, cfg, device)

        def set_pruned(count: int) -> None:
            mask.fill_(1.0)
            mask[order[:count]] = 0.0

        def accuracy(count: int) -> float:
            set_pruned(count)
            return predict(model, loader).summary()["top1"]

        limit = math.floor(self.max_ratio * units)
        stride = max(1, math.ceil(self.step * units))
        counts = list(range(stride, limit + 1, stride))
        if limit > 0 and (not counts or counts[-1] != limit):
            counts.append(limit)
        base = accuracy(0)
        curve, pruned, kept_acc = [[0, base]], 0, base
        for count in counts:
            acc = accuracy(count)
            curve.append([count, acc])
            if base - acc > self.acc_drop:
                break
            pruned, kept_acc = count, acc
        set_pruned(pruned)
        return {
            "site": pruning_site(model)[0],
            "units": units,
            "pruned": pruned,
            "ratio": pruned / units,
            "clean_top1_before": base,
            "clean_top1_pruned": kept_acc,
            "curve": curve,
        }

    def before_fit(
        self,
        model: nn.Module,
        clean: DataSplits,
        cfg: ExperimentConfig,
        run_dir: Path,
    ) -> dict[str, Any]:
        """Prune on the clean subset; what was done goes into metrics.json as `fine_pruning`."""
        return {"fine_pruning": self.prune(model, clean.train, cfg)}

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
        return clean_task(model, clean, cfg)  # fine-tuning, the mask kept


@REPAIRERS.register("fp", repairs_pixel_prompts=False, needs_image_text=False)
def fine_pruning(
    max_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.8,
    acc_drop: Annotated[float, Field(ge=0, le=100)] = 4.0,
    step: Annotated[float, Field(gt=0, le=1)] = 0.05,
) -> FinePruning:
    """max_ratio: the most units pruned, as a share; acc_drop: the clean top-1 points (on the
    clean subset) pruning may cost (Liu et al.: 4); step: the share of units pruned per step."""
    return FinePruning(max_ratio=max_ratio, acc_drop=acc_drop, step=step)
