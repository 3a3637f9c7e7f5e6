"""Every registered model honours the model contract: (B,3,H,W) in [0,1] in, logits out,
timm's forward_features / forward_head split, a classifier for linear probing, gradients, and
timm's `forward_intermediates` (final features that feed the head, per-block maps, timm's
`indices`, a gradient to the input), prompted (VPT tokens, a pixel prompt) or not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vptlab.config import PixelConfig, PromptConfig
from vptlab.errors import ConfigError, DataError, RegistryError
from vptlab.models import MODELS, ImageClassifier, create_model, list_models
from vptlab.prompts.adapt import adapt, add_prompts

NUM_CLASSES = 5
IMG_SIZE = 32


def small_kwargs(name: str) -> dict:
    """Fewer blocks for the big timm models, so each runs in a fraction of a second on CPU; the
    widths, and so every tensor shape a checkpoint has, stay theirs."""
    kwargs: dict = {}
    if name.startswith("vit"):
        kwargs["patch_size"] = 4
    if name.startswith("vit_"):
        kwargs["depth"] = 1
    if name.startswith("tiny_vit_"):
        kwargs["depths"] = (1, 1, 1, 1)
    if name == "preact-resnet18":
        kwargs["blocks"] = (1, 1, 1, 1)
    return kwargs


# Image-text models classify through a fixed zero-shot head, not a trained nn.Linear; their own
# contract is tested in tests/clip.
IMAGE_TEXT = ("clip", "clip-tiny")


@pytest.mark.parametrize("name", [n for n in list_models() if n not in IMAGE_TEXT])
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, img_size=IMG_SIZE, **small_kwargs(name))
    assert isinstance(model, ImageClassifier)
    assert list(model.children())[0] is model.normalize
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    # Normalization constants are not trained and not saved.
    assert not any(k.startswith("normalize.") for k in model.state_dict())
    x = torch.rand(2, 3, IMG_SIZE, IMG_SIZE, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained[-2:])

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
        pooled = model.forward_head(features, pre_logits=True)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert classifier.out_features == NUM_CLASSES
    assert pooled.shape == (2, classifier.in_features)


def test_unknown_name_lists_the_choices():
    with pytest.raises(RegistryError, match="unknown model 'resnet9000'") as info:
        create_model("resnet9000", num_classes=10)
    assert "vit-scratch" in str(info.value) and "simplenet" in str(info.value)


def test_unknown_option_names_the_options():
    unknown = r"model\.options\.patch_sise: unknown option; model 'vit-scratch' takes: .*patch_size"
    with pytest.raises(ConfigError, match=unknown):
        create_model("vit-scratch", num_classes=10, img_size=28, patch_sise=7)
    mistyped = r"model\.options\.depth: Input should be a valid integer"
    with pytest.raises(ConfigError, match=mistyped):
        create_model("vit-scratch", num_classes=10, img_size=28, depth="two")
    with pytest.raises(ConfigError, match="timm cannot build"):
        create_model("tf_efficientnet_lite0", num_classes=10, img_size=32, depth=3)


def test_other_timm_names_go_through_timm():
    model = create_model("resnet10t", num_classes=3, img_size=32).eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 4, 32, 32), (3, 32, 32)])
def test_wrong_input_shape_is_a_clear_error(shape):
    model = create_model("simplenet", num_classes=3, img_size=32)
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(shape))


# The registry's own small settings, plus a small image-text tower for `clip` (ViT-B-32 by
# default: the same code path, 30 times the parameters).
TINY_CLIP = {"arch": "ViT-S-32"}


def tiny_model(name: str) -> torch.nn.Module:
    kwargs = {**small_kwargs(name), **(TINY_CLIP if name == "clip" else {})}
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, img_size=IMG_SIZE, **kwargs).eval()


def check_intermediates(model: torch.nn.Module) -> None:
    x = torch.rand(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert maps
        for m in maps:
            assert m.ndim == 4 and m.shape[0] == 2 and m.shape[-1] <= IMG_SIZE
        # The final features are forward_features' own: they feed the head to the logits.
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(final), model(x))
        # timm's indices: an int is the last n, a list those blocks (negatives from the end).
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1
        torch.testing.assert_close(last[0], maps[-1])
        picked = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
        torch.testing.assert_close(picked, [maps[0], maps[-1]] if len(maps) > 1 else maps)
        early = model.forward_intermediates(x, indices=[0], stop_early=True)[1]
        torch.testing.assert_close(early, [maps[0]])
    # The input's gradient flows through every block the maps come from.
    x.requires_grad_(True)
    maps = model.forward_intermediates(x, intermediates_only=True)
    sum(m.float().pow(2).mean() for m in maps).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_has_forward_intermediates(name: str) -> None:
    check_intermediates(tiny_model(name))


def test_a_cnn_stage_map_feeds_the_head() -> None:
    # SimpleNet has no norm after its last stage: its last map is what the head pools.
    model = tiny_model("simplenet")
    x = torch.rand(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert [m.shape[1] for m in maps] == [64, 64, 192]
        torch.testing.assert_close(model.forward_head(maps[-1]), model(x))


@pytest.mark.parametrize("name", ["vit-scratch", "vit-tiny-test", "clip-tiny", "tiny_vit_5m_224"])
def test_prompted_models_keep_forward_intermediates(name: str) -> None:
    plain = tiny_model(name)
    shapes = [m.shape for m in plain.forward_intermediates(
        torch.rand(2, 3, IMG_SIZE, IMG_SIZE), intermediates_only=True)]  # fmt: skip
    prompted = adapt(
        plain, "full" if name == "clip-tiny" else "prompt", PromptConfig(num_prompts=3)
    )
    if name == "clip-tiny":  # image-text models take token prompts in their image tower only
        add_prompts(prompted.net.clip.visual, PromptConfig(num_prompts=3))
    prompted.eval()
    check_intermediates(prompted)
    got = prompted.forward_intermediates(
        torch.rand(2, 3, IMG_SIZE, IMG_SIZE), intermediates_only=True
    )
    assert [m.shape for m in got] == shapes  # prompt tokens never reach the maps


def test_pixel_prompted_model_keeps_forward_intermediates() -> None:
    pixel = PixelConfig(size=4, source_classes=NUM_CLASSES)
    model = adapt(tiny_model("simplenet"), "pixel", pixel=pixel, num_classes=3, img_size=IMG_SIZE)
    check_intermediates(model.eval())
