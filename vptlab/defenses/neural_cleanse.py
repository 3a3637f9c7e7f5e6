"""Neural Cleanse (`nc`; Wang et al. 2019, "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", IEEE S&P): for every class, reverse-engineer the smallest trigger
that sends clean images there; a class whose trigger is far smaller than the others' is a
backdoor's target, and the repair unlearns that trigger.

1. Reverse engineering (`reverse_engineer`), for each class t: a mask m (1, H, W) and a pattern
   p (C, H, W) in [0, 1], the patch family x' = (1 - m) x + m p (`stamp_patch`, shared with the
   prompt defense's and the adaptive attacker's searches), minimizing CE(f(x'), t) + cost x
   |m|_1 over the defender's clean images (all of them, those of class t too, as the authors).
   As the authors' visualizer.py: m and p live in tanh space (m = tanh(w) / (2 - eps) + 0.5),
   start uniformly random, and are trained by Adam (lr 0.1, betas 0.5, 0.9); a step is
   `batches` mini-batches, after which the cost moves: it is 0 until the trigger has succeeded
   (>= 99% of the step's images sent to t) `patience` (5) steps in a row, then `init_cost`
   (1e-3), multiplied by 2 after `patience` successful steps in a row and divided by 2^1.5
   after `patience` failing ones. The kept trigger is the smallest-norm one that succeeded (the
   last one if none did); a class stops once its best norm has not improved for
   `early_stop_patience` (25) steps after its cost went both up and down.
   The classes search side by side (one forward for a group of them), each with its own cost
   schedule; Adam works element by element and the classes' losses share no parameter, so this
   is one search per class, batched.
2. Detection (`outliers`, the authors' mad_outlier_detection.py): the consistency-scaled MAD
   of the classes' mask norms n, 1.4826 x median(|n - median(n)|); a class's anomaly index is
   |n - median| / MAD. The model is backdoored when the smallest norm's index exceeds 2; the
   flagged classes are those below the median with an index above 2, smallest norm first.
3. Mitigation by unlearning (the paper's Sec. VI-C; BackdoorBench's defense/nc.py): fine-tune on
   the clean data, 20% of which carry a flagged class's reversed trigger and keep their true
   labels (`Unlearning`; the share is drawn in every batch, where BackdoorBench stamps a fixed
   20% of its subset). With no class flagged the model is returned as it is, as BackdoorBench
   does, but through the one `fit` (the defended run has its folder, weights and curves) with a
   task that changes nothing (`Unchanged`).

Why its own search rather than `UniversalPerturbation`: that search fixes the trigger's budget
and maximizes its success; Neural Cleanse fixes the success (99%) and minimizes the mask, with
the authors' optimizer and cost schedule. Shared are the patch family (`stamp_patch`), the
model-ready images (`adaptive.model_inputs`) and the mini-batch windows (`adaptive.batch_window`).

The search's size. The authors (gtsrb_visualize_example.py) run up to 1,000 steps of ~31
mini-batches of 32 images (1,000 images a step) per class, early stopped; BackdoorBench 80
epochs over its 5% clean subset (10 batches of 256 on CIFAR-10). Scaled to a CPU, the defaults
are up to 100 steps of 4 mini-batches of 32 images, from at most 1,000 of the defender's clean
images, early stopped as the authors (`SearchOptions`; the options `steps`, `batches`,
`batch_size` and `samples`). On mnist-5k's SimpleNet that is 5 minutes on 2 shared CPU cores.

Detector `nc` (setting "model", `vptlab detect`): the same search and test as a verdict on the
model, not a score per input (`NeuralCleanseDetector`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from vptlab.attacks import frozen_parameters
from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits, TensorSplit, seeded_generator
from vptlab.data.loaders import Batch
from vptlab.defenses.adaptive import batch_window, model_inputs
from vptlab.defenses.detectors import DETECTORS
from vptlab.defenses.prompt_defense import stamp_patch
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL
from vptlab.engine.checkpoint import tensor_digest
from vptlab.engine.tasks import Task
from vptlab.errors import ConfigError
from vptlab.runs import atomic_write

# Detection (mad_outlier_detection.py) and unlearning (the paper; BackdoorBench's nc.py).
CONSISTENCY = 1.4826  # MAD -> standard deviation under a normal distribution
THRESHOLD = 2.0  # anomaly index above which a class is flagged
UNLEARN_RATIO = 0.2  # the share of the clean samples stamped with a reversed trigger
BETAS = (0.5, 0.9)  # Adam's, as the authors'
_EPSILON = 1e-7  # Keras' epsilon in the tanh parametrization
_GROUP_IMAGES = 1024  # stamped images per forward: how many classes search side by side
_NC_STREAM = 0x7C  # keeps the search's draws apart from other uses of the seed


@dataclass(frozen=True)
class SearchOptions:
    """The reverse engineering's size, optimizer and cost schedule (see the module docstring).

    The defaults are the authors' (visualizer.py, gtsrb_visualize_example.py) with the size
    scaled to a CPU: steps 100 (theirs 1000), batches 4 (theirs ~31: 1,000 images a step),
    batch_size 32, samples 1000 (the most clean images drawn from); lr 0.1, init_cost 1e-3,
    success 0.99 (ATTACK_SUCC_THRESHOLD), patience 5, cost_multiplier 2 (down: 2^1.5),
    early_stop_patience 25, early_stop_threshold 1.0 (BackdoorBench: 0.99), reset_cost_to_zero
    true (the cost starts at 0; BackdoorBench starts at init_cost).
    """

    steps: int = 100
    batches: int = 4
    batch_size: int = 32
    samples: int = 1000
    lr: float = 0.1
    init_cost: float = 1e-3
    success: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0
    early_stop_patience: int = 25
    early_stop_threshold: float = 1.0
    reset_cost_to_zero: bool = True


# What an option left unset takes, read when a search starts (so tests shrink every search).
DEFAULTS = SearchOptions()


def search_options(**options: Any) -> SearchOptions:
    """`DEFAULTS` with the given options that are not None."""
    return replace(DEFAULTS, **{k: v for k, v in options.items() if v is not None})


@dataclass
class CostSchedule:
    """One class's cost and early stop, moved after each step as the authors' visualizer.py."""

    options: SearchOptions
    cost: float = 0.0
    best: float = math.inf  # the smallest mask norm of a successful step so far
    set_counter: int = 0
    up: int = 0
    down: int = 0
    up_flag: bool = False
    down_flag: bool = False
    stop_counter: int = 0
    stop_best: float = math.inf

    def __post_init__(self) -> None:
        self.cost = 0.0 if self.options.reset_cost_to_zero else self.options.init_cost

    def step(self, rate: float, norm: float) -> tuple[bool, bool]:
        """After a step whose trigger sent `rate` of the images to the class with a mask of L1
        `norm`: (whether it is the best trigger so far, whether the search stops)."""
        o = self.options
        succeeded = rate >= o.success
        improved = succeeded and norm < self.best
        if improved:
            self.best = norm
        if self.best < math.inf:  # only stop once a trigger has been found
            stalled = self.best >= o.early_stop_threshold * self.stop_best
            self.stop_counter = self.stop_counter + 1 if stalled else 0
        self.stop_best = min(self.stop_best, self.best)
        if self.up_flag and self.down_flag and self.stop_counter >= o.early_stop_patience:
            return improved, True
        if self.cost == 0 and succeeded:
            self.set_counter += 1
            if self.set_counter >= o.patience:
                self.cost, self.up, self.down = o.init_cost, 0, 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        self.up, self.down = (self.up + 1, 0) if succeeded else (0, self.down + 1)
        if self.up >= o.patience:
            self.up, self.up_flag = 0, True
            self.cost *= o.cost_multiplier
        elif self.down >= o.patience:
            self.down, self.down_flag = 0, True
            self.cost /= o.cost_multiplier**1.5
        return improved, False


@dataclass
class ReversedTriggers:
    """Each class's reversed trigger: masks (K, 1, H, W), patterns (K, C, H, W), on the CPU;
    `norms` the masks' L1, `success` the share of a step's images the kept trigger sent to its
    class, `steps` how many steps each class ran."""

    classes: list[int]
    masks: torch.Tensor
    patterns: torch.Tensor
    norms: list[float]
    success: list[float]
    steps: list[int]


def _to_tanh(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - _EPSILON)).clamp(-1 + 1e-6, 1 - 1e-6))


def _from_tanh(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / (2 - _EPSILON) + 0.5


def reverse_engineer(
    model: nn.Module,
    x: torch.Tensor,
    classes: int | Sequence[int],
    options: SearchOptions | None = None,
    seed: int = 0,
) -> ReversedTriggers:
    """Neural Cleanse's trigger for each of `classes` (a count: every class) on the clean
    model-ready images `x` (N, C, H, W) in [0, 1] (see the module docstring). Uses at most
    `options.samples` of them, a seeded draw; deterministic in `seed`, the caller's random
    state left as it was."""
    o = options or DEFAULTS
    targets = list(range(classes)) if isinstance(classes, int) else [int(c) for c in classes]
    if not targets:
        raise ValueError("reverse_engineer needs at least one class")
    g = seeded_generator(seed, _NC_STREAM)
    if len(x) > o.samples:
        x = x[torch.randperm(len(x), generator=g)[: o.samples].sort().values]
    device = next(model.parameters()).device
    x = x.to(device).float()
    order = torch.randperm(len(x), generator=g)
    per_group = max(1, _GROUP_IMAGES // min(o.batch_size, len(x)))
    groups = [targets[i : i + per_group] for i in range(0, len(targets), per_group)]
    with frozen_parameters(model):  # the modes too: every draw is from `g`
        model.eval()
        parts = [_search(model, x, group, order, o, g) for group in groups]
    return ReversedTriggers(
        targets, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
        [n for p in parts for n in p[2]], [s for p in parts for s in p[3]],
        [s for p in parts for s in p[4]],
    )  # fmt: skip


def _search(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[int],
    order: torch.Tensor,
    o: SearchOptions,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float], list[int]]:
    """The batched search of one group of classes: (masks, patterns, norms, success, steps)."""
    k = len(targets)
    c, h, w = x.shape[1:]
    mask_w = _to_tanh(torch.rand(k, 1, h, w, generator=g)).to(x.device).requires_grad_(True)
    pattern_w = _to_tanh(torch.rand(k, c, h, w, generator=g)).to(x.device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_w, pattern_w], lr=o.lr, betas=BETAS)
    schedules = [CostSchedule(o) for _ in targets]
    best_mask = torch.zeros(k, 1, h, w)
    best_pattern = torch.zeros(k, c, h, w)
    found = [False] * k
    success, steps = [0.0] * k, [0] * k
    active = list(range(k))
    labels = torch.tensor(targets, device=x.device)
    for step in range(o.steps):
        rows = torch.tensor(active, device=x.device)
        cost = torch.tensor([schedules[r].cost for r in active], device=x.device)
        hits = torch.zeros(len(active), device=x.device)
        norms = torch.zeros(len(active), device=x.device)
        seen = 0
        for b in range(o.batches):
            batch = x[batch_window(order, step * o.batches + b, o.batch_size).to(x.device)]
            mask, pattern = _from_tanh(mask_w[rows]), _from_tanh(pattern_w[rows])
            stamped = stamp_patch(batch[None], mask[:, None], pattern[:, None])
            logits = model(stamped.flatten(0, 1)).float().view(len(active), len(batch), -1)
            target = labels[rows][:, None].expand(-1, len(batch))
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            norm = mask.flatten(1).sum(1)
            loss = ce.view(len(active), -1).mean(1) + cost * norm
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            hits += (logits.detach().argmax(2) == target).sum(1)
            norms += norm.detach() * len(batch)
            seen += len(batch)
        rates, mean_norms = (hits / seen).tolist(), (norms / seen).tolist()
        with torch.no_grad():
            mask, pattern = _from_tanh(mask_w[rows]).cpu(), _from_tanh(pattern_w[rows]).cpu()
        still = []
        for i, r in enumerate(active):
            improved, stop = schedules[r].step(rates[i], mean_norms[i])
            steps[r] = step + 1
            if improved:
                best_mask[r], best_pattern[r], success[r] = mask[i], pattern[i], rates[i]
                found[r] = True
            if not stop:
                still.append(r)
            if (stop or step == o.steps - 1) and not found[r]:  # none succeeded: the last one
                best_mask[r], best_pattern[r], success[r] = mask[i], pattern[i], rates[i]
        active = still
        if not active:
            break
    norms_out = best_mask.flatten(1).sum(1).tolist()
    return best_mask, best_pattern, norms_out, success, steps


@dataclass
class Outliers:
    """The MAD outlier test on the classes' mask norms (mad_outlier_detection.py)."""

    median: float
    mad: float
    indices: list[float]  # each class's anomaly index, |norm - median| / MAD
    anomaly_index: float  # the smallest norm's index
    flagged: list[int] = field(default_factory=list)  # below the median, index > threshold


