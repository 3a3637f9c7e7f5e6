"""ASR and RA on hand-made predictions, the trigger as a suite threat on a hand-made model, the
trigger stamped before a resize, and ASR drop / DER on hand cases (one sign convention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.backdoors.metrics import BackdoorThreat, asr_drop, attack_success, der, stamp
from vptlab.backdoors.triggers import create_trigger
from vptlab.data.base import TensorSplit
from vptlab.data.loaders import resize
from vptlab.metrics import evaluate_suite
from vptlab.metrics.accuracy import Predictions


def predictions(y: list[int], pred: list[int]) -> Predictions:
    n = len(y)
    none = torch.zeros(n, dtype=torch.bool)
    return Predictions(torch.arange(n), torch.tensor(y), torch.tensor(pred), none, none.double())


def test_all2one_leaves_target_class_samples_out() -> None:
    # Counted: the four samples not of class 0; two predicted 0 (ASR), two right (RA).
    preds = predictions(y=[0, 1, 2, 3, 1, 0], pred=[0, 0, 0, 3, 1, 2])
    assert attack_success(preds, target=0) == {"asr": 50.0, "ra": 50.0}
    # Target 1: counted are samples 0, 2, 3, 5; none predicted 1, samples 0 and 3 right.
    assert attack_success(preds, target=1) == {"asr": 0.0, "ra": 50.0}


def test_all2all_aims_every_sample_at_the_next_class() -> None:
    preds = predictions(y=[0, 1, 2, 2], pred=[1, 1, 0, 2])  # targets 1, 2, 0, 0
    scores = attack_success(preds, target=0, mode="all2all", num_classes=3)
    assert scores == {"asr": 50.0, "ra": 50.0}


def test_asr_of_target_class_only_is_an_error() -> None:
    with pytest.raises(ValueError, match="target class"):
        attack_success(predictions(y=[0, 0], pred=[0, 1]), target=0)


class PatchReader(nn.Module):
    """Class 0 when the bottom-right pixel is white and the top-left one bright; else class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fires = (x[:, 0, -1, -1] > 0.99) & (x[:, 0, 0, 0] > 0.5)
        return F.one_hot(torch.where(fires, 0, 1), 3).float()


def test_threat_in_the_suite_scores_hand_made_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 3, 8, 8, generator=g) * 0.9
    y = torch.randint(0, 3, (60,), generator=g)
    model = PatchReader()
    model.weight = nn.Parameter(torch.zeros(1))  # the suite reads the device from a parameter
    threat = BackdoorThreat(create_trigger("badnets"), target=0)
    suite = evaluate_suite(model, TensorSplit(x, y), [threat], progress=False, batch_size=16)
    counted = y != 0
    bright = x[:, 0, 0, 0] > 0.5
    assert suite["badnets/asr"] == pytest.approx(100.0 * float(bright[counted].float().mean()))
    ra = ((~bright) & (y == 1))[counted].float().mean()
    assert suite["badnets/ra"] == pytest.approx(100.0 * float(ra))
    assert suite["clean/top1"] == pytest.approx(100.0 * float((y == 1).float().mean()))


@pytest.mark.parametrize("name", ["badnets", "blended", "lf", "sig", "wanet"])
def test_stamp_before_a_resize_matches_training_stamps(name: str) -> None:
    """28 px images upsized to 56 px by the loader: the suite stamps the 56 px batch close to
    what training stamped at 28 px before the resize, unlike a trigger drawn at 56 px."""
    trigger = create_trigger(name, seed=0)
    smooth = torch.rand(4, 1, 7, 7, generator=torch.Generator().manual_seed(1))
    native = resize(smooth, 28)  # smooth like real images (pure noise does not survive resizes)
    trained_on = resize(trigger.apply(native), 56)
    stamped = stamp(trigger, resize(native, 56), size=(28, 28))
    naive = trigger.apply(resize(native, 56))
    error = (stamped - trained_on).abs().mean()
    assert error < 0.005 and error < (naive - trained_on).abs().mean() / 3
    assert torch.equal(stamp(trigger, native, size=(28, 28)), trigger.apply(native))


def test_asr_drop_and_der_hand_cases() -> None:
    # dX = X_backdoored - X_defended; DER takes them as fractions and lies in [0, 1].
    assert asr_drop(100.0, 10.0) == 90.0
    assert asr_drop(10.0, 30.0) == -20.0  # a defense that raised the ASR
    assert der(90.0, 88.0, 100.0, 10.0) == pytest.approx((0.90 - 0.02 + 1) / 2)  # 0.94
    assert der(90.0, 90.0, 100.0, 0.0) == 1.0  # the ideal defense
    assert der(90.0, 92.0, 50.0, 60.0) == 0.5  # CA and ASR both up: no credit, no cost
    assert der(100.0, 0.0, 50.0, 50.0) == 0.0  # the worst: all accuracy lost, ASR kept
    with pytest.raises(ValueError, match="asr_after must be a percentage"):
        der(90.0, 88.0, 100.0, 120.0)
