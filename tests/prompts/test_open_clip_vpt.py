"""VPT on open_clip's visual tower through its prompt adapter: ln_pre, class_embedding, resblocks
taking (B, L, D) or (L, B, D). A tiny tower is built from a config: no download."""

from __future__ import annotations

import pytest
import torch

from vptlab.prompts import PromptConfig, TokenPromptSite, add_prompts, prompt_site

open_clip_transformer = pytest.importorskip("open_clip.transformer")

WIDTH, TOKENS = 32, 64  # 32x32 px, patch 4 -> 8x8 patch tokens


def tower(seed: int = 0, batch_first: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = open_clip_transformer.VisionTransformer(
        image_size=32, patch_size=4, width=WIDTH, layers=3, heads=2, mlp_ratio=2.0, output_dim=16
    )
    with torch.no_grad():  # open_clip starts ln_pre at the identity; a real one is not
        net.ln_pre.weight.normal_()
        net.ln_pre.bias.normal_()
    if not batch_first:  # older towers run their blocks on (L, B, D): same weights, other layout
        blocks = open_clip_transformer.Transformer(WIDTH, 3, 2, 2.0, batch_first=False)
        blocks.load_state_dict(net.transformer.state_dict())
        net.transformer = blocks
    return net.eval()


def test_the_adapter_describes_the_tower() -> None:
    net = tower()
    site = prompt_site(net)
    assert isinstance(site, TokenPromptSite)
    assert site.blocks is net.transformer.resblocks and site.entry is net.ln_pre
    assert (site.num_prefix_tokens, site.dim, site.patch_size) == (1, WIDTH, (4, 4))


@pytest.mark.parametrize("batch_first", [True, False], ids=["BLD", "LBD"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_zero_prompts_give_the_base_tower(deep: bool, batch_first: bool) -> None:
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = tower(batch_first=batch_first)(x)
        net = tower(batch_first=batch_first)
        add_prompts(net, PromptConfig(num_prompts=0, deep=deep))
        assert torch.equal(net(x), expected)


def record_input(block: torch.nn.Module, batch_first: bool) -> list[torch.Tensor]:
    """The block's inputs, as (B, L, D)."""
    seen: list[torch.Tensor] = []
    block.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0] if batch_first else args[0].transpose(0, 1))
    )
    return seen


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompts_act_the_same_for_both_token_layouts(deep: bool) -> None:
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for batch_first in (True, False):
        net = tower(batch_first=batch_first)
        torch.manual_seed(1)
        (prompt,) = add_prompts(net, PromptConfig(num_prompts=3, deep=deep))
        entering = record_input(net.transformer.resblocks[0], batch_first)
        with torch.no_grad():
            outs.append(net(x))
            ln = net.ln_pre  # applied once to the prompts, as to the patch tokens
            once = torch.nn.functional.layer_norm(
                prompt.embeddings[0], ln.normalized_shape, ln.weight, ln.bias, ln.eps
            )
        torch.testing.assert_close(entering[0][:, 1:4], once.expand(2, -1, -1))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], tower()(x))


def test_prompted_tower_intermediates_are_image_tokens() -> None:
    net = tower()
    add_prompts(net, PromptConfig(num_prompts=3, deep=False))
    x = torch.rand(2, 3, 32, 32)
    seen: list[torch.Tensor] = []
    for block in net.transformer.resblocks:
        block.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        out = net.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    patches = out["image_intermediates"]
    assert [p.shape for p in patches] == [(2, TOKENS, WIDTH)] * 3
    for p, hidden in zip(patches, seen, strict=True):
        torch.testing.assert_close(p, hidden[:, 1:])
