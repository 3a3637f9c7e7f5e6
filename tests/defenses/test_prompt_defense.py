"""Our prompt defense: it removes a BadNets backdoor from a frozen SimpleNet with 5% clean data,
its parts (the wrapper, the one-sided clamp, the simplex projection, the trigger search), its
options, and save / prepare / load."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vptlab.data.base import DataSplits, TensorSplit, subset
from vptlab.defenses.prompt_defense import (
    PromptDefense,
    UniversalPerturbation,
    _square_masks,
    project_capped_simplex,
    prompted_input,
)
from vptlab.defenses.repair import repair
from vptlab.engine.checkpoint import load_model
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.prompts import adapt, prompt_parameters
from vptlab.registry import check_factory_options
from vptlab.runs import MODEL_FILE
from vptlab.steps.resolve import resolved

CLEAN_FRACTION = 0.05


def recipe(tmp_path: Path, **train: Any) -> Any:
    """The recipe the module docstring recommends: SGD with clipping, no weight decay."""
    base = {
        "name": "prompt-defense",
        "seed": 0,
        "device": "cpu",
        "data": {"batch_size": 32, "num_workers": 0},
        "train": {"epochs": 2, "optimizer": "sgd", "lr": 3.0, "grad_clip": 1.0,
                  "weight_decay": 0.0} | train,
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    }  # fmt: skip
    return resolved(base, [])


@pytest.fixture(scope="module")
def defended(backdoored, tmp_path_factory) -> dict[str, Any]:
    """One defense run on 5% of the clean train split, shared by the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = backdoored
        model = copy.deepcopy(p.model)
        clean_train = subset(p.data.train, round(CLEAN_FRACTION * len(p.data.train)), seed=1)
        test = TensorSplit(p.data.test.x[:100], p.data.test.y[:100])  # per-epoch evaluation
        clean = DataSplits(p.data.name, clean_train, test, p.data.num_classes)
        run_dir = tmp_path_factory.mktemp("prompt-defense")
        start = time.perf_counter()
        prompted = repair(PromptDefense(size=28), model, clean, recipe(run_dir), run_dir)
        seconds = time.perf_counter() - start
        after = p.measure(prompted)
    finally:
        torch.set_num_threads(threads)
    before = (p.ca, p.asr)
    print(f"prompt defense on {len(clean_train)} clean images: CA {before[0]:.1f} -> "
          f"{after[0]:.1f}, ASR {before[1]:.1f} -> {after[1]:.1f} ({seconds:.1f} s)")  # fmt: skip
    return {"model": prompted, "run_dir": run_dir, "before": before, "after": after}


def test_prompt_defense_removes_the_backdoor_and_keeps_clean_accuracy(defended) -> None:
    (ca_before, asr_before), (ca_after, asr_after) = defended["before"], defended["after"]
    assert asr_before > 90
    assert asr_after < 15
    assert ca_after > ca_before - 4


def test_the_backdoored_model_stays_frozen(defended, backdoored) -> None:
    prompted = defended["model"]
    assert [n for n, p in prompted.named_parameters() if p.requires_grad] == ["prompt.delta"]
    original = backdoored.model.state_dict()
    for key, value in prompted.model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    assert prompted.prompt.perturbation(torch.zeros(1, 3, 28, 28)).abs().max() > 0.1  # it did learn


def test_the_defended_model_is_broken_at_a_budget_that_grays_out_any_image(
    defended, backdoored
) -> None:
    """No gradient masking through the defense's clamp: PGD-20 at Linf 0.5 (enough to gray out
    any digit) leaves under 5% robust accuracy on the trained, prompt-defended model."""
    from vptlab.attacks import create_attack
    from vptlab.metrics import evaluate_suite

    test = backdoored.data.test
    split = TensorSplit(test.x[:200], test.y[:200])
    attack = create_attack("pgd", eps=0.5, alpha=0.05, steps=20)
    suite = evaluate_suite(defended["model"], split, [attack], progress=False)
    assert suite["clean/top1"] > 80.0
    assert suite[f"{attack.name}/acc"] < 5.0


