"""Input-aware dynamic backdoor (Nguyen & Tran 2020): a trigger generated from each image,
fitted once per module on 512 mnist-5k digits (a few seconds); the registry contract is in
test_triggers.py, the poisoned run in test_backdoor_run.py."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from vptlab.backdoors.input_aware import Generator, InputAwareTrigger
from vptlab.backdoors.triggers import create_trigger, trigger_from_spec
from vptlab.data import load_dataset
from vptlab.errors import ConfigError, VptlabError

OPTIONS = {"steps": 4, "mask_steps": 20}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist-5k", seed=0)
    return data.train.x[:512], data.train.y[:512]


@pytest.fixture(scope="module")
def fitted(digits: tuple[torch.Tensor, torch.Tensor]) -> InputAwareTrigger:
    trigger = create_trigger("inputaware", seed=0, **OPTIONS)
    trigger.fit(*digits, 10, 0)
    assert isinstance(trigger, InputAwareTrigger)
    return trigger


def test_apply_before_fit_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="inputaware is fitted on the train split"):
        create_trigger("inputaware").apply(torch.rand(2, 1, 28, 28))
    assert create_trigger("inputaware").state() == {}


def test_each_image_gets_its_own_trigger(fitted: InputAwareTrigger) -> None:
    x = load_dataset("mnist-5k", seed=0).test.x[:200]
    pattern, mask = fitted.trigger_of(x)
    assert pattern.shape == x.shape and mask.shape == (200, 1, 28, 28)
    # Two different digits: different patterns and different masks (RMS over the pixels).
    rms = lambda a, b: (a - b).pow(2).mean(dim=(1, 2, 3)).sqrt()  # noqa: E731
    assert rms(pattern[:100], pattern[100:]).min() > 0.05
    assert rms(mask[:100], mask[100:]).mean() > 0.01
    # The stamp is x + m (p - x): the mask says where, the pattern what.
    torch.testing.assert_close(fitted.apply(x), (x + mask * (pattern - x)).clamp(0, 1))


def test_the_fit_is_seeded(digits: tuple[torch.Tensor, torch.Tensor],
                           fitted: InputAwareTrigger) -> None:  # fmt: skip
    x, y = digits[0][:128], digits[1][:128]
    first, again, other = (create_trigger("inputaware", seed=s, steps=1, mask_steps=2)
                           for s in (0, 0, 1))  # fmt: skip
    for trigger in (first, again, other):
        trigger.fit(x, y, 10, 0)
    state, same, changed = first.state(), again.state(), other.state()
    assert state.keys() == same.keys() == changed.keys()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not all(torch.equal(state[k], changed[k]) for k in state)


def test_state_round_trips(fitted: InputAwareTrigger) -> None:
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    state = fitted.state()
    assert {k.split(".")[0] for k in state} == {"pattern", "mask"}
    rebuilt = trigger_from_spec(json.loads(json.dumps(fitted.spec())))
    rebuilt.load_state(state)
    assert torch.equal(rebuilt.apply(x), fitted.apply(x))
    assert torch.equal(pickle.loads(pickle.dumps(fitted)).apply(x), fitted.apply(x))
    with pytest.raises(VptlabError, match="does not fit width 8"):
        create_trigger("inputaware", width=8).load_state(state)


def test_another_channel_count_is_one_clear_error(fitted: InputAwareTrigger) -> None:
    with pytest.raises(ConfigError, match="fitted on 1-channel images, got 3 channels"):
        fitted.apply(torch.rand(2, 3, 28, 28))


def test_noise_stamps_each_image_with_another_images_trigger(fitted: InputAwareTrigger) -> None:
    x = load_dataset("mnist-5k", seed=0).test.x[:9]
    out = fitted.noise(x, torch.Generator().manual_seed(3))
    assert torch.equal(fitted.noise(x, torch.Generator().manual_seed(3)), out)
    # Which image's trigger each one got: the one whose stamp it matches, never its own.
    pattern, mask = fitted.trigger_of(x)
    stamps = (x[:, None] + mask[None] * (pattern[None] - x[:, None])).clamp(0, 1)  # [i, j]
    error = (stamps - out[:, None]).abs().flatten(2).amax(dim=2)
    partner = error.argmin(dim=1)
    assert (error.min(dim=1).values < 1e-5).all()
    assert (partner != torch.arange(9)).all() and sorted(partner.tolist()) == list(range(9))
    assert torch.equal(fitted.noise(x[:1], torch.Generator()), x[:1])  # no other image


def test_generator_keeps_any_size_and_stays_in_the_unit_range() -> None:
    net = Generator(3, 1, width=2).eval()
    out = net(torch.rand(2, 3, 30, 27))
    assert out.shape == (2, 1, 30, 27) and 0 < out.min() and out.max() < 1
    m = Generator.threshold(torch.tensor([0.0, 0.5, 1.0]))
    assert m[0] < 1e-4 and abs(m[1] - 0.5) < 1e-6 and m[2] > 1 - 1e-4
