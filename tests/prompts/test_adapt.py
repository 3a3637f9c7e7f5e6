"""Adaptation modes: what trains, what stays bit-identical, prompt checkpoints, a learning check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.engine.checkpoint import load_model, save_model
from vptlab.errors import ConfigError
from vptlab.models import create_model, list_models
from vptlab.models.base import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier
from vptlab.prompts import (
    ADAPT_MODES,
    AdaptedClassifier,
    PromptConfig,
    adapt,
    count_parameters,
    find_prompt_adapter,
    prompt_parameters,
)
from vptlab.steps.resolve import resolved

# Registered models too slow to build in every test run (ViT-B is built once in test_vpt.py).
HEAVY = {"vit_base_patch16_224", "vit_small_patch16_224", "tiny_vit_11m_224", "tiny_vit_21m_224"}
# Image-text models adapt in modes full, linear and pixel through build_model (tests/clip).
IMAGE_TEXT = {"clip", "clip-tiny"}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(
    model: nn.Module, kind: str, images: Callable[..., torch.Tensor], steps: int = 3
) -> None:
    # Every parameter goes to the optimizer, with weight decay: frozen ones must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model.train()
    for step in range(steps):
        x, y = images(kind, n=8, seed=step), torch.arange(8) % 10
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def trainable_names(model: nn.Module) -> set[str]:
    return {k for k, p in model.named_parameters() if p.requires_grad}


def head_names(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    return {k for k, p in model.named_parameters() if any(p is q for q in head.parameters())}


def test_unknown_mode_lists_the_modes(tiny_vit) -> None:
    with pytest.raises(ConfigError, match="prompt, linear, full, prompt\\+full.*'lora'"):
        adapt(tiny_vit(), "lora")


def test_prompt_mode_needs_a_vit_or_tinyvit() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match="Sequential.*'linear' or 'full'"):
        adapt(ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD), "prompt")


def test_adapting_twice_is_refused(tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt")
    with pytest.raises(ConfigError, match="already adapted"):
        adapt(model, "prompt")


@pytest.mark.parametrize("bad", [{"num_prompts": -1}, {"dropout": 1.0}])
def test_prompt_config_is_validated(bad: dict) -> None:
    with pytest.raises(ConfigError, match=f"adapt.prompt.{next(iter(bad))}"):
        resolved({"adapt": {"prompt": bad}})


# pixel wraps the model instead (PixelPrompted): tests/prompts/test_pixel.py.
@pytest.mark.parametrize("mode", [m for m in ADAPT_MODES if m != "pixel"])
def test_what_each_mode_trains(kind: str, mode: str, builders) -> None:
    model = adapt(builders[kind](), mode, PromptConfig(num_prompts=3))
    assert isinstance(model, AdaptedClassifier) and isinstance(model, ImageClassifier)
    prompt_ids = {id(p) for p in prompt_parameters(model)}
    prompts = {k for k, p in model.named_parameters() if id(p) in prompt_ids}
    assert bool(prompts) == ("prompt" in mode)
    expected = {
        "prompt": prompts | head_names(model),
        "linear": head_names(model),
        "full": {k for k, _ in model.named_parameters()},
        "prompt+full": {k for k, _ in model.named_parameters()},
    }[mode]
    assert trainable_names(model) == expected
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for k, p in model.named_parameters() if k in expected)
    assert total == sum(p.numel() for p in model.parameters())


def test_prompted_state_dict_keeps_the_backbone_keys(kind: str, builders) -> None:
    base_keys = set(builders[kind]().state_dict())
    model = adapt(builders[kind](), "prompt+full", PromptConfig(num_prompts=3))
    extra = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict())
    assert extra and all("prompt" in k for k in extra)


@pytest.mark.parametrize("mode", ["prompt", "linear"])
def test_frozen_backbone_stays_bit_identical(kind: str, mode: str, builders, images) -> None:
    model = adapt(builders[kind](drop_rate=0.2), mode, PromptConfig(num_prompts=3, dropout=0.1))
    before = snapshot(model)
    train_steps(model, kind, images)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable_names(model)  # prompts and head moved; weights AND buffers did not
    if kind == "tinyvit":  # BatchNorm statistics are among the buffers checked
        assert any(k.endswith("running_mean") for k in before)


def test_train_mode_keeps_the_frozen_backbone_in_eval(kind: str, builders) -> None:
    model = adapt(builders[kind](), "prompt", PromptConfig(num_prompts=3, dropout=0.1)).train()
    assert model.training and model.get_classifier().training
    owners = [m for m in model.net.modules() if any(p.requires_grad for p in m.parameters(False))]
    training = {id(c) for m in owners for c in m.modules()}  # prompt holders with their dropout
    assert any(isinstance(m, nn.Dropout) for o in owners for m in o.modules())
    for m in model.net.modules():
        assert m.training == (id(m) in training), m
    model.eval()
    assert not any(m.training for m in model.modules())
    full = adapt(builders[kind](), "full").train()
    assert all(m.training for m in full.modules())  # full fine-tuning keeps dropout, BN updates


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompt_checkpoint_round_trips_onto_a_fresh_backbone(
    kind: str, deep: bool, tmp_path, builders, images
) -> None:
    cfg = PromptConfig(num_prompts=3, deep=deep)
    model = adapt(builders[kind](seed=0), "prompt", cfg)
    train_steps(model, kind, images, steps=2)
    path = tmp_path / "prompts.safetensors"
    save_model(model, path, trainable_only=True)

    fresh = adapt(builders[kind](seed=0), "prompt", cfg)  # same backbone, other prompts and head
    x = images(kind)
    assert not torch.equal(fresh.eval()(x), model.eval()(x))
    load_model(fresh, path)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x.clamp(0, 1), torch.tensor(data.target[:n])


def test_prompt_tuning_learns_digits_on_a_frozen_random_vit(tiny_vit) -> None:
    x, y = digits(512)
    # timm's default init (std 0.02) leaves a random ViT's cls output nearly input-independent;
    # 'jax' init (Xavier, zero head) gives features a head can use, and a start loss of ln(10).
    net = dict(img_size=16, depth=2, weight_init="jax")
    model = adapt(tiny_vit(**net), "prompt", PromptConfig(num_prompts=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model.eval()(x), y).item()

    start = loss()
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(50):
        idx = torch.randint(len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert loss() < 0.8 * start


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY | IMAGE_TEXT])
def test_every_registered_model_adapts(name: str, images) -> None:
    """Prompts where the net is a ViT or TinyViT (zero prompts: the base logits), else a clear
    ConfigError; linear probing everywhere."""
    torch.manual_seed(0)
    base = create_model(name, num_classes=10, img_size=32).eval()
    x = images("vit")  # 32 px
    expected = base(x)
    if find_prompt_adapter(base.net) is not None:
        model = adapt(base, "prompt", PromptConfig(num_prompts=0)).eval()
        assert torch.equal(model(x), expected)
        torch.manual_seed(0)
        model = adapt(create_model(name, num_classes=10, img_size=32), "prompt")
        model(x).sum().backward()
        assert all(p.grad.abs().sum() > 0 for p in prompt_parameters(model))
    else:
        with pytest.raises(ConfigError, match="'linear' or 'full'"):
            adapt(base, "prompt")
        model = adapt(base, "linear")
        assert trainable_names(model) == head_names(model)
