"""Anti-backdoor learning (Li et al. 2021, NeurIPS, "Anti-backdoor learning: training clean models
on poisoned data") as a training objective of the one loop: `train.objective: abl`.

A training-time defense: it sees the poisoned train split (as every training does) but never the
poisoned indices, the trigger or the target. Backdoor samples are learned faster than clean ones,
so after a few epochs of LGA they hold the lowest losses; ABL isolates them and unlearns them. One
task, its phases by epoch (E = `train.epochs`, options in `train.abl`):

1. isolation, epochs [0, I): the LGA loss sign(L - gamma) * L on the batch's mean cross-entropy
   (`lga_loss`): gradient descent while L > gamma, ascent below, so the clean samples cannot
   fall below gamma while the backdoor samples, learned faster, still can. BackdoorBench's
   default `Flooding` loss, |L - gamma| + gamma, has the same gradient (the two differ by a
   constant where L < gamma), so it is not a separate option.
2. at the start of epoch I: one pass over the train split in eval mode, no augmentation, batched
   on the model's device, giving each sample's cross-entropy; the `isolation_ratio` x N samples
   with the lowest losses are isolated (BackdoorBench's ascending sort; the authors' script
   sorts descending, a known slip). Their images are kept for step 4.
3. training, epochs [I, E - 1): cross-entropy on each batch with its isolated samples masked out
   (the authors' fine-tuning on the other 99%); a batch with nothing left is skipped (`skip`), so
   AdamW's momentum and weight decay do not move the weights on a zero gradient.
4. unlearning, the last epoch: gradient ascent, -CE, on the isolated samples only, in batches of
   `data.batch_size` drawn from them (reshuffled each pass, seeded), for `unlearning_passes`
   passes at `unlearning_lr` (`step_lr`) whatever the schedule says, in train mode, as the
   authors' `train_step_unlearning`. A batch of the whole split holds ~1 isolated sample at a 1%
   ratio, so these steps do not use the loop's batch: the loop only counts them; once the passes
   are done the epoch's other batches are skipped. With too few batches in an epoch the passes
   are cut short (`unlearning_steps` in the summary says how many ran).

Defaults, from the authors' code (bboylyg/ABL config.py, backdoor_isolation.py,
backdoor_unlearning.py) and BackdoorBench (defense/abl.py, config/defense/abl/*.yaml): isolation
ratio 0.01, gamma 0.5 (every dataset's yaml), unlearning lr 5e-4 (the authors'; BackdoorBench
sets 1e-4 in its `learning_rate_unlearning`) for 5 passes (the authors' `unlearning_epochs`;
BackdoorBench 20). The epoch mapping: both spend a 100-epoch budget as 20 epochs of isolation
(BackdoorBench's `tuning_epochs`; the authors' config.py says 10), 60 of
fine-tuning and 5-20 of unlearning; here I = 20% of E (rounded, at least 1, or
`abl.isolation_epochs`), the last epoch unlearns (only its first passes x ceil(k / batch) steps
train) and the epochs between are phase 3. The passes are not scaled: they count passes over the
isolated set, whose size does not depend on E. The optimizer and schedule stay the run's
(`train`), not the authors' SGD stages at 0.1 / 0.01: a study compares objectives under one
recipe. Isolation needs the backdoor learned first: on mnist-5k with SimpleNet one LGA epoch
leaves the easiest clean digits as low as the poisoned ones (tests/defenses/test_abl.py uses 2).

The isolation statistics (how many isolated, and how many of them are really poisoned when the
split carries a poison record) are for the report only: `summary()` writes them into
metrics.json (`abl`); the defense never reads the record.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vptlab.config import ABLConfig, TrainConfig
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import Batch, make_loader
from vptlab.defenses.adversarial import eval_mode
from vptlab.engine.distributed import all_reduce_sum
from vptlab.engine.evaluators import EvalContext, eval_loader
from vptlab.engine.tasks import OBJECTIVES, Task
from vptlab.errors import ConfigError

# BackdoorBench's `tuning_epochs` (20) of its 100-epoch budget: the share of `train.epochs` LGA
# trains before isolating, when `abl.isolation_epochs` is not given.
ISOLATION_SHARE = 0.2


def lga_loss(loss: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent (Li et al. 2021, eq. 3): sign(L - gamma) * L of a batch's mean loss
    L: descent above gamma, ascent below, so training holds L near gamma."""
    return torch.sign(loss - gamma) * loss


