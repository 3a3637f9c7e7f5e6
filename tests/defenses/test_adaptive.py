"""The adaptive attacker's residual ASR: the search's family and budget follow the trigger, it
finds the BadNets backdoor of the shared SimpleNet (and far less on a clean one, or with random
patches of the same budget), it is deterministic under its seed, and the defend step's numbers."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from vptlab.backdoors.metrics import BackdoorThreat
from vptlab.backdoors.triggers import create_trigger
from vptlab.data.base import seeded_generator, subset
from vptlab.data.loaders import to_rgb
from vptlab.defenses.adaptive import budget_of, residual_asr, residual_metrics

# A cheap search for CPU tests: 2 random starts, 30 steps of 16 images, no scan (~3 s here).
CHEAP: dict[str, Any] = {"starts": 2, "steps": 30, "batch_size": 16, "scan": False}


@pytest.fixture(scope="module")
def attacker(backdoored) -> dict[str, torch.Tensor]:
    """512 clean train images the attacker holds, and the clean test split (3 channels)."""
    train = subset(backdoored.data.train, 512, seed=7)
    x, y = backdoored.test_images()
    return {"x": to_rgb(train.x).contiguous(), "y": train.y, "test_x": x, "test_y": y}


def search(model: nn.Module, attacker: dict[str, torch.Tensor], trigger_name: str = "badnets",
           **options: Any) -> dict[str, Any]:  # fmt: skip
    trigger = create_trigger(trigger_name)
    return residual_asr(model, attacker["x"], attacker["y"], attacker["test_x"],
                        attacker["test_y"], 0, trigger, **{**CHEAP, **options})  # fmt: skip


def test_patch_triggers_search_patches_of_their_area() -> None:
    x = torch.rand(4, 3, 28, 28)
    assert budget_of(create_trigger("badnets", size=3), x) == ("patch", 9 / 784)
    # Stored at 28x28 and fed at 56x56: the same fraction of the image.
    big = torch.rand(4, 3, 56, 56)
    assert budget_of(create_trigger("badnets", size=4), big, size=(28, 28)) == ("patch", 16 / 784)


def test_additive_triggers_search_linf_balls_as_large_as_their_change() -> None:
    x = torch.rand(64, 3, 28, 28)
    family, eps = budget_of(create_trigger("blended", alpha=0.2), x)
    assert family == "linf" and 0.18 < eps <= 0.2 + 1e-6  # alpha |p - x| < alpha
    digits = torch.zeros(8, 1, 28, 28)  # a black background: the sinusoid's top is not clipped
    family, eps = budget_of(create_trigger("sig", delta=20 / 255), to_rgb(digits), channels=1)
    assert family == "linf" and 0.95 * 20 / 255 < eps <= 20 / 255  # the sampled sine's peak
    assert budget_of(create_trigger("wanet"), x)[0] == "linf"


def test_search_finds_the_backdoor_and_not_a_clean_models_weak_spot(
    backdoored, clean_model, attacker
) -> None:
    start = time.perf_counter()
    poisoned = search(backdoored.model, attacker)
    seconds = time.perf_counter() - start
    clean = search(clean_model, attacker)
    print(f"residual ASR: backdoored {poisoned['asr']:.1f}, clean {clean['asr']:.1f} "
          f"({seconds:.1f} s a search)")  # fmt: skip
    assert poisoned["family"] == "patch" and poisoned["budget"] == 9 / 784
    assert poisoned["starts"] == 2 and poisoned["steps"] == 30
    assert poisoned["test_samples"] == int((attacker["test_y"] != 0).sum())
    assert poisoned["asr"] >= 80.0
    assert clean["asr"] < poisoned["asr"] - 50.0


def test_search_beats_random_patches_of_the_same_budget(backdoored, attacker) -> None:
    """Random-noise 3x3 squares at random places (the trigger's family and budget, not its
    place or pattern) send few digits to the target; the search sends most."""
    g = seeded_generator(3)
    x = attacker["test_x"][attacker["test_y"] != 0]
    rates = []
    with torch.no_grad():
        for _ in range(8):
            row, col = (int(v) for v in torch.randint(0, 26, (2,), generator=g))
            noisy = x.clone()
            noisy[:, :, row : row + 3, col : col + 3] = torch.rand(1, 3, 3, generator=g)
            rates.append(100.0 * float((backdoored.model(noisy).argmax(1) == 0).float().mean()))
    random_asr = sum(rates) / len(rates)
    found = search(backdoored.model, attacker)["asr"]
    print(
        f"random 3x3 noise patches: ASR {random_asr:.1f} (max {max(rates):.1f}); search {found:.1f}"
    )
    assert found > random_asr + 50.0


def test_residual_asr_is_deterministic_and_leaves_the_random_state(backdoored, attacker) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = search(backdoored.model, attacker, "blended", steps=10)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == search(backdoored.model, attacker, "blended", steps=10)
    assert first["family"] == "linf" and 0.18 < first["budget"] <= 0.2 + 1e-6
    other = search(backdoored.model, attacker, "blended", steps=10, seed=1)
    assert other["family"] == "linf" and 0.0 <= other["asr"] <= 100.0


def test_residual_metrics_for_the_defend_step(backdoored) -> None:
    model = backdoored.model
    threat = BackdoorThreat(create_trigger("badnets", size=3), 0, size=(28, 28), channels=1)
    out = residual_metrics(model, model, backdoored.data, threat, seed=0, **CHEAP)
    assert set(out) == {"residual_asr", "residual", "residual_asr_before", "residual_before"}
    assert out["residual_asr"] == out["residual"]["asr"] == out["residual_asr_before"] >= 80.0
    assert 400 < out["residual"]["attacker_samples"] < 512  # the 512 drawn, less the target's
    all2all = BackdoorThreat(create_trigger("badnets"), 0, "all2all", num_classes=10)
    assert residual_metrics(model, model, backdoored.data, all2all, seed=0) == {}
