"""VPT on TinyViT: prompts as extra keys/values of every window, checked against a reference."""

from __future__ import annotations

import pytest
import torch

from vptlab.errors import ConfigError
from vptlab.prompts import (
    PromptConfig,
    PromptedWindowAttention,
    adapt,
    count_parameters,
    prompt_parameters,
)
from vptlab.prompts.tinyvit import attention_blocks

DIMS = [16, 16, 24, 32]  # widths of tiny_tinyvit's four attention blocks (stages 1, 1, 2, 3)


def random_biases(model: torch.nn.Module) -> None:
    """timm starts the relative-position biases at zero, which would hide bias mistakes."""
    with torch.no_grad():
        for block in attention_blocks(model.net):
            block.attn.attention_biases.normal_()


@pytest.mark.parametrize(
    ("cfg", "dims"),
    [
        (PromptConfig(num_prompts=3), DIMS),
        (PromptConfig(num_prompts=3, depth=[1, 3]), [DIMS[1], DIMS[3]]),
        (PromptConfig(num_prompts=3, deep=False), DIMS[:1]),
    ],
)
def test_prompt_parameter_count(cfg: PromptConfig, dims: list[int], tiny_tinyvit) -> None:
    model = adapt(tiny_tinyvit(), "prompt", cfg)
    assert [p.numel() for p in prompt_parameters(model)] == [cfg.num_prompts * d for d in dims]
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert count_parameters(model)[0] == cfg.num_prompts * sum(dims) + head


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_zero_prompts_give_the_base_logits_exactly(
    deep: bool, fused: bool, images, tiny_tinyvit
) -> None:
    x = images("tinyvit")
    base = tiny_tinyvit()
    random_biases(base)
    for block in attention_blocks(base.net):
        block.attn.fused_attn = fused
    expected = base(x)
    model = adapt(base, "prompt", PromptConfig(num_prompts=0, deep=deep)).eval()
    assert isinstance(attention_blocks(model.net)[0].attn, PromptedWindowAttention)
    assert torch.equal(model(x), expected)


def reference_attention(attn: PromptedWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Full attention over [prompts; window] with zero bias on prompt rows and columns, prompt
    outputs dropped: the VPT-deep computation inside one window, written out."""
    B, N, _ = x.shape
    P, h = attn.num_prompts, attn.num_heads
    tokens = torch.cat([attn.prompts.expand(B, -1, -1), x], dim=1)
    qkv = attn.qkv(attn.norm(tokens)).view(B, P + N, h, -1)
    q, k, v = qkv.split([attn.key_dim, attn.key_dim, attn.val_dim], dim=-1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    bias = torch.zeros(h, P + N, P + N)
    bias[:, P:, P:] = attn.attention_biases[:, attn.attention_bias_idxs]
    out = ((q @ k.transpose(-2, -1)) * attn.scale + bias).softmax(-1) @ v
    return attn.proj(out[:, :, P:].transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
def test_window_attention_matches_the_reference(fused: bool, tiny_tinyvit) -> None:
    model = adapt(tiny_tinyvit(), "prompt", PromptConfig(num_prompts=5)).eval()
    random_biases(model)
    for block in attention_blocks(model.net):
        attn = block.attn
        attn.fused_attn = fused
        windows = torch.randn(6, block.window_size**2, block.dim)  # 6 windows share the prompts
        with torch.no_grad():
            assert torch.allclose(attn(windows), reference_attention(attn, windows), atol=1e-5)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prompts_get_gradients_and_steer_the_output(deep: bool, images, tiny_tinyvit) -> None:
    model = adapt(tiny_tinyvit(), "prompt", PromptConfig(num_prompts=4, deep=deep))
    x = images("tinyvit")
    model(x).logsumexp(1).sum().backward()
    prompts = prompt_parameters(model)
    assert len(prompts) == (4 if deep else 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)
    model.eval()
    before = model(x)
    with torch.no_grad():  # the last set: deep prompts act in the last stage too
        prompts[-1].add_(torch.randn_like(prompts[-1]))
    assert not torch.allclose(model(x), before)


def test_shallow_prompts_only_the_first_attention_block(tiny_tinyvit) -> None:
    model = adapt(tiny_tinyvit(), "prompt", PromptConfig(num_prompts=4, deep=False))
    wrapped = [isinstance(b.attn, PromptedWindowAttention) for b in attention_blocks(model.net)]
    assert wrapped == [True, False, False, False]


def test_prompts_start_within_the_vpt_bound(tiny_tinyvit) -> None:
    model = adapt(tiny_tinyvit(), "prompt", PromptConfig(num_prompts=50))
    for p, dim in zip(prompt_parameters(model), DIMS, strict=True):
        bound = (6 / (3 * 4 * 4 + dim)) ** 0.5  # the stem's stride 4 as the patch size
        assert 0.8 * bound < p.abs().max() <= bound


def test_depth_counts_attention_blocks(tiny_tinyvit) -> None:
    with pytest.raises(ConfigError, match=r"\[0, 4\) .*attention blocks"):
        adapt(tiny_tinyvit(), "prompt", PromptConfig(depth=[4]))