def isolation_epochs(train: TrainConfig) -> int:
    """I, the epochs of LGA before isolating: `abl.isolation_epochs`, or 20% of `train.epochs`
    rounded (at least 1); at most `train.epochs - 1`, the last epoch being the unlearning one."""
    n = train.abl.isolation_epochs
    if n is None:
        n = max(1, round(ISOLATION_SHARE * train.epochs))
    if n > train.epochs - 1:
        raise ConfigError(
            f"train.abl.isolation_epochs must be < train.epochs ({train.epochs}): ABL's last "
            f"epoch unlearns; got {n}" + ("" if train.epochs > 1 else " (abl needs epochs >= 2)")
        )
    return n


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ABLTask:
    """ABL's four phases over one run (see the module's docstring), told apart by the loop's
    progress (`set_progress`). `split` is the train split the loop trains on (poisoned or not);
    `poisoned`, its poison record's indices if any, feeds only `summary()`."""

    def __init__(
        self,
        options: ABLConfig,
        epochs: int,
        isolation_epochs: int,
        split: TensorSplit | Dataset,
        poisoned: torch.Tensor | None = None,
    ) -> None:
        self.options = options
        self.epochs = epochs
        self.isolation_epochs = isolation_epochs
        self.split = split
        self.num_samples = len(split)  # type: ignore[arg-type]
        self._poisoned = poisoned  # for the report: never read by the defense
        self.progress = 0.0
        self.isolated: torch.Tensor | None = None  # (k,) sorted indices in the split
        self.isolated_x: torch.Tensor | None = None  # (k, 3, H, W) as the loop's batches
        self.isolated_y: torch.Tensor | None = None
        self.batch_size = 0  # unlearning batches: the run's data.batch_size
        self.unlearned = 0  # unlearning steps taken
        self._mask: torch.Tensor | None = None  # (N,) bool on the batches' device
        self._labels: torch.Tensor | None = None  # labels of the last loss's logits

    # --- phases ---------------------------------------------------------------------------
    def set_progress(self, epochs_done: float) -> None:
        self.progress = epochs_done

    @property
    def phase(self) -> str:
        if self.progress < self.isolation_epochs:
            return "isolation"
        return "training" if self.progress < self.epochs - 1 else "unlearning"

    def unlearning_steps(self) -> int:
        """Steps of the unlearning stage: passes x batches of the isolated samples."""
        k = 0 if self.isolated is None else len(self.isolated)
        return self.options.unlearning_passes * math.ceil(k / max(self.batch_size, 1))

    # --- the loop's hooks -----------------------------------------------------------------
    def before_epoch(self, model: nn.Module, ctx: EvalContext, epoch: int) -> None:
        if epoch == self.isolation_epochs:
            self.isolate(model, ctx)

    def skip(self, batch: Batch) -> bool:
        phase = self.phase
        if phase == "unlearning":
            return self.unlearned >= self.unlearning_steps()
        if phase == "training" and not _distributed():
            # One device sync per step of this phase (reading the mask). Under DDP another
            # rank may have samples left: no skip, this rank's masked loss is 0 then.
            return bool(self._isolated_mask(batch.index).all())
        return False

    def step_lr(self) -> float | None:
        return self.options.unlearning_lr if self.phase == "unlearning" else None

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phase = self.phase
        if phase == "unlearning":
            return self._unlearning_loss(model, batch.x.device)
        logits = model(batch.x)
        self._labels = batch.y
        if phase == "isolation":
            return lga_loss(F.cross_entropy(logits.float(), batch.y), self.options.gamma), logits
        keep = (~self._isolated_mask(batch.index)).float()
        per_sample = F.cross_entropy(logits.float(), batch.y, reduction="none")
        return (per_sample * keep).sum() / keep.sum().clamp(min=1.0), logits

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = self._labels if self._labels is not None else batch.y
        return (logits.detach().argmax(1) == labels).sum()

    # --- isolation and unlearning ---------------------------------------------------------
    @torch.no_grad()
    def isolate(self, model: nn.Module, ctx: EvalContext) -> None:
        """Phase 2: every sample's cross-entropy under `model` (eval mode, no augmentation,
        each rank its shard, summed over ranks), the `isolation_ratio` lowest isolated, and
        their images gathered on every rank for the unlearning stage."""
        losses = torch.zeros(self.num_samples, device=ctx.device)
        with eval_mode(model):
            for batch in eval_loader(self.split, ctx):  # type: ignore[arg-type]
                with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype,
                                    enabled=ctx.amp_dtype is not None):  # fmt: skip
                    logits = model(batch.x)
                per_sample = F.cross_entropy(logits.float(), batch.y, reduction="none")
                losses[batch.index.to(ctx.device)] = per_sample
        losses = all_reduce_sum(losses, ctx.dist)  # the shards are disjoint
        k = max(1, int(self.num_samples * self.options.isolation_ratio))  # BackdoorBench: int()
        self.isolated = torch.argsort(losses, stable=True)[:k].sort().values.cpu()
        self.batch_size = ctx.cfg.data.batch_size
        self._mask = None
        # Every rank takes the whole isolated set (a whole pass, unsharded), so the unlearning
        # batches are the same on every rank and DDP's average is the single-device gradient.
        mask = self._isolated_mask(torch.arange(self.num_samples, device=ctx.device))
        data = ctx.cfg.data
        loader = make_loader(self.split, data.eval_batch_size, train=False, device=ctx.device,
                             seed=ctx.cfg.seed, num_workers=data.num_workers,
                             img_size=data.img_size)  # fmt: skip
        xs, ys = [], []
        for batch in loader:
            keep = mask[batch.index.to(ctx.device)]
            xs.append(batch.x[keep])
            ys.append(batch.y[keep])
        self.isolated_x, self.isolated_y = torch.cat(xs), torch.cat(ys)
        self.unlearned = 0

    def _isolated_mask(self, index: torch.Tensor) -> torch.Tensor:
        if self.isolated is None:
            raise RuntimeError("ABL: no isolated samples yet (isolation runs before epoch "
                               f"{self.isolation_epochs + 1})")  # fmt: skip
        if self._mask is None or self._mask.device != index.device:
            self._mask = torch.zeros(self.num_samples, dtype=torch.bool, device=index.device)
            self._mask[self.isolated.to(index.device)] = True
        return self._mask[index]

    def _unlearning_loss(
        self, model: nn.Module, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-CE on the next batch of isolated samples: pass p shuffles them with seed p."""
        if self.isolated_x is None or self.isolated_y is None:
            raise RuntimeError("ABL: no isolated samples to unlearn")
        if self.isolated_x.device != device:
            self.isolated_x = self.isolated_x.to(device)
            self.isolated_y = self.isolated_y.to(device)
        k, size = len(self.isolated_x), max(self.batch_size, 1)
        per_pass = math.ceil(k / size)
        pass_, step = divmod(self.unlearned, per_pass)
        order = torch.randperm(k, generator=torch.Generator().manual_seed(pass_))
        rows = order[step * size : (step + 1) * size].to(device)
        logits = model(self.isolated_x[rows])
        self._labels = self.isolated_y[rows]
        self.unlearned += 1
        return -F.cross_entropy(logits.float(), self._labels), logits

    # --- checkpoint and report ------------------------------------------------------------
    def task_state(self) -> dict[str, Any]:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu()

        return {"isolated": cpu(self.isolated), "x": cpu(self.isolated_x),
                "y": cpu(self.isolated_y), "batch_size": self.batch_size,
                "unlearned": self.unlearned}  # fmt: skip

    def load_task_state(self, state: dict[str, Any]) -> None:
        self.isolated, self.isolated_x, self.isolated_y = state["isolated"], state["x"], state["y"]
        self.batch_size, self.unlearned = int(state["batch_size"]), int(state["unlearned"])
        self._mask = None

    def summary(self) -> dict[str, Any]:
        """metrics.json's `abl`: the settings, and once isolated the isolated count, how many of
        them the poison record says are poisoned (precision %, recall %), the unlearning steps."""
        out: dict[str, Any] = {
            "isolation_epochs": self.isolation_epochs,
            "isolation_ratio": self.options.isolation_ratio,
            "gamma": self.options.gamma,
            "unlearning_lr": self.options.unlearning_lr,
            "unlearning_passes": self.options.unlearning_passes,
        }
        if self.isolated is not None:
            k = len(self.isolated)
            out.update(isolated=k, unlearning_steps=self.unlearned)
            if self._poisoned is not None:
                hits = int(torch.isin(self.isolated, self._poisoned.cpu()).sum())
                out.update(isolated_poisoned=hits, precision=100.0 * hits / k,
                           recall=100.0 * hits / max(len(self._poisoned), 1))  # fmt: skip
        return {"abl": out}


@OBJECTIVES.register("abl", adversarial=False, image_text=False)
def abl_objective(train: TrainConfig, model: nn.Module | None, data: DataSplits | None) -> Task:
    """ABL on the train split (whose poison record, if any, only its summary reads)."""
    if data is None:
        raise ValueError("objective abl needs the data: it isolates samples of the train split")
    record = getattr(data.train, "poison", None)
    poisoned = record.poisoned if record is not None else None
    return ABLTask(train.abl, train.epochs, isolation_epochs(train), data.train, poisoned)
