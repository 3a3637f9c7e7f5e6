"""Adversarial training as tasks of the one loop, and the robust-accuracy probe that watches it.

`train.objective` picks the task, `train.attack` its budget (norm, eps, alpha, steps; the inner
attack runs in fp32 unless `train.attack.amp` asks for bf16 autocast on CUDA):

- pgd (Madry et al. 2018):       min_theta E[ L(f(x'), y) ],  x' = PGD_eps(x, y)
- fgsm_rs (Wong et al. 2020):    delta_0 ~ U(-eps, eps);  delta = proj_eps(delta_0 + a sign(grad))
                                 with a = 1.25 eps;  min_theta E[ L(f(x + delta), y) ]
- trades (Zhang et al. 2019):    min_theta E[ CE(f(x), y) + beta KL(f(x) || f(x')) ],
                                 x' = argmax_{||x'-x|| <= eps} KL(f(x) || f(x')) by PGD from
                                 x + 0.001 N(0, 1)

Where the inner attack runs: in the mode the step runs in (train mode: BatchNorm normalizes with
the batch's statistics), as in Madry's and Wong's code, so the attack sees the function the step
then trains. Its forwards must not count as training forwards, though: the BatchNorm running
statistics (and their counters) are saved before the attack and restored after it, so only the
step's own forward updates them. In `prompt` / `linear` mode the frozen backbone stays in eval
mode throughout (see prompts/adapt.py). Random starts use `seed=None`: they draw from the global
RNG, which the loop checkpoints, so a resumed run is bit-exact.

The probe (`RobustProbe`) attacks a fixed held-out batch (the first N test samples) with PGD-10 and
a fixed seed after every evaluated epoch; `robust_summary` flags catastrophic overfitting in the
history. With `train.keep_best_robust` the probe keeps the weights of its best epoch in
`best_robust.safetensors` (Wong et al.'s early stopping). To evaluate them, rebuild the run and
load that file over its weights:

    cfg, model, splits = vptlab.engine.runner.load_run(run_dir)
    vptlab.engine.checkpoint.load_model(model, run_dir / "best_robust.safetensors")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vptlab.attacks import FGSM, PGD, Attack, frozen_parameters
from vptlab.attacks.base import per_sample_norm, project
from vptlab.config import AttackConfig, TrainConfig
from vptlab.data.loaders import Batch, make_loader
from vptlab.engine.checkpoint import read_metadata, save_model
from vptlab.engine.tasks import ClassificationTask

BEST_ROBUST_FILE = "best_robust.safetensors"
PROBE_KEY = "probe_robust_acc"
PROBE_STEPS = 10
PROBE_SEED = 0
# Catastrophic overfitting (Wong et al. 2020): the probe collapses after having been meaningful.
OVERFIT_FLOOR = 20.0  # % probe accuracy the best must have reached
OVERFIT_DROP = 0.5  # flagged when the probe falls below this fraction of its best


@contextmanager
def batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running mean, variance and batch counter on exit: an attack's
    forwards in train mode normalize with batch statistics but must not move the running ones."""
    saved = [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class AdversarialTask(ClassificationTask):
    """Shared by the adversarial objectives: the budget, its linear eps ramp and the attack call.

    The loop calls `set_progress(epochs_done)` before every step (a float: epoch + batch fraction)
    so the ramp follows the run, resumes included.
    """

    def __init__(self, attack: AttackConfig, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__()
        self.norm, self.eps, self.steps = attack.norm, attack.eps, attack.steps
        self.amp = attack.amp  # bf16 inner attack on CUDA only when train.attack.amp asks
        self.alpha = attack.alpha  # None: each objective's own default
        self.eps_ramp_epochs = eps_ramp_epochs
        self.progress = 0.0

    def set_progress(self, epochs_done: float) -> None:
        self.progress = epochs_done

    def current_eps(self) -> float:
        """eps * min(1, epochs done / eps_ramp_epochs): 0 at the start of a ramp, eps after it."""
        if self.eps_ramp_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, self.progress / self.eps_ramp_epochs)

    def scaled(self, alpha: float) -> tuple[float, float]:
        """(eps, alpha) of this step: alpha shrinks with eps during the ramp (same ratio)."""
        eps = self.current_eps()
        return eps, alpha * eps / self.eps

    def perturb(self, attack: Attack, raw_model: nn.Module, batch: Batch) -> torch.Tensor:
        if attack.eps == 0:  # the first steps of a ramp: nothing to attack
            return batch.x
        with batchnorm_statistics_kept(raw_model):
            return attack(raw_model, batch.x, batch.y)


class PGDTraining(AdversarialTask):
    """Madry et al.: cross-entropy on PGD examples (random start, `steps` steps of `alpha`,
    default 2.5 eps / steps). The logits returned are the adversarial ones: `train_acc` is the
    robust training accuracy."""

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps
        eps, alpha = self.scaled(alpha)
        attack = PGD(eps=eps, norm=self.norm, alpha=alpha if eps > 0 else None,
                     steps=self.steps, random_start=True, amp=self.amp, seed=None)  # fmt: skip
        x_adv = self.perturb(attack, raw_model, batch)
        return super().loss(model, batch._replace(x=x_adv), raw_model)


class FGSMRSTraining(AdversarialTask):
    """Wong et al. 2020 ("Fast is better than free"): one FGSM step of 1.25 eps from a uniform
    random start in the eps ball, projected back; cross-entropy on the result."""

    STEP = 1.25  # the paper's alpha / eps: larger steps overfit catastrophically, smaller are weak

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alpha if self.alpha is not None else self.STEP * self.eps
        eps, alpha = self.scaled(alpha)
        attack = FGSM(eps=eps, alpha=alpha if eps > 0 else None, random_start=True,
                      amp=self.amp, seed=None)  # fmt: skip
        x_adv = self.perturb(attack, raw_model, batch)
        return super().loss(model, batch._replace(x=x_adv), raw_model)


class TradesTraining(AdversarialTask):
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x')), where x' maximizes the KL by
    PGD from x + 0.001 N(0, 1) (their code: step 0.01 on MNIST, 0.007 on CIFAR; here alpha,
    default 2.5 eps / steps). The KL is summed over classes and averaged over the batch, as in
    their `criterion_kl(...) / batch_size`. Returns the clean logits."""

    def __init__(self, attack: AttackConfig, beta: float, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(attack, eps_ramp_epochs)
        self.beta = beta

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps
        eps, alpha = self.scaled(alpha)
        x_adv = self.maximize_kl(raw_model, batch.x, eps, alpha) if eps > 0 else batch.x
        logits = model(batch.x)
        logits_adv = model(x_adv)
        clean = F.cross_entropy(logits.float(), batch.y)
        robust = F.kl_div(
            F.log_softmax(logits_adv.float(), dim=1),
            F.softmax(logits.float(), dim=1),
            reduction="batchmean",
        )
        return clean + self.beta * robust, logits

    def maximize_kl(
        self, model: nn.Module, x: torch.Tensor, eps: float, alpha: float
    ) -> torch.Tensor:
        """PGD on KL(f(x) || f(x')) w.r.t. x', in the eps ball of `norm` and in [0,1]."""
        x = x.detach().float()
        # The loop's autocast would run this maximization in bf16; like the other inner attacks
        # it runs in fp32 unless train.attack.amp asks for bf16 (on CUDA).
        amp = self.amp and x.device.type == "cuda"
        with (
            frozen_parameters(model),
            batchnorm_statistics_kept(model),
            torch.enable_grad(),
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp),
        ):
            with torch.no_grad():
                target = F.softmax(model(x).float(), dim=1)
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                kl = F.kl_div(
                    F.log_softmax(model(x_adv).float(), dim=1), target, reduction="sum"
                )
                (grad,) = torch.autograd.grad(kl, x_adv)
                if self.norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / per_sample_norm(grad)
                delta = project(x_adv.detach() + alpha * step - x, self.norm, eps)
                x_adv = (x + delta).clamp(0, 1)
        return x_adv.detach()



def create_objective(train: TrainConfig) -> ClassificationTask:
    """The task of `train.objective`: standard cross-entropy or one of the adversarial ones."""
    if train.objective == "standard":
        return ClassificationTask(train.label_smoothing)
    if train.objective == "clip":
        raise ValueError("objective clip needs the captions and the model: use build_task")
    if train.objective == "pgd":
        return PGDTraining(train.attack, train.eps_ramp_epochs)
    if train.objective == "fgsm_rs":
        return FGSMRSTraining(train.attack, train.eps_ramp_epochs)
    return TradesTraining(train.attack, train.trades_beta, train.eps_ramp_epochs)


class RobustProbe:
    """PGD-10 accuracy (%) on the first `size` test samples with a fixed seed, as
    `probe_robust_acc`; with `keep_best`, the best probe's weights go to `best_robust.safetensors`
    in `run_dir` (atomic; the previous best is read back from its metadata on resume)."""

    def __init__(
        self,
        split: Any,
        size: int,
        attack: AttackConfig,
        run_dir: str | Path | None = None,
        keep_best: bool = False,
        trainable_only: bool = False,
    ) -> None:
        self.split, self.size = split, size
        self.attack = PGD(eps=attack.eps, norm=attack.norm, steps=PROBE_STEPS,
                          random_start=True, seed=PROBE_SEED)  # fmt: skip
        self.best_path = Path(run_dir) / BEST_ROBUST_FILE if keep_best and run_dir else None
        self.trainable_only = trainable_only
        self._batch: Batch | None = None

    def _probe_batch(self, ctx: Any) -> Batch:
        if self._batch is None:  # the same samples every epoch: test order, no augmentation
            loader = make_loader(self.split, min(self.size, len(self.split)), train=False,
                                 device=ctx.device, seed=ctx.cfg.seed,
                                 img_size=ctx.cfg.data.img_size)  # fmt: skip
            self._batch = next(iter(loader))
        return self._batch

    def __call__(self, model: nn.Module, ctx: Any) -> dict[str, float]:
        batch = self._probe_batch(ctx)
        training = model.training
        model.eval()
        try:
            x_adv = self.attack(model, batch.x, batch.y)
            with torch.no_grad():
                pred = self.attack.logits(model, x_adv).argmax(1)
        finally:
            model.train(training)
        acc = 100.0 * float((pred == batch.y).float().mean())
        if self.best_path is not None and ctx.dist.is_main and acc > self._best():
            save_model(model, self.best_path, trainable_only=self.trainable_only,
                       metadata={"probe_robust_acc": repr(acc)})  # fmt: skip
        return {PROBE_KEY: acc}

    def _best(self) -> float:
        assert self.best_path is not None
        if not self.best_path.is_file():
            return float("-inf")
        return float(read_metadata(self.best_path).get("probe_robust_acc", "-inf"))


def robust_summary(history: list[dict[str, Any]], kept_best: bool = False) -> dict[str, Any]:
    """The probe's story for metrics.json: its last and best values (and, with `kept_best`, the
    epoch whose weights are in best_robust.safetensors), and the first epoch of catastrophic
    overfitting: the probe below OVERFIT_DROP x its best after the best passed OVERFIT_FLOOR %."""
    probes = [(int(row["epoch"]), float(row[PROBE_KEY])) for row in history if PROBE_KEY in row]
    if not probes:
        return {}
    best_epoch, best = probes[0]
    overfit = None
    for epoch, probe in probes:
        if probe > best:
            best_epoch, best = epoch, probe
        elif overfit is None and best >= OVERFIT_FLOOR and probe < OVERFIT_DROP * best:
            overfit = {"epoch": epoch, "probe": probe, "best": best}
    summary: dict[str, Any] = {
        "robust_probe": {"final": probes[-1][1], "best": best, "best_epoch": best_epoch}
    }
    if kept_best:
        summary["best_robust"] = {"file": BEST_ROBUST_FILE, "epoch": best_epoch, "probe": best}
    if overfit is not None:
        summary["catastrophic_overfitting"] = overfit
    return summary
