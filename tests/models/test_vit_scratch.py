"""Our ViT: hand-written attention equals SDPA, and the module follows timm's VisionTransformer
closely enough that timm's weights load into it and give the same tokens."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.errors import ConfigError, DataError
from vptlab.models import create_model
from vptlab.models.vit_scratch import attention


def test_hand_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 17, 16).unbind(0)
    torch.testing.assert_close(
        attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5
    )


def test_whole_model_same_with_and_without_sdpa():
    torch.manual_seed(0)
    model = create_model("vit-scratch", num_classes=10, img_size=28).eval()
    x = torch.rand(4, 3, 28, 28)
    with torch.no_grad():
        model.net.use_sdpa = True
        fused = model(x)
        model.net.use_sdpa = False
        assert not any(block.attn.use_sdpa for block in model.net.blocks)
        manual = model(x)
    torch.testing.assert_close(manual, fused, rtol=1e-5, atol=1e-5)


def test_timm_attribute_contract():
    net = create_model("vit-scratch", num_classes=10, img_size=28).net
    assert net.patch_embed.patch_size == (4, 4)
    assert net.patch_embed.grid_size == (7, 7) and net.patch_embed.num_patches == 49
    assert net.cls_token.shape == (1, 1, 64)
    assert net.pos_embed.shape == (1, 50, 64)
    assert net.num_prefix_tokens == 1 and net.embed_dim == 64 and net.global_pool == "token"
    assert isinstance(net.blocks, nn.Sequential) and len(net.blocks) == 4
    assert isinstance(net.norm_pre, nn.Identity)
    assert net.get_classifier() is net.head

    x = torch.rand(2, 3, 28, 28)
    tokens = net.forward_features(x)
    assert tokens.shape == (2, 50, 64)
    assert net.blocks[0](tokens).shape == tokens.shape
    torch.testing.assert_close(net.forward_head(tokens, pre_logits=True), tokens[:, 0])
    net.global_pool = "avg"
    torch.testing.assert_close(net.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))


def test_same_tokens_as_timm_vision_transformer():
    # Same names and semantics: timm's ViT state dict loads as is, and the outputs agree.
    torch.manual_seed(0)
    ours = create_model("vit-scratch", num_classes=10, img_size=28, depth=2).net.eval()
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0
    ).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x))
        torch.testing.assert_close(ours(x), reference(x))


def test_init_is_small_truncated_normal():
    net = create_model("vit-scratch", num_classes=10, img_size=28).net
    # timm's trunc_normal_ cuts at +-2 absolute, i.e. effectively a normal with std 0.02.
    assert net.pos_embed.detach().std().item() == pytest.approx(0.02, rel=0.2)
    assert net.cls_token.detach().abs().max() < 1e-4
    assert net.blocks[0].attn.qkv.weight.detach().std().item() == pytest.approx(0.02, rel=0.2)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        create_model("vit-scratch", num_classes=10, img_size=30)
    with pytest.raises(ConfigError, match="multiple of model.num_heads"):
        create_model("vit-scratch", num_classes=10, img_size=28, embed_dim=30)
    model = create_model("vit-scratch", num_classes=10, img_size=28)
    with pytest.raises(DataError, match="28x28"):
        model(torch.rand(1, 3, 32, 32))


def test_pretrained_path_is_repatched(tmp_path):
    from safetensors.torch import save_file

    source = create_model("vit-scratch", num_classes=10, img_size=32, patch_size=8).net
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors"
    )
    model = create_model(
        "vit-scratch",
        num_classes=3,
        img_size=32,
        patch_size=4,
        pretrained=str(tmp_path / "w.safetensors"),
    )
    assert model.net.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(model.net.cls_token, source.cls_token)
    torch.testing.assert_close(model.net.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_forward_intermediates_match_timm():
    # timm's signature and results on the same weights: defenses written for timm ViTs run on ours.
    torch.manual_seed(0)
    ours = create_model("vit-scratch", num_classes=10, img_size=28, depth=3).net.eval()
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, num_classes=10, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0
    ).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 28, 28)
    calls = [
        dict(),
        dict(indices=2, norm=True, output_fmt="NLC", return_prefix_tokens=True),
        dict(indices=[0], stop_early=True, intermediates_only=True),
    ]
    with torch.no_grad():
        for kwargs in calls:
            expected = reference.forward_intermediates(x, **kwargs)
            torch.testing.assert_close(ours.forward_intermediates(x, **kwargs), expected)
    final, intermediates = ours.forward_intermediates(x)
    assert final.shape == (2, 50, 64) and [t.shape for t in intermediates] == [(2, 64, 7, 7)] * 3
