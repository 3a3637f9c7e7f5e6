"""Intermediate features for feature-based repairers (NAD, fine-pruning), in one place.

The way in is the model's `forward_intermediates` (timm's signature; `ImageClassifier` and the
prompt wrappers forward it to the net). `LayerOutputs` is the fallback for model families that
do not provide it yet, and for layers it does not return (a ViT block's MLP hidden units, a
module a user names): forward hooks on named modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vptlab.errors import ConfigError

# Module names of the blocks whose outputs `forward_intermediates` returns, by index: a ViT's
# `blocks` (ours, timm's, under a prompt adapter's `net`) and open_clip's image tower.
_BLOCK = re.compile(r"^net\.(?:blocks|clip\.visual\.transformer\.resblocks)\.(\d+)$")


def has_intermediates(model: nn.Module) -> bool:
    """Whether `model`'s family provides `forward_intermediates` (its net does)."""
    net = getattr(model, "net", None)
    if net is None:  # a wrapper (prompted input): ask what it wraps
        inner = getattr(model, "model", None)
        return inner is not None and has_intermediates(inner)
    return callable(getattr(net, "forward_intermediates", None))


def block_indices(model: nn.Module, layers: Sequence[str]) -> list[int] | None:
    """The `forward_intermediates` indices of `layers` when every one is a block it returns (in
    increasing order, as it returns them), else None: those layers need `LayerOutputs`."""
    if not has_intermediates(model):
        return None
    found = [_BLOCK.match(name) for name in layers]
    if not all(found):
        return None
    indices = [int(m.group(1)) for m in found if m is not None]
    return indices if indices == sorted(set(indices)) else None


def intermediates(model: nn.Module, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """The outputs of blocks `indices` on `x`: patch tokens (B, N, D) for a ViT (class and prompt
    tokens left out), through `forward_intermediates`."""
    return list(
        model.forward_intermediates(
            x, indices=list(indices), output_fmt="NLC", intermediates_only=True
        )
    )


class LayerOutputs:
    """Forward hooks that keep the outputs of the named modules of `model`; `take()` hands over
    those of the last forward. Also a context manager that removes its hooks on exit.

    The fallback of `intermediates` (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        check_layers(model, layers)
        self.layers = list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            modules[name].register_forward_hook(self._keeper(name)) for name in self.layers
        ]

    def _keeper(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return keep

    def take(self) -> list[torch.Tensor]:
        missing = [name for name in self.layers if name not in self.outputs]
        if missing:
            raise ConfigError(f"defense.options.layers: {missing[0]} did not run in the forward")
        return [self.outputs.pop(name) for name in self.layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs.clear()

    def __enter__(self) -> LayerOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    names = {name for name, _ in model.named_modules()}
    for layer in layers:
        if layer not in names:
            raise ConfigError(
                f"defense.options.layers: the model has no module {layer!r}; give names as in "
                "model.named_modules() (e.g. net.features.9, net.blocks.2)"
            )


def layer_features(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """The outputs of `layers` (module names) on `x`: through `forward_intermediates` where the
    family provides those layers, else through `LayerOutputs` (one forward of `model`)."""
    indices = block_indices(model, layers)
    if indices is not None:
        return intermediates(model, x, indices)
    with LayerOutputs(model, layers) as capture:
        model(x)
        return capture.take()
