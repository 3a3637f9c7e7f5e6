"""Adversarial training as tasks of the one loop, and the robust-accuracy probe that watches it.

`train.objective` picks the task, `train.attack` its budget (norm, eps, alpha, steps; the inner
attack runs in fp32 unless `train.attack.amp` asks for bf16 autocast on CUDA):

- pgd (Madry et al. 2018):       min_theta E[ L(f(x'), y) ],  x' = PGD_eps(x, y)
- fgsm_rs (Wong et al. 2020):    delta_0 = clip(x + U(-eps, eps)) - x;
                                 delta = proj_eps(delta_0 + a sign(grad)) with a = 1.25 eps;
                                 min_theta E[ L(f(clip(x + delta)), y) ]
- trades (Zhang et al. 2019):    min_theta E[ CE(f(x), y) + beta KL(f(x) || f(x')) ],
                                 x' = argmax_{||x'-x|| <= eps} KL(f(x) || f(x')) by PGD from
                                 x + 0.001 N(0, 1)

Where the inner attack runs, as in each paper's code:
- pgd and fgsm_rs: in the mode the step runs in (train mode: BatchNorm normalizes with the
  batch's statistics, dropout drops), as in Madry's and Wong's code, so the attack sees the
  function the step then trains. Its forwards must not count as training forwards, though: the
  BatchNorm running statistics (and their counters) are saved before the attack and restored
  after it, so only the step's own forward updates them.
- trades: in eval mode, the KL's clean target included (the authors' `model.eval()` before the
  maximization, `model.train()` after it); each module's own mode is restored afterwards, module
  by module, so in `prompt` / `linear` mode the frozen backbone stays in eval (prompts/adapt.py).
Every training-time attack runs in fp32, outside the loop's bf16 autocast. Random starts use
`seed=None`: they draw from the global RNG, which the loop checkpoints, so a resumed run is
bit-exact.

The probe (`RobustProbe`) attacks `train.robust_probe` samples held out of the *train* split
before training (`data.probe`, see steps/build.py `build_data`; never the test split, never
trained on) with PGD-10 at the eps training has reached (the eps ramp's), a fixed seed and fp32,
after every evaluated epoch. `robust_summary` flags catastrophic overfitting as Wong et al.: the
probe more than 20 points below its best so far, compared among the epochs probed at the full
eps only. With `train.keep_best_robust` the probe keeps the weights of its best full-eps epoch in
`best_robust.safetensors` (Wong et al.'s early stopping), selected on that held-out train slice.
To evaluate them, rebuild the run and load that file over its weights:

    cfg, model, splits = vptlab.steps.train.load_run(run_dir)
    vptlab.engine.checkpoint.load_model(model, run_dir / "best_robust.safetensors")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
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
from vptlab.engine.tasks import OBJECTIVES, ClassificationTask, Task

BEST_ROBUST_FILE = "best_robust.safetensors"
PROBE_KEY = "probe_robust_acc"
PROBE_EPS_KEY = "probe_eps"
PROBE_FGSM_KEY = "probe_fgsm_acc"
PROBE_STEPS = 10
PROBE_SEED = 0
PROBE_ON = "held-out train slice"
SELECTED_ON = "best on the held-out train slice"
# Catastrophic overfitting (Wong et al. 2020): flagged when the probe falls more than this many
# points below its best so far. Their early stopping stops on a fall of more than 0.2 in the PGD
# accuracy of a fixed training batch since the previous check; the best so far also catches a
# collapse spread over several epochs.
OVERFIT_POINTS = 20.0


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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside; every module's own train/eval flag back on exit, even on an
    error. Module by module, not `model.train(mode)`: an adapted model holds mixed modes (its
    frozen backbone stays in eval while its prompts train), which one flag would flatten."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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
    random start in the eps ball (clipped to the image range first, as their code does),
    projected back; cross-entropy on the result."""

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
    their `criterion_kl(...) / batch_size`. The maximization runs in eval mode and fp32
    (`maximize_kl`); the loss's two forwards run in the step's mode. Returns the clean logits."""

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
        """PGD on KL(f(x) || f(x')) w.r.t. x', in the eps ball of `norm` and in [0,1].

        As the authors' code: the model in eval mode (`model.eval()` ... `model.train()`), for the
        clean target too, so BatchNorm uses its running statistics (and leaves them alone) and
        dropout is off; each module's mode is restored afterwards. In fp32 whatever the loop's
        autocast: an attack in bf16 follows a coarser gradient than the model's.
        """
        x = x.detach().float()
        # The loop's autocast would run this maximization in bf16; like the other inner attacks
        # it runs in fp32 unless train.attack.amp asks for bf16 (on CUDA).
        amp = self.amp and x.device.type == "cuda"
        with (
            frozen_parameters(model),
            eval_mode(model),
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


@OBJECTIVES.register("pgd", adversarial=True, norms=("linf", "l2"))
def pgd_objective(train: TrainConfig, model: nn.Module | None, data: Any) -> Task:
    return PGDTraining(train.attack, train.eps_ramp_epochs)


@OBJECTIVES.register("fgsm_rs", adversarial=True, norms=("linf",))
def fgsm_rs_objective(train: TrainConfig, model: nn.Module | None, data: Any) -> Task:
    return FGSMRSTraining(train.attack, train.eps_ramp_epochs)


@OBJECTIVES.register("trades", adversarial=True, norms=("linf", "l2"))
def trades_objective(train: TrainConfig, model: nn.Module | None, data: Any) -> Task:
    return TradesTraining(train.attack, train.trades_beta, train.eps_ramp_epochs)


def is_adversarial(objective: str) -> bool:
    """Whether objective `objective` trains on attacked inputs (its registry metadata)."""
    return bool(OBJECTIVES.meta(objective).get("adversarial", False))


def probe_size(train: TrainConfig) -> int:
    """How many train samples are held out for the robust-accuracy probe (never trained on,
    attacked each evaluated epoch): `train.robust_probe`, or by default 256 for adversarial
    objectives and none for the others; 0: no probe, the whole train split trains."""
    if train.robust_probe is not None:
        return train.robust_probe
    return 256 if is_adversarial(train.objective) else 0


class RobustProbe:
    """PGD-10 robust accuracy (%) on a held-out slice of the train split, as `probe_robust_acc`
    (correct clean and under attack, as RobustBench counts), with the eps it ran at as
    `probe_eps`.

    `split` is that slice (`data.probe`: held out of the train split before training, so the
    model never trained on it; never the test split). `eps` gives the eps training has reached
    (the task's `current_eps`, which follows the ramp); without it the probe runs at
    `attack.eps`. The attack is seeded (the same start every epoch) and runs in fp32 on the model
    in eval mode. With `keep_best`, the best probe at the full eps (after the ramp) has its
    weights written to `best_robust.safetensors` in `run_dir` (atomic; the previous best is read
    back from its metadata on resume).
    """

    def __init__(
        self,
        split: Any,
        attack: AttackConfig,
        eps: Callable[[], float] | None = None,
        run_dir: str | Path | None = None,
        keep_best: bool = False,
        trainable_only: bool = False,
    ) -> None:
        self.split = split
        self.norm, self.full_eps = attack.norm, attack.eps
        self.eps = eps or (lambda: attack.eps)
        self.best_path = Path(run_dir) / BEST_ROBUST_FILE if keep_best and run_dir else None
        self.trainable_only = trainable_only
        self._batch: Batch | None = None

    def _probe_batch(self, ctx: Any) -> Batch:
        if self._batch is None:  # the same samples every epoch, in one batch, no augmentation
            loader = make_loader(self.split, len(self.split), train=False, device=ctx.device,
                                 seed=ctx.cfg.seed, img_size=ctx.cfg.data.img_size)  # fmt: skip
            self._batch = next(iter(loader))
        return self._batch

    def __call__(self, model: nn.Module, ctx: Any) -> dict[str, float]:
        batch = self._probe_batch(ctx)
        eps = self.eps()
        with eval_mode(model), torch.autocast(batch.x.device.type, enabled=False):
            x_adv = x_fgsm = batch.x
            if eps > 0:
                attack = PGD(eps=eps, norm=self.norm, steps=PROBE_STEPS, random_start=True,
                             amp=False, seed=PROBE_SEED)  # fmt: skip
                x_adv = attack(model, batch.x, batch.y)
                if self.norm == "linf":  # one plain FGSM step: the other half of the CO sign
                    x_fgsm = FGSM(eps=eps, amp=False)(model, batch.x, batch.y)
            with torch.no_grad():
                clean = model(batch.x).argmax(1) == batch.y
                robust = clean & (model(x_adv).argmax(1) == batch.y)
                fgsm = clean & (model(x_fgsm).argmax(1) == batch.y)
        acc = 100.0 * float(robust.float().mean())
        at_full_eps = math.isclose(eps, self.full_eps)
        if self.best_path is not None and ctx.dist.is_main and at_full_eps and acc > self._best():
            save_model(model, self.best_path, trainable_only=self.trainable_only,
                       metadata={PROBE_KEY: repr(acc), PROBE_EPS_KEY: repr(eps)})  # fmt: skip
        out = {PROBE_KEY: acc, PROBE_EPS_KEY: eps}
        if self.norm == "linf":
            out[PROBE_FGSM_KEY] = 100.0 * float(fgsm.float().mean())
        return out

    def _best(self) -> float:
        assert self.best_path is not None
        if not self.best_path.is_file():
            return float("-inf")
        return float(read_metadata(self.best_path).get(PROBE_KEY, "-inf"))


def robust_summary(
    history: list[dict[str, Any]], eps: float | None = None, kept_best: bool = False
) -> dict[str, Any]:
    """The probe's story for metrics.json: its last value, its best at the full `eps` (the
    training eps; None: every probe counts), with `kept_best` the epoch whose weights are in
    best_robust.safetensors, and the first epoch of catastrophic overfitting.

    Catastrophic overfitting (Wong et al. 2020), the first full-eps epoch with either sign:
    - `fall`: the probe more than OVERFIT_POINTS (20) points below the best probe so far. Only
      probes at the full eps are compared, and only they can be the best: during an eps ramp the
      probe runs at a smaller eps each epoch, where accuracy is higher.
    - `fgsm_gap`: one FGSM step leaves more than OVERFIT_POINTS points more accuracy than PGD-10
      on the same slice (the FGSM-robust, PGD-broken state that defines catastrophic
      overfitting; Wong et al. 2020, Andriushchenko & Flammarion 2020). It catches a collapse
      that happens during the ramp, which the fall alone cannot see.
    """
    probes = [(int(row["epoch"]), float(row[PROBE_KEY]), row.get(PROBE_EPS_KEY),
               row.get(PROBE_FGSM_KEY)) for row in history if PROBE_KEY in row]  # fmt: skip
    if not probes:
        return {}
    best_epoch, best, overfit = None, None, None
    for epoch, probe, probe_eps, fgsm in probes:
        if eps is not None and probe_eps is not None and not math.isclose(probe_eps, eps):
            continue
        if overfit is None and fgsm is not None and fgsm - probe > OVERFIT_POINTS:
            overfit = {"epoch": epoch, "probe": probe, "best": best if best is not None else probe,
                       "sign": "fgsm_gap", "fgsm": float(fgsm)}  # fmt: skip
        if best is None or probe > best:
            best_epoch, best = epoch, probe
        elif overfit is None and best - probe > OVERFIT_POINTS:
            overfit = {"epoch": epoch, "probe": probe, "best": best, "sign": "fall"}
    _, final, final_eps, _ = probes[-1]
    summary: dict[str, Any] = {
        "robust_probe": {"on": PROBE_ON, "eps": eps, "final": final, "final_eps": final_eps,
                         "best": best, "best_epoch": best_epoch}  # fmt: skip
    }
    if kept_best and best is not None:
        summary["best_robust"] = {"file": BEST_ROBUST_FILE, "epoch": best_epoch, "probe": best,
                                  "selected": SELECTED_ON}  # fmt: skip
    if overfit is not None:
        summary["catastrophic_overfitting"] = overfit
    return summary
