"""Models by name: `create_model("vit-scratch", num_classes=10, img_size=28)` returns an
`ImageClassifier` that takes (B,3,H,W) pixels in [0,1] and returns logits.

Our own models (simplenet, vit-scratch), open_clip's image-text models (clip, clip-tiny: zero-shot
classifiers, see clip.py) and a list of timm models are registered in `MODELS`; any other name
timm knows is built through the same timm path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vptlab.errors import DataError, RegistryError
from vptlab.models.base import ImageClassifier
from vptlab.models.pretrained import file_sha256
from vptlab.registry import Registry, check_factory_options, import_plugins

MODELS = Registry[nn.Module]("model")
# Parameters the engine passes to the factories itself, and where a user sets them instead.
MODEL_SUPPLIED = {
    "num_classes": "it comes from the dataset",
    "img_size": "set it as data.img_size",
    "pretrained": "set it as model.pretrained",
    "keep_head": "set it as model.keep_head",
}


def _check_pixels(module: nn.Module, args: tuple[Any, ...]) -> None:
    # Normalize would broadcast a (B,1,H,W) batch into 3 channels and fail on others with an
    # opaque shape error; the contract is (B,3,H,W), so say so before anything runs.
    x = args[0]
    channels = module.mean.shape[1]
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"models take (B, {channels}, H, W) pixels in [0, 1], got {shape}; "
            "repeat gray images to 3 channels in the dataset"
        )


def build_classifier(
    net: nn.Module, mean: Sequence[float], std: Sequence[float]
) -> ImageClassifier:
    """`ImageClassifier(net, mean, std)` whose input shape is checked before normalization."""
    model = ImageClassifier(net, mean, std)
    model.normalize.register_forward_pre_hook(_check_pixels)
    return model


def create_model(
    name: str,
    num_classes: int,
    img_size: int = 224,
    pretrained: bool | str = False,
    keep_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build model `name`; extra keyword arguments go to that model's factory (e.g. `depth=2`).

    pretrained: False, True (published weights) or a weights file. Published weights keep their
    classifier when `num_classes` is its class count and get a fresh one otherwise (timm's
    convention); a weights file's classifier is kept only with `keep_head` (then it must have
    `num_classes` outputs): a backbone trained on another of our datasets orders its classes its
    own way, even when the counts match.
    """
    if name in MODELS:
        factory = MODELS.get(name)
    elif _timm_knows(name):
        factory = timm_models.timm_factory(name)
    else:
        raise RegistryError(
            f"unknown model '{name}'; choose from: {', '.join(list_models())} "
            "(or any name in timm.list_models())"
        )
    _check_kwargs(name, factory, kwargs)
    model = factory(
        num_classes=num_classes,
        img_size=img_size,
        pretrained=pretrained,
        keep_head=keep_head,
        **kwargs,
    )
    if pretrained and isinstance(pretrained, str | Path) and isinstance(model, ImageClassifier):
        model.backbone_file, model.backbone_sha256 = str(pretrained), file_sha256(pretrained)
    return model


def _check_kwargs(name: str, factory: Any, kwargs: dict[str, Any]) -> None:
    # A misspelt or mistyped option should name its key, not surface as a TypeError deep in a
    # factory. The same check runs when a config is built; this one covers direct callers.
    # Factories taking **kwargs (timm models) get the rest judged by timm.
    check_factory_options(
        factory, kwargs, where="model.options", owner=f"model '{name}'", supplied=MODEL_SUPPLIED
    )


def list_models() -> list[str]:
    """Names registered here (timm's other models are reachable too, but not listed)."""
    return MODELS.names()


def _timm_knows(name: str) -> bool:
    # is_model also accepts names with a pretrained tag, e.g. "vit_base_patch16_224.augreg_in1k".
    return timm.is_model(name)


# Imported last: each submodule registers its models into MODELS defined above.
from vptlab.models import clip, simplenet, timm_models, vit_scratch  # noqa: E402

# Every module registers its plug-ins on import: a new file here is found without an edit.
import_plugins(__name__, __path__)

__all__ = [
    "MODELS",
    "ImageClassifier",
    "build_classifier",
    "clip",
    "create_model",
    "list_models",
    "simplenet",
    "timm_models",
    "vit_scratch",
]