def test_save_prepare_load_gives_identical_outputs(defended, backdoored) -> None:
    x = backdoored.triggered_test()[:32]
    reloaded = PromptDefense(size=28).prepare(copy.deepcopy(backdoored.model))
    load_model(reloaded, defended["run_dir"] / MODEL_FILE)
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), defended["model"](x), rtol=0, atol=0)


# --- the wrapper ----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bound=st.floats(0.01, 1.0),
    scale=st.floats(0.0, 20.0),
    frame=st.one_of(st.none(), st.integers(1, 6)),
)
def test_prompted_inputs_stay_in_the_unit_interval(
    seed: int, bound: float, scale: float, frame: int | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    prompted = prompted_input(nn.Identity(), size=12, bound=bound, frame=frame)
    with torch.no_grad():
        prompted.prompt.delta.copy_(torch.randn(prompted.prompt.delta.shape, generator=g) * scale)
    x = torch.rand(4, 3, 16, 16, generator=g)  # another size: the prompt is resized
    out = prompted.prompt(x)
    assert out.min() >= 0 and out.max() <= 1
    assert (prompted.prompt.perturbation(x).abs() <= bound + 1e-6).all()
    if frame is not None:  # inside the frame the image is untouched
        inner = (slice(None), slice(None), slice(frame, 16 - frame), slice(frame, 16 - frame))
        torch.testing.assert_close(out[inner], x[inner])


def test_zero_prompt_is_the_bare_model_and_prepare_is_structure_only(backdoored) -> None:
    x = backdoored.triggered_test()[:16]
    defense = PromptDefense(size=28)
    first = defense.prepare(copy.deepcopy(backdoored.model)).eval()
    second = defense.prepare(copy.deepcopy(backdoored.model)).eval()
    assert first.state_dict().keys() == second.state_dict().keys()
    assert "prompt.delta" in first.state_dict() and not first.prompt.delta.any()
    with torch.no_grad():
        torch.testing.assert_close(first(x), backdoored.model(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="already has a defensive prompt"):
        defense.prepare(first)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit-scratch", num_classes=10, img_size=16, patch_size=4, embed_dim=16,
                        depth=2, num_heads=2, drop_rate=0.5)  # fmt: skip


def test_prompted_vit_trains_the_pixel_prompt_only_and_keeps_the_backbone_in_eval() -> None:
    adapted = adapt(tiny_vit(), "prompt")  # the attacker's prompts and head
    prompted = PromptDefense().prepare(adapted).train()  # size from the ViT: 16
    assert tuple(prompted.prompt.delta.shape) == (1, 3, 16, 16)
    assert [n for n, p in prompted.named_parameters() if p.requires_grad] == ["prompt.delta"]
    assert not any(m.training for m in prompted.model.modules())  # no dropout, frozen
    x = torch.rand(2, 3, 16, 16)
    prompted(x).sum().backward()
    assert prompted.prompt.delta.grad is not None and prompted.prompt.delta.grad.abs().sum() > 0

    tokens = PromptDefense(token_prompts=True).prepare(adapt(tiny_vit(), "prompt"))
    trainable = {p for p in tokens.parameters() if p.requires_grad}
    assert trainable == {tokens.prompt.delta, *prompt_parameters(tokens.model)}
    with pytest.raises(ConfigError, match="token_prompts needs a VPT-adapted model"):
        PromptDefense(token_prompts=True).prepare(create_model("simplenet", num_classes=10))


# --- the parts ------------------------------------------------------------------------------


def test_capped_simplex_projection() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 1, 8, 8, generator=g) * 0.5 + 0.2
    budget = 5.0
    projected = project_capped_simplex(m, budget)
    assert (projected >= 0).all() and (projected <= 1).all()
    sums = projected.flatten(1).sum(1)
    torch.testing.assert_close(sums, torch.full((3,), budget), atol=1e-4, rtol=0)
    # The projection is clamp(m_r - tau_r, 0, 1): in each row, every pixel strictly inside the
    # box moved by the same tau_r.
    for row, out in zip(m, projected, strict=True):
        moved = (row - out)[(out > 0) & (out < 1)]
        assert moved.max() - moved.min() < 1e-5
    torch.testing.assert_close(project_capped_simplex(projected, budget), projected, atol=1e-5,
                               rtol=0)  # fmt: skip
    small = torch.full((1, 1, 4, 4), 0.1)  # within budget: only clipped to the box
    torch.testing.assert_close(project_capped_simplex(small, budget), small)


