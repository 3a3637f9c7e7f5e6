"""CLIP models as classifiers: shapes, the zero-shot head, local checkpoints, open_clip's path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vptlab.engine.checkpoint import save_model
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.models.clip import CLIPNet, clip_net

TINY = dict(img_size=16, layers=1, text_layers=1, width=32, text_width=32, embed_dim=16)
CLASSES = ["zero", "one", "two"]


def _tiny(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("clip-tiny", num_classes=3, **{**TINY, **kwargs}).eval()


def test_clip_tiny_is_a_classifier_with_text_tower() -> None:
    model = _tiny()
    net = clip_net(model)
    x = torch.rand(2, 3, 16, 16)
    net.set_zero_shot_head(CLASSES, ["a photo of the digit {}."])
    logits = model(x)
    assert logits.shape == (2, 3)
    tokens = net.tokenize(["a handwritten 7", "seven"])
    assert tokens.shape == (2, net.context_length) and tokens.dtype == torch.int64
    image, text, scale = model(x, text=tokens)
    assert image.shape == text.shape == (2, 16)
    assert torch.allclose(image.norm(dim=1), torch.ones(2), atol=1e-5)
    # Zero-shot logits are the scaled cosines with the class embeddings.
    weight = net.class_embeddings(CLASSES, ["a photo of the digit {}."])
    expected = scale * image @ weight.T
    assert torch.allclose(logits, expected, atol=1e-4)
    assert float(net.scale().detach()) <= 100.0 + 1e-4


def test_logit_scale_is_clamped_to_100() -> None:
    net = clip_net(_tiny())
    with torch.no_grad():
        net.logit_scale.fill_(10.0)
    assert abs(float(net.scale().detach()) - 100.0) < 1e-3


def test_template_without_a_slot_is_refused() -> None:
    with pytest.raises(ConfigError, match="one '\\{\\}'"):
        clip_net(_tiny()).set_zero_shot_head(CLASSES, ["a photo"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trips(tmp_path: Path, suffix: str) -> None:
    model = _tiny()
    clip_net(model).set_zero_shot_head(CLASSES)
    x = torch.rand(2, 3, 16, 16)
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":  # a run's own model file (keys net.clip.*, net.head.*)
        save_model(model, path)
    else:  # open_clip's own state dict, as its training script saves it
        torch.save({"state_dict": clip_net(model).clip.state_dict()}, path)
    torch.manual_seed(1)  # another init: only the file can make the outputs equal
    loaded = create_model("clip-tiny", num_classes=3, pretrained=str(path), **TINY).eval()
    clip_net(loaded).set_zero_shot_head(CLASSES)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    tokens = clip_net(model).tokenize(["a seven"])
    assert torch.allclose(clip_net(loaded).encode_text(tokens), clip_net(model).encode_text(tokens))


def test_checkpoint_of_another_shape_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({f"clip.{k}": v.contiguous() for k, v in clip_net(_tiny()).clip.state_dict().items()},
              str(path))  # fmt: skip
    with pytest.raises(ConfigError, match="do not fit the model.*shape"):
        create_model("clip-tiny", num_classes=3, pretrained=str(path), **{**TINY, "width": 64})


def test_named_architecture_goes_through_open_clip_with_its_tag(monkeypatch) -> None:
    import open_clip

    calls = []
    tiny = clip_net(_tiny()).clip

    def fake_create_model(arch: str, pretrained: str | None = None, **kwargs: object):
        calls.append((arch, pretrained))
        return tiny  # no download in tests: the tag is what open_clip would fetch

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    model = create_model("clip", num_classes=3, img_size=16, pretrained=True, arch="RN50")
    assert calls == [("RN50", "openai")]
    assert isinstance(model.net, CLIPNet)
    create_model("clip", num_classes=3, img_size=16, pretrained=True, arch="RN50", tag="cc12m")
    assert calls[-1] == ("RN50", "cc12m")
    with pytest.raises(ConfigError, match="no architecture"):
        create_model("clip", num_classes=3, arch="ViT-Z-99")
    with pytest.raises(ConfigError, match="tag needs model.pretrained"):
        create_model("clip", num_classes=3, arch="RN50", tag="openai")


def test_intermediates_of_the_image_tower_and_nad_layers() -> None:
    from vptlab.defenses.nad import default_layers, patch_count
    from vptlab.defenses.prompt_defense import prompted_input

    model = _tiny(layers=3, patch_size=4)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        final, grids = model.forward_intermediates(x)
        tokens = model.forward_intermediates(
            x, indices=[1], output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        torch.testing.assert_close(final, model.forward_features(x))
    assert [g.shape for g in grids] == [(2, 32, 4, 4)] * 3
    ((patches, prefix),) = tokens
    assert patches.shape == (2, 16, 32) and prefix.shape == (2, 1, 32)
    torch.testing.assert_close(patches, grids[1].flatten(2).transpose(1, 2))
    # NAD's layers: the last three blocks (average pooling: every block's patches reach the
    # embedding), and the tower's patch count; a defensive prompt around it still finds the net.
    assert default_layers(model) == [
        f"net.clip.visual.transformer.resblocks.{i}" for i in (0, 1, 2)
    ]
    assert default_layers(_tiny(layers=3, pool="tok"))[-1].endswith("resblocks.1")
    assert patch_count(model) == 16
    assert clip_net(prompted_input(model, 16)) is model.net
