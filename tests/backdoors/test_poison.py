"""Poisoning: exactly round(rate x N) seeded samples, the clean split untouched, labels as the
mode says, clean-label from the target class only (dirty-label all2one from the others), WaNet
cross samples redrawn every train batch, the same poisoning for streaming datasets, a backdoor
test set without target-class samples, and the run-folder files read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from vptlab.backdoors.poison import (
    POISON_FILE,
    POISON_INDICES_FILE,
    CrossNoise,
    PoisonedDataset,
    PoisonedTensorSplit,
    backdoor_test_split,
    load_poison,
    load_poison_record,
    poison_split,
    save_poison,
)
from vptlab.backdoors.triggers import create_trigger
from vptlab.config import PoisonConfig
from vptlab.data.base import TensorSplit, seeded_generator
from vptlab.data.loaders import make_loader
from vptlab.errors import ConfigError


def toy_split(n: int = 200, classes: int = 4, seed: int = 0, size: int = 12) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.rand(n, 1, size, size, generator=g) * 0.9,
                       torch.randint(0, classes, (n,), generator=g))  # fmt: skip


class Items(Dataset):
    """A streaming view of a TensorSplit: one (C,H,W) image and an int label per item."""

    def __init__(self, split: TensorSplit, with_targets: bool = True) -> None:
        self.split = split
        if with_targets:
            self.targets = split.y.tolist()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.split.x[index], int(self.split.y[index])


def cfg(**kwargs) -> PoisonConfig:
    return PoisonConfig(**{"trigger": "badnets", "rate": 0.1, "target": 0, **kwargs})


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    rate=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["all2one", "all2all"]),
)
def test_poisons_exactly_round_rate_n_and_leaves_the_clean_split_alone(
    n: int, rate: float, seed: int, mode: str
) -> None:
    split = toy_split(n, seed=seed)
    x_before, y_before = split.x.clone(), split.y.clone()
    config = cfg(rate=rate, mode=mode, target=1, seed=seed)
    if round(rate * n) == 0:
        with pytest.raises(ConfigError, match=r"^data\.poison\.rate: .* poisons none"):
            poison_split(split, config, num_classes=4)
        return
    if mode == "all2one" and round(rate * n) > int((split.y != 1).sum()):
        with pytest.raises(ConfigError, match=r"^data\.poison\.rate: dirty-label all2one"):
            poison_split(split, config, num_classes=4)
        return
    out = poison_split(split, config, num_classes=4)
    assert torch.equal(split.x, x_before) and torch.equal(split.y, y_before)
    assert isinstance(out, PoisonedTensorSplit) and out.clean is split
    poisoned = out.poison.poisoned
    assert len(poisoned) == round(rate * n) == len(torch.unique(poisoned))
    clean = torch.ones(n, dtype=torch.bool)
    clean[poisoned] = False
    assert torch.equal(out.x[clean], split.x[clean]) and torch.equal(out.y[clean], split.y[clean])
    trigger = create_trigger("badnets", seed=seed)
    assert torch.equal(out.x[poisoned], trigger.apply(split.x[poisoned]))
    expected = torch.full_like(poisoned, 1) if mode == "all2one" else (split.y[poisoned] + 1) % 4
    assert torch.equal(out.y[poisoned], expected)
    assert torch.equal(out.poison.original_labels, split.y[poisoned])


def test_the_seed_picks_the_samples() -> None:
    split = toy_split(500)
    first = poison_split(split, cfg(seed=3), num_classes=4)
    again = poison_split(split, cfg(seed=3), num_classes=4)
    other = poison_split(split, cfg(seed=4), num_classes=4)
    run_seed = poison_split(split, cfg(), num_classes=4, seed=3)  # data.poison.seed unset
    assert torch.equal(first.poison.poisoned, again.poison.poisoned)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert torch.equal(run_seed.poison.poisoned, first.poison.poisoned)
    assert not torch.equal(first.poison.poisoned, other.poison.poisoned)


def test_dirty_label_all2one_poisons_only_non_target_samples() -> None:
    split = toy_split(400)
    for seed in range(5):
        out = poison_split(split, cfg(target=2, rate=0.2, seed=seed), 4)
        poisoned = out.poison.poisoned
        assert len(poisoned) == 80 and not (split.y[poisoned] == 2).any()
    available = int((split.y != 2).sum())
    with pytest.raises(ConfigError) as error:
        poison_split(split, cfg(target=2, rate=0.9), 4)
    message = str(error.value)
    assert message.startswith("data.poison.rate: dirty-label all2one poisoning needs 360 samples")
    assert f"has {available}" in message and "\n" not in message
    # all2all keeps every sample a candidate: the target class too.
    everything = poison_split(split, cfg(target=2, rate=1.0, mode="all2all"), 4)
    assert len(everything.poison.poisoned) == 400


def test_clean_label_poisons_only_target_class_samples_and_keeps_labels() -> None:
    split = toy_split(400, size=28)
    out = poison_split(split, cfg(trigger="sig", label="clean", target=2, rate=0.1), 4)
    poisoned = out.poison.poisoned
    assert len(poisoned) == 40 and (split.y[poisoned] == 2).all()
    assert torch.equal(out.y, split.y)
    assert not torch.equal(out.x[poisoned], split.x[poisoned])


def test_clean_label_with_too_few_target_samples_is_one_error() -> None:
    split = toy_split(400)
    available = int((split.y == 2).sum())
    with pytest.raises(ConfigError) as error:
        poison_split(split, cfg(label="clean", target=2, rate=0.5), 4)
    message = str(error.value)
    assert message.startswith("data.poison.rate: clean-label poisoning needs 200 samples")
    assert f"has {available}" in message and "\n" not in message


def test_target_outside_the_classes_is_one_error() -> None:
    with pytest.raises(ConfigError, match=r"^data\.poison\.target: 4 is not a class"):
        poison_split(toy_split(), cfg(target=4), num_classes=4)


def _cross_batches(split, seed: int = 0, epochs: int = 2, batch_size: int = 64) -> list:
    loader = make_loader(split, batch_size, train=True, seed=seed)
    return [(epoch, batch) for epoch in range(epochs) for batch in loader]


def test_wanet_cross_samples_and_noise_are_redrawn_every_batch() -> None:
    split = toy_split(400)
    out = poison_split(split, cfg(trigger="wanet", rate=0.1, options={"cross_ratio": 2}), 4)
    record, transform = out.poison, out.train_transform
    assert isinstance(transform, CrossNoise) and not hasattr(record, "cross")
    assert record.counts() == {"samples": 400, "classes": 4, "poisoned": 40, "cross_ratio": 2.0}
    poisoned = set(record.poisoned.tolist())
    # The poisoned samples are stamped once, fixed: the split holds them.
    assert torch.equal(out.x[record.poisoned], record.trigger.apply(split.x[record.poisoned]))
    crossed: dict[int, set[int]] = {0: set(), 1: set()}
    for epoch, batch in _cross_batches(out):
        stored = out.x[batch.index]
        changed = (batch.x[:, :1] - stored).flatten(1).abs().amax(dim=1) > 0
        num_bd = sum(int(i) in poisoned for i in batch.index)
        assert int(changed.sum()) == int(num_bd * 2)  # BackdoorBench: int(num_bd x ratio)
        cross = batch.index[changed]
        assert not poisoned & set(cross.tolist())  # poisoned samples stay the fixed ones
        assert torch.equal(batch.y, out.y[batch.index])  # cross samples keep true labels
        # A cross sample is the noise-mode warp, not the trigger's exact warp.
        assert not torch.allclose(batch.x[changed, :1], record.trigger.apply(stored[changed]))
        crossed[epoch] |= set(cross.tolist())
    assert crossed[0] != crossed[1]  # other cross samples in another epoch
    # Fresh noise in every draw: the same images, two generators, two warps.
    x, index = out.x[:32], torch.arange(32)
    first = transform(x, index, seeded_generator(1))
    second = transform(x, index, seeded_generator(2))
    both = [i for i in range(32) if not torch.equal(first[i], x[i])
            and not torch.equal(second[i], x[i])]  # fmt: skip
    assert all(not torch.equal(first[i], second[i]) for i in both)
    # Evaluation never sees cross samples.
    for batch in make_loader(out, 64, train=False):
        assert torch.equal(batch.x[:, :1], out.x[batch.index])


def test_wanet_cross_samples_are_reproducible_and_resume_exactly() -> None:
    split = toy_split(400)
    out = poison_split(split, cfg(trigger="wanet", rate=0.1, seed=3), 4)
    run, again = _cross_batches(out, seed=5), _cross_batches(out, seed=5)
    assert all(torch.equal(a.x, b.x) for (_, a), (_, b) in zip(run, again, strict=True))
    other = _cross_batches(out, seed=6)
    assert not all(torch.equal(a.x, b.x) for (_, a), (_, b) in zip(run, other, strict=True))
    resumed = make_loader(out, 64, train=True, seed=5)
    resumed.set_epoch(1, 2)
    tail = [b for e, b in run if e == 1][2:]
    assert all(torch.equal(a.x, b.x) for a, b in zip(resumed, tail, strict=True))


def test_streaming_wanet_draws_the_tensor_splits_cross_samples() -> None:
    split = toy_split(100)
    config = cfg(trigger="wanet", rate=0.1)
    tensors = poison_split(split, config, num_classes=4)
    stream = poison_split(Items(split), config, num_classes=4)
    assert isinstance(stream.train_transform, CrossNoise)
    for i in range(len(split)):  # per item: only the fixed poisoned samples are warped
        assert torch.equal(stream[i][0], tensors.x[i])
    for (_, a), (_, b) in zip(_cross_batches(tensors, batch_size=25),
                              _cross_batches(stream, batch_size=25), strict=True):  # fmt: skip
        assert torch.equal(a.index, b.index) and torch.equal(a.y, b.y)
        torch.testing.assert_close(a.x, b.x)


def test_triggers_without_noise_mode_have_no_train_transform() -> None:
    assert poison_split(toy_split(), cfg(), 4).train_transform is None
    assert poison_split(Items(toy_split()), cfg(), 4).train_transform is None


def test_streaming_dataset_is_poisoned_per_item_like_the_tensors() -> None:
    split = toy_split(120)
    config = cfg(rate=0.25, mode="all2all")
    tensors = poison_split(split, config, num_classes=4)
    for with_targets in (True, False):
        stream = poison_split(Items(split, with_targets), config, num_classes=4)
        assert isinstance(stream, PoisonedDataset)
        assert torch.equal(stream.poison.poisoned, tensors.poison.poisoned)
        assert stream.targets == tensors.y.tolist()
        for i in range(len(split)):
            x, y = stream[i]
            assert torch.equal(x, tensors.x[i]) and y == int(tensors.y[i])


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_backdoor_test_split_holds_no_target_sample(mode: str) -> None:
    test = toy_split(300, seed=1)
    trigger = create_trigger("badnets")
    bd = backdoor_test_split(test, trigger, target=3, mode=mode)
    keep = test.y != 3 if mode == "all2one" else torch.ones(300, dtype=torch.bool)
    assert len(bd) == int(keep.sum())
    assert torch.equal(bd.y, test.y[keep])  # true labels
    if mode == "all2one":
        assert not (bd.y == 3).any()
    assert torch.equal(bd.x, trigger.apply(test.x[keep]))
    stream = backdoor_test_split(Items(test), trigger, target=3, mode=mode)
    assert len(stream) == len(bd)
    assert all(torch.equal(stream[i][0], bd.x[i]) and stream[i][1] == int(bd.y[i])
               for i in range(0, len(bd), 17))  # fmt: skip


def test_run_folder_files_round_trip(tmp_path: Path) -> None:
    split = toy_split(300)
    out = poison_split(split, cfg(trigger="wanet", rate=0.1, seed=5), num_classes=4)
    save_poison(tmp_path, out.poison)
    assert (tmp_path / POISON_FILE).is_file() and (tmp_path / POISON_INDICES_FILE).is_file()
    indices, trigger, config = load_poison(tmp_path)
    assert torch.equal(indices, out.poison.poisoned)
    assert config == out.poison.config and config.seed == 5
    assert torch.equal(trigger.apply(split.x[:8]), out.poison.trigger.apply(split.x[:8]))
    record = load_poison_record(tmp_path)
    assert torch.equal(record.original_labels, split.y[indices])
    assert record.counts() == {"samples": 300, "classes": 4, "poisoned": 30, "cross_ratio": 2.0}
