"""The adaptive attacker's residual ASR: how much of a backdoor's power an attacker who knows the
defense gets back.

After a defense, the attacker holds the deployed model (white-box: gradients through all of it,
a defensive pixel prompt in front included, since the defended model's forward applies it) and
knows the target class. They search the strongest universal trigger of the same family and
budget as the original one, Neural-Cleanse style, on clean images of their own, with the
targeted search the prompt defense trains against (`UniversalPerturbation`). The residual ASR
is that trigger's ASR on the test split's non-target samples. A defense that only moved the
backdoor off its exact trigger, or hid it behind a prompt an attacker can re-optimize through,
keeps a high residual ASR; on the undefended model the search should find the backdoor itself.

The trigger's family and budget, fixed up front from the original trigger alone (`budget_of`):

- badnets (a patch): a mask + pattern patch, x' = (1 - m) x + m p, whose mask's L1 area is the
  trigger's patch area as a fraction of the image (a 3x3 patch on 28x28: 9 / 784); the mask may
  be soft and anywhere (Neural Cleanse's relaxation), its total weight within the area.
- every other trigger (blended, sig, wanet, ...): an additive universal perturbation,
  x' = clamp(x + delta, 0, 1), with |delta| <= eps where eps is the largest change the trigger
  makes to any pixel of the attacker's images, max |T(x) - x| (blended alpha 0.2: about 0.2;
  sig: its delta). A warp moves edges whole, so its eps is large (close to 1 on digits): the
  Linf family is a loose stand-in for a warp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from vptlab.backdoors.metrics import BackdoorThreat, stamp
from vptlab.backdoors.poison import non_target_index
from vptlab.backdoors.triggers import BadNetsTrigger, Trigger
from vptlab.data.base import DataSplits, TensorSplit, seeded_generator, split_labels
from vptlab.data.loaders import resize, to_rgb
from vptlab.defenses.prompt_defense import UniversalPerturbation

Family = Literal["patch", "linf"]
# The search's size. On a prompt-defended SimpleNet (mnist-5k, BadNets) the residual ASR it finds
# grew with it: 17% at 2 starts x 30 steps x 16 images, 34% at 4 x 100 x 16, 42% with the scanned
# start too, no more at 4 x 200 x 64 (4x the cost). One call there: ~25 s on one CPU thread, 9 of
# them the scan (a forward per square place on 8 images); on a GPU, seconds.
@dataclass(frozen=True)
class SearchSize:
    """How hard the attacker searches; `DEFAULTS` is read at call time, so one place sizes
    every search a caller does not size itself (the test suite shrinks it for CPU tests)."""

    starts: int = 4  # random starts (a patch search adds one scanned square)
    steps: int = 100  # sign-ascent steps, one mini-batch each
    batch_size: int = 16  # attacker images per step
    scan: bool = True  # a patch search's extra start from the best scanned square


DEFAULTS = SearchSize()
ALPHA = {"patch": 0.1, "linf": 0.05}  # step size: pixel range (patch), fraction of eps (linf)
ATTACKER_SAMPLES = 512  # clean train images the attacker holds
TEST_SAMPLES = 2000  # the most non-target test samples the residual ASR is measured on
_EVAL_BATCH = 256
_ATTACKER_STREAM = 0xADA  # keeps the attacker's draws apart from other uses of the seed


def budget_of(
    trigger: Trigger,
    x: torch.Tensor,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> tuple[Family, float]:
    """The search's family and budget for `trigger` (see the module docstring): ("patch", the
    patch's area as a fraction of the image) for badnets, else ("linf", max |T(x) - x| over the
    images `x`, stamped as `stamp(trigger, x, size, channels)` stamps the model's inputs)."""
    if isinstance(trigger, BadNetsTrigger):
        h, w = size or tuple(x.shape[-2:])
        ph, pw = trigger.shape
        return "patch", ph * pw / (h * w)
    change = stamp(trigger, x, size, channels) - x
    return "linf", float(change.abs().max())


