"""Every registered model honours the model contract: (B,3,H,W) in [0,1] in, logits out,
timm's forward_features / forward_head split, a classifier for linear probing, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vptlab.errors import ConfigError, DataError, RegistryError
from vptlab.models import ImageClassifier, create_model, list_models

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