def outliers(
    norms: Sequence[float], classes: Sequence[int] | None = None, threshold: float = THRESHOLD
) -> Outliers:
    """Anomaly indices of `norms` (one per class of `classes`, default 0..K-1): flagged are the
    classes below the median whose index exceeds `threshold`, smallest norm first. A zero MAD
    (more than half the norms equal) makes any norm apart from them an outlier."""
    n = torch.tensor([float(v) for v in norms], dtype=torch.float64)
    if len(n) < 2:
        raise ValueError("the anomaly index needs the norms of at least two classes")
    classes = list(range(len(n))) if classes is None else list(classes)
    # np.median as the authors' (the mean of the two middle values for an even count).
    median = float(n.quantile(0.5))
    mad = CONSISTENCY * float((n - median).abs().quantile(0.5))
    scale = max(mad, 1e-12 * max(abs(median), 1.0))
    indices = ((n - median).abs() / scale).tolist()
    smallest = int(n.argmin())
    flagged = [classes[i] for i in n.argsort().tolist()
               if n[i] < median and indices[i] > threshold]  # fmt: skip
    return Outliers(median, mad, indices, indices[smallest], flagged)


@dataclass
class CleanseResult:
    """What `neural_cleanse` finds: the reversed triggers and the outlier test on their norms."""

    triggers: ReversedTriggers
    outliers: Outliers
    seconds: float  # the search's
    reused: bool = False  # taken from an earlier identical search (`neural_cleanse`'s cache)

    @property
    def flagged(self) -> list[int]:
        return self.outliers.flagged

    @property
    def anomaly_index(self) -> float:
        return self.outliers.anomaly_index

    def summary(self) -> dict[str, Any]:
        """The numbers for a run's metrics.json: per-class norms, indices and success, the
        smallest norm's anomaly index, the flagged classes, the steps run and the seconds."""
        t, out = self.triggers, self.outliers
        return {
            "classes": t.classes, "norms": t.norms, "indices": out.indices,
            "success": t.success, "steps": t.steps, "median": out.median, "mad": out.mad,
            "anomaly_index": out.anomaly_index, "flagged": out.flagged,
            "backdoored": bool(out.flagged), "seconds": self.seconds, "reused": self.reused,
        }  # fmt: skip


