"""SimpleNet: the stem keeps small images big enough, and the custom-conv twin computes the same."""

from __future__ import annotations

import pytest
import torch

from vptlab.engine.checkpoint import save_model
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.models.custom_conv import CustomConv2d


def test_stem_stride_keeps_small_images_big_enough():
    tiny = create_model("simplenet", num_classes=10, img_size=8)
    mnist = create_model("simplenet", num_classes=10, img_size=28)
    assert tiny.net.features[0].stride == (1, 1)
    assert mnist.net.features[0].stride == (2, 2)
    assert tiny.forward_features(torch.rand(1, 3, 8, 8)).shape == (1, 192, 2, 2)
    assert mnist.forward_features(torch.rand(1, 3, 28, 28)).shape == (1, 192, 4, 4)
    forced = create_model("simplenet", num_classes=10, img_size=28, stem_stride=1)
    assert forced.forward_features(torch.rand(1, 3, 28, 28)).shape == (1, 192, 7, 7)


def test_customconv_twin_matches_torch_convolutions():
    torch.manual_seed(0)
    reference = create_model("simplenet", num_classes=10, img_size=28).eval()
    twin = create_model("simplenet-customconv", num_classes=10, img_size=28).eval()
    assert any(isinstance(m, CustomConv2d) for m in twin.modules())
    twin.load_state_dict(reference.state_dict())  # same keys: the conv is the only difference
    x = torch.rand(4, 3, 28, 28)
    torch.testing.assert_close(twin(x), reference(x), rtol=1e-4, atol=1e-5)


def test_pretrained_path_round_trip(tmp_path):
    model = create_model("simplenet", num_classes=10, img_size=28)
    save_model(model, tmp_path / "model.safetensors")
    path = str(tmp_path / "model.safetensors")
    again = create_model("simplenet", num_classes=10, img_size=28, pretrained=path, keep_head=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    with pytest.raises(ConfigError, match="no published weights"):
        create_model("simplenet", num_classes=10, pretrained=True)