def residual_asr(
    model: nn.Module,
    attacker_x: torch.Tensor,
    attacker_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    target: int,
    trigger: Trigger,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    starts: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    scan: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The ASR (%) on the non-target test samples of the strongest universal trigger of
    `trigger`'s family and budget (`budget_of`) that a targeted search finds on `model`.

    Images are model-ready (N, C, H, W) in [0, 1]; `size` / `channels`: the stored size and
    channels the trigger was trained at (see `stamp`). The search maximizes the target's mean
    log-probability over the attacker's non-target images, `steps` sign steps on mini-batches
    of `batch_size` from `starts` random starts (a patch search also starts from the best
    scanned white or black square), and keeps the start that sends most attacker images to the
    target. Deterministic in `seed` (the caller's random state is left as it was).

    Options left None come from `DEFAULTS`. Returns {"asr", "family", "budget", "starts"
    (every start searched), "steps", "attacker_samples", "test_samples"}.
    """
    starts = DEFAULTS.starts if starts is None else starts
    steps = DEFAULTS.steps if steps is None else steps
    batch_size = DEFAULTS.batch_size if batch_size is None else batch_size
    scan = DEFAULTS.scan if scan is None else scan
    if starts < 1 or steps < 1:
        raise ValueError(f"residual_asr needs starts >= 1 and steps >= 1, got {starts}, {steps}")
    device = next(model.parameters()).device
    family, budget = budget_of(trigger, attacker_x, size, channels)
    others = attacker_y != target
    x, y = attacker_x[others].to(device).float(), attacker_y[others].to(device)
    test_others = test_y != target
    test = test_x[test_others].to(device).float()
    if len(x) == 0 or len(test) == 0:
        raise ValueError("residual_asr: no attacker or test sample outside the target class")
    training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        searches = _searches(family, budget, target, starts, scan)
        order = torch.randperm(len(x), generator=seeded_generator(seed, _ATTACKER_STREAM))
        for step in range(steps):
            index = batch_window(order, step, batch_size).to(device)
            for search in searches:
                search.ascend(model, x[index], y[index], 1)
    with torch.no_grad():
        found = max(
            ((search, r) for search in searches for r in range(search.candidates)),
            key=lambda candidate: _success(model, x, target, *candidate),
        )
        asr = _success(model, test, target, *found)
    model.train(training)
    return {
        "asr": 100.0 * asr, "family": family, "budget": budget,
        "starts": sum(search.candidates for search in searches), "steps": steps,
        "attacker_samples": len(x), "test_samples": len(test),
    }  # fmt: skip


def _searches(
    family: Family, budget: float, target: int, starts: int, scan: bool
) -> list[UniversalPerturbation]:
    """The searches, all targeted at `target`: `starts` from random starts, and for a patch with
    `scan` one more from the scanned square (`UniversalPerturbation`'s starts)."""
    alpha = ALPHA[family]
    if family == "linf":
        return [UniversalPerturbation("linf", 0.0, budget, alpha, targets=[target] * starts,
                                      starts="uniform")]  # fmt: skip
    scanned = [UniversalPerturbation("patch", budget, 0.0, alpha, targets=[target], starts="scan")]
    uniform = UniversalPerturbation("patch", budget, 0.0, alpha, targets=[target] * starts,
                                    starts="uniform")  # fmt: skip
    return [*(scanned if scan else []), uniform]


def batch_window(order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """Step `step`'s mini-batch: the next `batch_size` indices of `order` (a fixed order of the
    images), wrapping around."""
    start = (step * batch_size) % len(order)
    return order.roll(-start)[: min(batch_size, len(order))]


def _success(model: nn.Module, x: torch.Tensor, target: int, search: UniversalPerturbation,
             candidate: int) -> float:  # fmt: skip
    """The share of `x` that candidate `candidate` of `search` sends to `target`."""
    search.best = candidate
    hits = sum(
        int((model(search.apply(chunk)).argmax(1) == target).sum())
        for chunk in x.split(_EVAL_BATCH)
    )
    return hits / len(x)


def model_inputs(
    split: TensorSplit | Dataset, index: torch.Tensor, img_size: int | None
) -> torch.Tensor:
    """The samples of `split` at `index` as the loaders feed them to the model: 3 channels,
    resized to `img_size` (the run's `data.img_size`)."""
    if isinstance(split, TensorSplit):
        x = split.x[index]
    else:
        x = torch.stack([split[int(i)][0] for i in index])
    x = to_rgb(x.float()).contiguous()
    return resize(x, img_size) if img_size is not None else x


def attacker_and_test(
    data: DataSplits, threat: BackdoorThreat, seed: int, img_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attacker_x, attacker_y, test_x, test_y): the attacker's `ATTACKER_SAMPLES` images, a
    seeded draw from the clean train split (drawn apart from the defender's clean subset, so the
    two may overlap: both hold clean in-distribution data), and the test split's non-target
    samples (a seeded `TEST_SAMPLES` of them when there are more)."""
    g = seeded_generator(seed, _ATTACKER_STREAM)
    train_y = split_labels(data.train)
    attacker = torch.randperm(len(train_y), generator=g)[:ATTACKER_SAMPLES].sort().values
    test_y = split_labels(data.test)
    keep = non_target_index(test_y, threat.target, threat.mode)
    if len(keep) > TEST_SAMPLES:
        keep = keep[torch.randperm(len(keep), generator=g)[:TEST_SAMPLES]].sort().values
    return (model_inputs(data.train, attacker, img_size), train_y[attacker],
            model_inputs(data.test, keep, img_size), test_y[keep])  # fmt: skip


def residual_metrics(
    poisoned: nn.Module,
    defended: nn.Module,
    data: DataSplits,
    threat: BackdoorThreat,
    seed: int,
    img_size: int | None = None,
    before: dict[str, Any] | None = None,
    **search: Any,
) -> dict[str, Any]:
    """The defend step's adaptive numbers: `residual_asr` and its dict `residual` on the
    defended model, and `residual_asr_before` on the poisoned one (the same search, seed and
    images: the reference that it finds the backdoor; `before`, that search's dict when already
    measured, is reused); `search`: `residual_asr`'s options. Empty for an all2all backdoor,
    which has no one target to search for."""
    if threat.mode != "all2one":
        return {}
    attacker_x, attacker_y, test_x, test_y = attacker_and_test(data, threat, seed, img_size)
    kwargs = {"size": threat.size, "channels": threat.channels, "seed": seed, **search}
    args = (attacker_x, attacker_y, test_x, test_y, threat.target, threat.trigger)
    after = residual_asr(defended, *args, **kwargs)
    before = before or residual_asr(poisoned, *args, **kwargs)
    return {"residual_asr": after["asr"], "residual": after, "residual_asr_before": before["asr"],
            "residual_before": before}  # fmt: skip