def neural_cleanse(
    model: nn.Module,
    x: torch.Tensor,
    num_classes: int,
    options: SearchOptions | None = None,
    threshold: float = THRESHOLD,
    seed: int = 0,
    cache: Path | None = None,
) -> CleanseResult:
    """Neural Cleanse on `model` with clean model-ready images `x` (N, C, H, W) in [0, 1]:
    every class's reversed trigger (`reverse_engineer`) and the MAD test on their mask norms
    (`outliers`); the model is judged backdoored when a class is flagged. Model-level: one
    verdict for the model, no score per input.

    With a `cache` folder the reversed triggers are kept there under a key of everything the
    search depends on (`search_key`) and taken back when the same search comes again: the
    repair `nc` and the detector `nc` of one run search once (`reused` in the result)."""
    start = time.perf_counter()
    options = options or DEFAULTS
    path = None if cache is None else _cache_path(cache, search_key(model, x, num_classes,
                                                                    options, seed))  # fmt: skip
    cached = _cached(path)
    if cached is None:
        triggers = reverse_engineer(model, x, num_classes, options, seed)
        seconds = time.perf_counter() - start
        if path is not None:
            _store(path, triggers, seconds)
    else:
        triggers, seconds = cached
    found = outliers(triggers.norms, triggers.classes, threshold)
    return CleanseResult(triggers, found, seconds, cached is not None)