@pytest.mark.parametrize("starts", ["scan", "uniform"])
def test_targeted_search_finds_the_backdoor_target(backdoored, starts: str) -> None:
    p = backdoored
    x, y = p.test_images()
    torch.manual_seed(0)
    search = UniversalPerturbation(
        "patch", area=0.03, eps=0.1, alpha=0.2, targets=range(10), starts=starts
    )
    assert search.candidates == 10 and search.scanned == (10 if starts == "scan" else 0)
    for start in range(0, 160, 16):  # 10 batches, one step each: the warm start carries on
        search.ascend(p.model, x[start : start + 16], y[start : start + 16], steps=1)
    assert search.best == p.target
    held_out = x[500:700][y[500:700] != p.target]
    with torch.no_grad():
        sent = (p.model(search.apply(held_out)).argmax(1) == p.target).float().mean()
    assert sent > 0.8  # the stand-in works like the trigger on images it never saw
    assert float(search.mask[search.best].sum()) <= 0.03 * 28 * 28 + 1e-3


def test_scan_squares_cover_the_grid_up_to_the_border() -> None:
    squares = _square_masks(8, 8, side=3, stride=2, device=torch.device("cpu"))
    assert squares.shape == (16, 1, 8, 8)  # rows and columns start at 0, 2, 4 and, flush, 5
    assert (squares.flatten(1).sum(1) == 9).all()
    assert squares[-1, 0, 5:, 5:].all()  # the last one in the bottom-right corner
    assert squares.amax(0).all()  # every pixel covered


def test_both_starts_search_every_target_twice() -> None:
    search = UniversalPerturbation("patch", 0.03, 0.1, 0.2, targets=range(3))
    assert search.targets.tolist() == [0, 1, 2, 0, 1, 2] and search.scanned == 3
    untargeted = UniversalPerturbation("patch", 0.03, 0.1, 0.2, candidates=5)
    assert untargeted.candidates == 5 and untargeted.scanned == 3
    linf = UniversalPerturbation("linf", 0.03, 0.1, 0.2, targets=range(3))
    assert linf.candidates == 3 and linf.scanned == 0


def test_linf_search_stays_in_its_ball_and_raises_the_loss(backdoored) -> None:
    p = backdoored
    x, y = p.test_images()
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    search = UniversalPerturbation("linf", area=0.03, eps=0.1, alpha=0.25, candidates=2)
    search.ascend(p.model, x, y, steps=8)
    assert search.pattern.abs().max() <= 0.1 + 1e-6
    adv = search.apply(x)
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean_loss = nn.functional.cross_entropy(p.model(x), y)
        adv_loss = nn.functional.cross_entropy(p.model(adv), y)
    assert adv_loss > clean_loss + 0.5


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"area": 1.5}, "area must be in"),
        ({"eps": 0.0}, "eps must be in"),
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"bound": 2.0}, "bound must be in"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"threat": "blend"}, "threat must be"),
    ],
)
def test_bad_options_are_one_line_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PromptDefense(**options)


def test_options_check_against_the_factory_signature() -> None:
    checked = check_factory_options(PromptDefense, {"steps": 2, "lam": 1}, where="defense.options",
                                    owner="defense 'prompt'")  # fmt: skip
    assert checked == {"steps": 2, "lam": 1.0}
    with pytest.raises(ConfigError, match="stepz: unknown option"):
        check_factory_options(PromptDefense, {"stepz": 2}, where="defense.options",
                              owner="defense 'prompt'")  # fmt: skip
    with pytest.raises(ConfigError, match="threat"):
        check_factory_options(PromptDefense, {"threat": "blend"}, where="defense.options",
                              owner="defense 'prompt'")  # fmt: skip
