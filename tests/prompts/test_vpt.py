"""VPT on ViTs: where prompts go (insert, deep replace, removal before pooling), counts, grads."""

from __future__ import annotations

import copy

import pytest
import torch

from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.prompts import PromptConfig, adapt, count_parameters, prompt_parameters

DIM, BLOCKS, TOKENS = 32, 3, 64  # tiny_vit: 32x32 px, patch 4 -> 8x8 patch tokens


def block_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """Record what each block receives, after our prompt hooks (hooks run in registration order)."""
    seen: list[torch.Tensor] = []
    for block in model.net.blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize(
    ("cfg", "sets"),
    [
        (PromptConfig(num_prompts=7, deep=True), BLOCKS),
        (PromptConfig(num_prompts=7, deep=True, depth=[0, 2]), 2),
        (PromptConfig(num_prompts=7, deep=False), 1),
    ],
)
def test_prompt_parameter_count(cfg: PromptConfig, sets: int, tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt", cfg)
    (prompts,) = prompt_parameters(model)
    assert prompts.numel() == sets * cfg.num_prompts * DIM
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert count_parameters(model)[0] == sets * cfg.num_prompts * DIM + head


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize(
    "vit_kwargs",
    [{}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}],
    ids=["token", "cls+avg", "avg", "registers"],
)
def test_zero_prompts_give_the_base_logits_exactly(
    deep: bool, vit_kwargs: dict, images, tiny_vit
) -> None:
    x = images("vit")
    expected = tiny_vit(**vit_kwargs)(x)
    model = adapt(tiny_vit(**vit_kwargs), "prompt", PromptConfig(num_prompts=0, deep=deep)).eval()
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("vit_kwargs", [{}, {"reg_tokens": 2}], ids=["cls", "cls+registers"])
def test_deep_prompts_replace_the_previous_blocks_prompts(
    vit_kwargs: dict, images, tiny_vit
) -> None:
    model = adapt(tiny_vit(**vit_kwargs), "prompt", PromptConfig(num_prompts=5)).eval()
    prompt = model.net.prompt
    n = model.net.num_prefix_tokens
    seen = block_inputs(model)
    features = model.forward_features(images("vit"))
    assert [s.shape[1] for s in seen] == [n + 5 + TOKENS] * BLOCKS  # replaced, never appended
    for slot, s in enumerate(seen):
        assert torch.equal(s[:, n : n + 5], prompt.embeddings[slot].expand(len(s), -1, -1))
    assert features.shape[1] == n + TOKENS  # the last block drops them


def test_deep_prompts_can_start_at_a_later_block(images, tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt", PromptConfig(num_prompts=5, depth=[1, 2])).eval()
    seen = block_inputs(model)
    model(images("vit"))
    assert [s.shape[1] for s in seen] == [1 + TOKENS, 1 + 5 + TOKENS, 1 + 5 + TOKENS]
    assert torch.equal(seen[1][:, 1:6], model.net.prompt.embeddings[0].expand(4, -1, -1))


def test_shallow_prompts_are_carried_through_the_blocks(images, tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt", PromptConfig(num_prompts=5, deep=False)).eval()
    seen = block_inputs(model)
    model(images("vit"))
    assert torch.equal(seen[0][:, 1:6], model.net.prompt.embeddings[0].expand(4, -1, -1))
    # Later blocks get the previous block's prompt outputs, not fresh embeddings.
    assert not torch.allclose(seen[1][:, 1:6], seen[0][:, 1:6])


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_get_gradients_and_steer_the_output(deep: bool, images, tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt", PromptConfig(num_prompts=4, deep=deep))
    x = images("vit")
    model(x).logsumexp(1).sum().backward()
    (prompts,) = prompt_parameters(model)
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    if deep:  # every block's set matters, the last one included
        assert all(g.abs().sum() > 0 for g in prompts.grad)
    model.eval()
    before = model(x)
    with torch.no_grad():  # random: a constant shift would vanish in the blocks' LayerNorm
        prompts[-1].add_(torch.randn_like(prompts[-1]))
    assert not torch.allclose(model(x), before)


def test_avg_pooling_excludes_the_prompts(images, tiny_vit) -> None:
    model = adapt(
        tiny_vit(class_token=False, global_pool="avg"), "prompt", PromptConfig(num_prompts=6)
    ).eval()
    net = model.net
    raw: list[torch.Tensor] = []  # last block output before our hook strips the prompts
    net.blocks[-1].register_forward_hook(lambda _m, _a, out: raw.append(out), prepend=True)
    x = images("vit")
    logits = model(x)
    assert raw[0].shape[1] == 6 + TOKENS
    patches = net.norm(raw[0][:, 6:])
    assert torch.allclose(logits, net.head(net.fc_norm(patches.mean(1))), atol=1e-6)
    with_prompts = net.head(net.fc_norm(net.norm(raw[0]).mean(1)))
    assert not torch.allclose(logits, with_prompts, atol=1e-4)


def test_prompt_dropout_only_in_training(images, tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt", PromptConfig(num_prompts=4, dropout=0.5))
    x = images("vit")
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_deepcopy_keeps_its_own_prompts(images, tiny_vit) -> None:
    model = adapt(tiny_vit(), "prompt", PromptConfig(num_prompts=4)).eval()
    twin = copy.deepcopy(model)
    x = images("vit")
    before = model(x)
    assert torch.equal(twin(x), before)
    with torch.no_grad():
        twin.net.prompt.embeddings.add_(torch.randn_like(twin.net.prompt.embeddings))
    assert torch.equal(model(x), before)  # the copy's hooks use the copy's prompts
    assert not torch.allclose(twin(x), before)


def test_depth_errors_name_the_key(tiny_vit) -> None:
    with pytest.raises(ConfigError, match=r"prompt.depth .*\[0, 3\)"):
        adapt(tiny_vit(), "prompt", PromptConfig(depth=[0, 3]))
    with pytest.raises(ConfigError, match="prompt.depth applies to deep prompts only"):
        adapt(tiny_vit(), "prompt", PromptConfig(deep=False, depth=[0]))


def test_vit_base_repatched_to_patch_4(images) -> None:
    torch.manual_seed(0)
    base = create_model("vit_base_patch16_224", num_classes=10, img_size=32, patch_size=4)
    assert base.net.patch_embed.patch_size == (4, 4)
    model = adapt(base, "prompt")
    (prompts,) = prompt_parameters(model)
    assert prompts.numel() == 12 * 10 * 768
    assert prompts.abs().max() <= (6 / (3 * 4 * 4 + 768)) ** 0.5  # VPT's bound for patch 4
    with torch.no_grad():
        assert model.eval()(images("vit", n=2)).shape == (2, 10)