# Bump when the search changes what it finds: the cached triggers of an older search are then
# not taken back.
_SEARCH_VERSION = 1
CACHE_FOLDER = ".neural_cleanse"  # in the cache folder given: a study's output folder


def search_key(model: nn.Module, x: torch.Tensor, num_classes: int, options: SearchOptions,
               seed: int) -> str:  # fmt: skip
    """What a search's result depends on: the weights and buffers, the images, the classes, the
    options, the seed and the device type (a GPU search draws the same but computes apart)."""
    device = next(model.parameters()).device.type
    h = hashlib.sha256()
    h.update(tensor_digest(model.state_dict()).encode())
    h.update(tensor_digest({"x": x}).encode())
    spec = {"classes": num_classes, "options": asdict(options), "seed": seed, "device": device,
            "version": _SEARCH_VERSION}  # fmt: skip
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _cache_path(cache: Path, key: str) -> Path:
    return cache / CACHE_FOLDER / f"{key}.safetensors"


def _cached(path: Path | None) -> tuple[ReversedTriggers, float] | None:
    """The search stored at `path` and the seconds it took, in one read of the file; None when
    there is none, or when it cannot be read (then it is searched again and stored anew)."""
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["search"])
            masks, patterns = f.get_tensor("masks"), f.get_tensor("patterns")
        found = ReversedTriggers(meta["classes"], masks, patterns, meta["norms"],
                                 meta["success"], meta["steps"])  # fmt: skip
        return found, float(meta["seconds"])
    except (SafetensorError, KeyError, ValueError, OSError):
        return None


