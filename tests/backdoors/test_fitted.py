"""Fitted triggers (learnt from the clean train split): poison_split fits them before stamping,
their learnt state survives the run folder (the reloaded trigger stamps the same pixels), using
one before it was fitted is one clear error, a streaming split cannot fit them; then each paper's
point: TrojanNN's patch excites the neurons it was optimized for far more than random patches,
label-consistent's poisoned images are pushed away from their class and carry the corner
checkerboards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vptlab.backdoors.label_consistent import LEFT, RIGHT
from vptlab.backdoors.poison import load_poison_record, poison_split, save_poison
from vptlab.backdoors.surrogate import train_surrogate
from vptlab.backdoors.triggers import TRIGGERS, create_trigger
from vptlab.backdoors.trojannn import most_connected_neurons, neuron_activations
from vptlab.config import PoisonConfig
from vptlab.data import load_dataset
from vptlab.data.base import TensorSplit
from vptlab.errors import ConfigError

FITTED = [name for name in TRIGGERS.names() if TRIGGERS.get(name).fitted]
# Options that fit in a fraction of a second on the toy split below.
FAST = {"trojannn": {"steps": 5, "images": 16, "surrogate_epochs": 1},
        "lc": {"steps": 3, "alpha": 0.02, "surrogate_epochs": 1},
        "inputaware": {"steps": 2, "mask_steps": 2}}  # fmt: skip


def toy_split(n: int = 200, classes: int = 4, channels: int = 1, size: int = 12) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.rand(n, channels, size, size, generator=g) * 0.9,
                       torch.arange(n) % classes)  # fmt: skip


def cfg(name: str, **kwargs) -> PoisonConfig:
    return PoisonConfig(trigger=name, options=FAST.get(name, {}), rate=0.1, target=0,
                        label="clean", **kwargs)  # fmt: skip


def test_the_fitted_triggers_are_registered() -> None:
    assert {"trojannn", "lc", "inputaware"} <= set(FITTED)


@pytest.mark.parametrize("name", FITTED)
@pytest.mark.parametrize("channels", [1, 3])
def test_state_survives_the_run_folder(name: str, channels: int, tmp_path: Path) -> None:
    split = toy_split(channels=channels)
    poisoned = poison_split(split, cfg(name), num_classes=4)
    record = poisoned.poison
    save_poison(tmp_path, record)
    loaded = load_poison_record(tmp_path).trigger
    assert loaded.spec() == record.trigger.spec()
    assert set(loaded.state()) == set(record.trigger.state())
    x = toy_split(8, channels=channels).x
    assert torch.equal(loaded.apply(x), record.trigger.apply(x))
    # Only the chosen samples changed, each to the trigger's own stamp of it (at most).
    changed = (poisoned.x != split.x).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == record.poisoned.tolist()
    # Seeded on the CPU: the same config fits and stamps the same again.
    assert torch.equal(poison_split(split, cfg(name), num_classes=4).x, poisoned.x)


@pytest.mark.parametrize("name", FITTED)
def test_a_reload_takes_the_saved_samples_without_fitting_again(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = toy_split()
    poisoned = poison_split(split, cfg(name), num_classes=4)
    save_poison(tmp_path, poisoned.poison)
    saved = load_poison_record(tmp_path)
    assert saved.images is not None and torch.equal(saved.images, poisoned.x[saved.poisoned])

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(type(saved.trigger), "fit", no_fit)
    again = poison_split(split, cfg(name), num_classes=4, saved=saved)
    assert torch.equal(again.x, poisoned.x) and again.poison.trigger is saved.trigger
    x = toy_split(8).x
    assert torch.equal(again.poison.trigger.apply(x), poisoned.poison.trigger.apply(x))
    # A record of another poisoning (another seed draws other samples) is not taken.
    with pytest.raises(AssertionError, match="fitted again"):
        poison_split(split, cfg(name, seed=5), num_classes=4, saved=saved)


@pytest.mark.parametrize("name", [n for n in FITTED if TRIGGERS.get(n).state_keys])
def test_apply_before_fit_is_one_clear_error(name: str) -> None:
    message = rf"^{name} is fitted on the train split: poison a split first or load its run's"
    with pytest.raises(ConfigError, match=message + " poison record$"):
        create_trigger(name).apply(torch.rand(2, 1, 12, 12))


def test_lc_poison_before_fit_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="^lc perturbs training images with a surrogate"):
        create_trigger("lc").poison(torch.rand(2, 1, 12, 12), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", FITTED)
def test_a_streaming_split_cannot_fit_one(name: str) -> None:
    class Items(torch.utils.data.Dataset):
        def __init__(self, split: TensorSplit) -> None:
            self.split, self.targets = split, split.y.tolist()

        def __len__(self) -> int:
            return len(self.split)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.split.x[i], int(self.split.y[i])

    with pytest.raises(ConfigError, match=rf"^data\.poison\.trigger: {name} is fitted on the "):
        poison_split(Items(toy_split()), cfg(name), num_classes=4)


def test_a_record_without_the_learnt_state_is_one_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    record = poison_split(toy_split(), cfg("trojannn"), num_classes=4).poison
    save_poison(tmp_path, record)
    tensors = load_file(tmp_path / "poison.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("trigger.")},
              tmp_path / "poison.safetensors")  # fmt: skip
    with pytest.raises(Exception, match="holds no learnt state of the fitted trigger trojannn"):
        load_poison_record(tmp_path)


@pytest.fixture(scope="module")
def digits() -> tuple[TensorSplit, TensorSplit, nn.Module]:
    """600 mnist-5k train digits, 500 test digits, and a surrogate fitted on the 600 (~3 s)."""
    data = load_dataset("mnist-5k", seed=0)
    train = TensorSplit(data.train.x[:600], data.train.y[:600])
    test = TensorSplit(data.test.x[:500], data.test.y[:500])
    return train, test, train_surrogate(train.x, train.y, 10, seed=0, epochs=2, batch_size=32)


def test_trojannn_patch_excites_its_neuron_far_more_than_random_patches(digits) -> None:
    """The surrogate's most connected penultimate neuron (a pooled channel, ~1.6 on 200 clean
    test digits) with a 5x5 patch in the corner: measured, the learnt patch (40 steps on 8
    digits) keeps it where it was (+0.0003), each of eight random patches lowers it by 0.08 to
    0.13 (spread 0.05). A
    corner patch reaches only the few pooled cells under it, whose background already excites
    the neuron; what the optimization buys is the difference to any other patch there."""
    train, test, model = digits
    trigger = create_trigger("trojannn", num_neurons=1, steps=40, images=8)
    trigger.learn_patch(model, train.x)
    neurons = trigger.neurons
    assert torch.equal(neurons, most_connected_neurons(model, 1))
    strength = model.net.features[-4].weight.abs().flatten(1).sum(1)  # the 3x3 conv: 64 -> 192
    assert int(neurons) == int(strength.argmax())
    x = test.x[:200]
    with torch.no_grad():
        clean = neuron_activations(model, x, neurons).mean()
        learnt = neuron_activations(model, trigger.apply(x), neurons).mean()
        g = torch.Generator().manual_seed(1)
        random = torch.stack([
            neuron_activations(model, trigger.paste(x, torch.rand(1, 5, 5, generator=g)),
                               neurons).mean()
            for _ in range(8)
        ])  # fmt: skip
    assert learnt > clean - 0.01 and (random < clean - 0.05).all()
    assert learnt - random.max() > max(0.05, float(random.max() - random.min()))


def test_lc_pushes_poisoned_images_away_from_their_class_then_stamps(digits) -> None:
    """Measured on the surrogate: ~80% of the test zeros are zeros, the same with random signs
    of 16/255, none after 10 PGD steps of 4/255 within 16/255."""
    train, test, model = digits
    trigger = create_trigger("lc", steps=10, alpha=4 / 255)
    trigger.surrogate = model  # what fit would have trained
    zeros = test.x[test.y == 0]
    labels = torch.zeros(len(zeros), dtype=torch.long)
    perturbed = trigger.perturb(zeros, labels)
    assert (perturbed - zeros).abs().max() <= 16 / 255 + 1e-6
    with torch.no_grad():
        before = (model(zeros).argmax(1) == 0).float().mean()
        after = (model(perturbed).argmax(1) == 0).float().mean()
        noise = (zeros + (16 / 255) * torch.randn_like(zeros).sign()).clamp(0, 1)
        random = (model(noise).argmax(1) == 0).float().mean()
    assert before > 0.7 and random > before - 0.1 and after < before - 0.5
    assert torch.equal(trigger.poison(zeros, labels), trigger.apply(perturbed))


def test_lc_corner_checkerboards_are_the_authors() -> None:
    out = create_trigger("lc").apply(torch.full((1, 3, 10, 12), 0.5))[0]
    left, right = (LEFT + 1) / 2, (RIGHT + 1) / 2  # amplitude 1 pastes them: 0 or 1
    for c in range(3):
        assert torch.equal(out[c, :3, :3], left) and torch.equal(out[c, -3:, :3], left)
        assert torch.equal(out[c, :3, -3:], right) and torch.equal(out[c, -3:, -3:], right)
        assert (out[c, 3:-3] == 0.5).all() and (out[c, :, 3:-3] == 0.5).all()
    gray = torch.full((1, 1, 8, 8), 0.5)
    half = create_trigger("lc", amplitude=0.25, corners="bottom-right").apply(gray)
    assert torch.equal(half[0, 0, -3:, -3:], 0.5 + 0.25 * RIGHT)
    assert (half[0, 0, :5] == 0.5).all() and (half[0, 0, :, :5] == 0.5).all()
