"""Prompted models keep timm's `forward_intermediates` (the hook of NAD and fine-pruning) and
their pre-norm: prompts are tokens like the patch tokens, and never show in what blocks hand on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from vptlab.models import create_model
from vptlab.models.base import ImageClassifier
from vptlab.prompts import PromptConfig, adapt, prompt_parameters

TOKENS, DIM = 64, 32  # tiny_vit: 32x32 px, patch 4 -> 8x8 patch tokens of width 32


def scratch_vit(seed: int = 0, **kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    opts = dict(embed_dim=DIM, depth=3, num_heads=2) | kwargs
    return create_model("vit-scratch", num_classes=10, img_size=32, **opts).eval()


NETS: dict[str, tuple[str, dict]] = {
    "timm": ("timm", {}),
    "timm-registers": ("timm", {"reg_tokens": 2}),
    "timm-pre-norm": ("timm", {"pre_norm": True}),
    "scratch": ("scratch", {}),
}
CONFIGS = {
    "deep": PromptConfig(num_prompts=5),
    "shallow": PromptConfig(num_prompts=5, deep=False),
    "gap": PromptConfig(num_prompts=5, depth=[0, 2]),  # block 1 carries block 0's prompt outputs
}


@pytest.fixture
def build(tiny_vit) -> Callable[..., ImageClassifier]:
    def make(net: str, seed: int = 0) -> ImageClassifier:
        family, kwargs = NETS[net]
        if family == "timm":
            return tiny_vit(seed, **kwargs)
        return scratch_vit(seed, **kwargs)

    return make


def block_outputs(model: ImageClassifier) -> list[torch.Tensor]:
    """What each block hands on in a forward (hooks registered after the prompts' see that)."""
    seen: list[torch.Tensor] = []
    for block in model.net.blocks:
        block.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    return seen


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("net", NETS)
def test_intermediates_of_a_prompted_model_are_its_hidden_states(
    net: str, cfg: PromptConfig, build, images
) -> None:
    model = adapt(build(net), "prompt", cfg).eval()
    n = model.net.num_prefix_tokens
    x = images("vit")
    seen = block_outputs(model)
    with torch.no_grad():
        model.forward_features(x)
        final, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        grids = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert len(inter) == len(model.net.blocks) == len(seen[: len(inter)])
    for (patches, prefix), hidden in zip(inter, seen, strict=False):
        assert patches.shape == (4, TOKENS, DIM) and prefix.shape == (4, n, DIM)
        torch.testing.assert_close(torch.cat([prefix, patches], dim=1), hidden)
    assert final.shape == (4, n + TOKENS, DIM)
    assert [g.shape for g in grids] == [(4, DIM, 8, 8)] * 2


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("net", NETS)
def test_zero_prompts_give_the_base_intermediates_exactly(
    net: str, cfg: PromptConfig, build, images
) -> None:
    x = images("vit")
    with torch.no_grad():
        expected = build(net).forward_intermediates(x, return_prefix_tokens=True)
        model = adapt(build(net), "prompt", cfg.model_copy(update={"num_prompts": 0})).eval()
        got = model.forward_intermediates(x, return_prefix_tokens=True)
    assert torch.equal(got[0], expected[0])
    for (patches, prefix), (base_patches, base_prefix) in zip(got[1], expected[1], strict=True):
        assert torch.equal(patches, base_patches) and torch.equal(prefix, base_prefix)


def test_stop_early_works_with_prompts(build, images) -> None:
    model = adapt(build("timm"), "prompt", PromptConfig(num_prompts=5, deep=False)).eval()
    with torch.no_grad():
        every = model.forward_intermediates(images("vit"), intermediates_only=True)
        early = model.forward_intermediates(
            images("vit"), indices=[1], stop_early=True, intermediates_only=True
        )
    torch.testing.assert_close(early[0], every[1])


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_pre_norm_applies_to_the_prompts_exactly_once(deep: bool, tiny_vit, images) -> None:
    model = adapt(tiny_vit(pre_norm=True), "prompt", PromptConfig(num_prompts=5, deep=deep)).eval()
    net = model.net
    assert isinstance(net.norm_pre, torch.nn.LayerNorm)
    entering: list[torch.Tensor] = []
    net.blocks[0].register_forward_pre_hook(lambda _m, args: entering.append(args[0].detach()))
    with torch.no_grad():
        model(images("vit"))
        ln = net.norm_pre  # called functionally: calling the module would run the prompt hook
        prompts = net.prompt.embeddings[0]
        once = F.layer_norm(prompts, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        expected = once.expand(4, -1, -1)
    torch.testing.assert_close(entering[0][:, 1:6], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(entering[0][:, 1:6], net.prompt.embeddings[0].expand(4, -1, -1))


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_gradient_checkpointing_gives_the_same_prompt_gradients(
    deep: bool, tiny_vit, images
) -> None:
    # Checkpointing re-runs blocks (and the prompt hooks) during backward; the carried prompt
    # outputs must still be the ones of that forward.
    grads = []
    for checkpointing in (False, True):
        model = adapt(tiny_vit(), "prompt", PromptConfig(num_prompts=4, deep=deep))
        model.net.set_grad_checkpointing(checkpointing)
        model.train()
        model(images("vit")).logsumexp(1).sum().backward()
        grads.append(prompt_parameters(model)[0].grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prompted_tinyvit_keeps_its_intermediates(deep: bool, tiny_tinyvit, images) -> None:
    x = images("tinyvit")
    with torch.no_grad():
        expected = tiny_tinyvit().forward_intermediates(x, intermediates_only=True)
        zero = adapt(tiny_tinyvit(), "prompt", PromptConfig(num_prompts=0, deep=deep)).eval()
        got = zero.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        model = adapt(tiny_tinyvit(), "prompt", PromptConfig(num_prompts=3, deep=deep)).eval()
        got = model.forward_intermediates(x, intermediates_only=True)
    assert [g.shape for g in got] == [e.shape for e in expected]