def _store(path: Path, t: ReversedTriggers, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"classes": t.classes, "norms": t.norms, "success": t.success, "steps": t.steps,
            "seconds": seconds}  # fmt: skip
    tensors = {"masks": t.masks.contiguous(), "patterns": t.patterns.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"search": json.dumps(meta)}))


def clean_images(split: TensorSplit | Dataset, samples: int, seed: int,
                 img_size: int | None) -> torch.Tensor:  # fmt: skip
    """At most `samples` images of the defender's clean `split` as the model sees them (3
    channels, resized to `img_size`), a seeded draw stratified by nothing: NC needs no label."""
    index = torch.randperm(len(split), generator=seeded_generator(seed, _NC_STREAM, 1))[:samples]
    return model_inputs(split, index.sort().values, img_size)


class Unlearning:
    """The repair's task: cross-entropy on clean batches in which a `ratio` share of the samples
    (drawn in each batch from the loop's seeded random state) carry a flagged class's reversed
    trigger, split evenly between the flagged classes, and keep their true labels."""

    def __init__(self, masks: torch.Tensor, patterns: torch.Tensor, ratio: float,
                 label_smoothing: float = 0.0) -> None:  # fmt: skip
        self.masks, self.patterns, self.ratio = masks, patterns, ratio
        self.label_smoothing = label_smoothing

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with round(ratio x len(x)) random samples stamped."""
        if x.shape[-2:] != self.masks.shape[-2:]:
            raise ConfigError(
                f"nc: the reversed triggers are {tuple(self.masks.shape[-2:])}, the batch's "
                f"images {tuple(x.shape[-2:])}; the search and the training must see one size"
            )
        count = round(self.ratio * len(x))
        if count == 0:
            return x
        chosen = torch.randperm(len(x), device=x.device)[:count]
        which = torch.arange(count, device=x.device) % len(self.masks)
        mask, pattern = self.masks.to(x.device)[which], self.patterns.to(x.device)[which]
        x = x.clone()
        x[chosen] = stamp_patch(x[chosen], mask, pattern).to(x.dtype)
        return x

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.stamp(batch.x))
        loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        return loss, logits


class Unchanged:
    """The task when no class is flagged: the model stays as it is through the loop. Each batch
    is only evaluated (eval mode, so BatchNorm's statistics stay; no gradient), and the loss is
    its cross-entropy as a constant that reaches no parameter: no parameter gets a gradient, so
    the optimizer (weight decay included) skips them all."""

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw_model.eval()
        with torch.no_grad():
            logits = raw_model(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y)
        return loss.requires_grad_(True), logits


class NeuralCleanse:
    """Repairer `nc`: the reverse engineering and the outlier test in `before_fit`, then the
    unlearning of the flagged classes' triggers (see the module docstring). `options`: the
    search's options set by the user, the others from `DEFAULTS`."""

    name = "nc"
    trains = TRAINS_MODEL

    def __init__(self, options: dict[str, Any] | None = None, threshold: float = THRESHOLD,
                 unlearn_ratio: float = UNLEARN_RATIO) -> None:  # fmt: skip
        self.options = dict(options or {})
        self.threshold, self.unlearn_ratio = threshold, unlearn_ratio
        self.result: CleanseResult | None = None  # set by before_fit

    def prepare(self, model: nn.Module) -> nn.Module:
        return model  # no structure to add

    def before_fit(
        self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig, run_dir: Path
    ) -> dict[str, Any]:
        """Neural Cleanse on the defender's clean train data; its numbers go to metrics.json
        under `neural_cleanse`. The search is kept in (and taken back from) the folder the
        defended run lies in, a study's output folder, where the detector `nc` of the poisoned
        run beside it keeps its own: the same search runs once. Nothing of the attack is read
        there (the cache holds reversed triggers only, under a key of the defender's inputs)."""
        options = search_options(**self.options)
        x = clean_images(clean.train, options.samples, cfg.seed, cfg.data.img_size)
        self.result = neural_cleanse(model, x, clean.num_classes, options, self.threshold,
                                     cfg.seed, Path(run_dir).parent)  # fmt: skip
        summary = self.result.summary()
        summary.update(samples=len(x), unlearn_ratio=self.unlearn_ratio,
                       threshold=self.threshold, options=asdict(options))  # fmt: skip
        return {"neural_cleanse": summary}

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
        if self.result is None:
            raise RuntimeError("nc: before_fit reverse-engineers the triggers the task unlearns")
        flagged = self.result.flagged
        if not flagged:
            return Unchanged()
        t = self.result.triggers
        rows = [t.classes.index(c) for c in flagged]
        return Unlearning(t.masks[rows], t.patterns[rows], self.unlearn_ratio,
                          cfg.train.label_smoothing)  # fmt: skip


@REPAIRERS.register("nc", repairs_pixel_prompts=False, needs_image_text=False)
def neural_cleanse_repair(
    steps: Annotated[int, Field(gt=0)] | None = None,
    batches: Annotated[int, Field(gt=0)] | None = None,
    batch_size: Annotated[int, Field(gt=0)] | None = None,
    samples: Annotated[int, Field(gt=0)] | None = None,
    lr: Annotated[float, Field(gt=0)] | None = None,
    init_cost: Annotated[float, Field(gt=0)] | None = None,
    success: Annotated[float, Field(gt=0, le=1)] | None = None,
    patience: Annotated[int, Field(gt=0)] | None = None,
    cost_multiplier: Annotated[float, Field(gt=1)] | None = None,
    early_stop_patience: Annotated[int, Field(gt=0)] | None = None,
    early_stop_threshold: Annotated[float, Field(gt=0, le=1)] | None = None,
    reset_cost_to_zero: bool | None = None,
    threshold: Annotated[float, Field(gt=0)] = THRESHOLD,
    unlearn_ratio: Annotated[float, Field(gt=0, lt=1)] = UNLEARN_RATIO,
) -> NeuralCleanse:
    """The search's options (None: `SearchOptions`' defaults, the authors' with the size
    scaled to a CPU): steps, batches, batch_size, samples, its size per class (100, 4, 32,
    1000; the authors: 1000, 31, 32, 1000); lr, init_cost, success, patience, cost_multiplier,
    early_stop_patience, early_stop_threshold, reset_cost_to_zero, the authors' optimizer and
    cost schedule (0.1, 1e-3, 0.99, 5, 2, 25, 1.0, true). threshold: the anomaly index above
    which a class is flagged (2); unlearn_ratio: the share of clean samples stamped with a
    flagged class's reversed trigger (0.2)."""
    options = {
        "steps": steps, "batches": batches, "batch_size": batch_size, "samples": samples,
        "lr": lr, "init_cost": init_cost, "success": success, "patience": patience,
        "cost_multiplier": cost_multiplier, "early_stop_patience": early_stop_patience,
        "early_stop_threshold": early_stop_threshold, "reset_cost_to_zero": reset_cost_to_zero,
    }  # fmt: skip
    return NeuralCleanse({k: v for k, v in options.items() if v is not None}, threshold,
                         unlearn_ratio)  # fmt: skip


@DETECTORS.register("nc", setting="model", score="anomaly_index")
class NeuralCleanseDetector:
    """Neural Cleanse as a model-level detector: called with the defender's clean images, it
    runs the search (`DEFAULTS`) and the MAD test, keeps the verdict (`result`), and returns one
    score per class, (median - norm) / MAD, higher for a class whose trigger is smaller than
    the others' (the flagged classes score above `threshold`). With a `cache` folder (`vptlab
    detect`: the one the run lies in) the search is kept there and taken back (see
    `neural_cleanse`)."""

    def __init__(self, seed: int = 0, threshold: float = THRESHOLD,
                 cache: Path | None = None) -> None:  # fmt: skip
        self.seed, self.threshold, self.cache = seed, threshold, cache
        self.result: CleanseResult | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with frozen_parameters(model), torch.no_grad():
            num_classes = int(model.eval()(x[:1].to(next(model.parameters()).device)).shape[1])
        self.result = neural_cleanse(model, x, num_classes, threshold=self.threshold,
                                     seed=self.seed, cache=self.cache)  # fmt: skip
        out = self.result.outliers
        below = torch.tensor(self.result.triggers.norms, dtype=torch.float64) < out.median
        index = torch.tensor(out.indices, dtype=torch.float64)
        return torch.where(below, index, -index).float()

    def verdict(self) -> dict[str, Any]:
        """The last call's numbers (`CleanseResult.summary`)."""
        if self.result is None:
            raise RuntimeError("nc: call the detector on the clean images first")
        return {**self.result.summary(), "threshold": self.threshold}
