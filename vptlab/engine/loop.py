"""The one train/eval loop: setup, epochs of steps, evaluation, atomic checkpoint, resume.

Everything that trains in vptlab (plain training, prompt tuning, adversarial training, repair by
fine-tuning or distillation) goes through `fit`; what differs is the `Task` that computes the loss
and the evaluators that measure the model after an epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vptlab.config import ExperimentConfig, dump_config
from vptlab.data.base import DataSplits
from vptlab.data.loaders import make_loader
from vptlab.engine.checkpoint import (
    load_model,
    load_state,
    model_state,
    read_metadata,
    save_model,
    save_state,
    tensor_digest,
)
from vptlab.engine.distributed import (
    DistInfo,
    all_gather_rows,
    all_reduce_sum,
    average_batchnorm_statistics,
    setup_distributed,
    wrap_model,
)
from vptlab.engine.evaluators import EvalContext, Evaluator, TestAccuracy
from vptlab.engine.hooks import EpochHook
from vptlab.engine.optim import build_optimizer, build_scheduler
from vptlab.engine.tasks import ClassificationTask, Task
from vptlab.errors import ConfigError, TrainingDiverged, VptlabError
from vptlab.models.base import count_parameters
from vptlab.progress import progress_bar
from vptlab.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREVIOUS_MODEL_FILE,
    STATE_FILE,
    atomic_write_text,
)

_CHECK_EVERY = 50  # steps between NaN checks: each check is a device sync


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    return torch.bfloat16 if enabled and device.type == "cuda" else None


def _write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2))


def _tensorboard(run_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for

    return SummaryWriter(log_dir=str(run_dir))


@dataclass
class Position:
    """Where training stands: `batch` batches of epoch `epoch` done, `step` loop steps in all (a
    step the task skips included), plus the running sums of the epoch in progress (so a
    mid-epoch resume reports the same row)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    lr: float | None = None

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0
        self.loss_sum, self.correct, self.seen, self.seconds, self.lr = 0.0, 0, 0, 0.0, None


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    task: Task | None = None,
    evaluators: list[Evaluator] | None = None,
    resume: bool = False,
    trainable_only: bool | None = None,
    stop_after_epochs: int | None = None,
    epoch_hooks: list[EpochHook] | None = None,
) -> dict[str, Any]:
    """Train `model` on `data` as `cfg` says, writing checkpoints and metrics into `run_dir`.

    `evaluators` measure the model after each evaluated epoch (default: clean top-1/top-5 on the
    test split). `trainable_only` saves just the trained tensors (prompts, head); by default it
    follows the adaptation mode. `stop_after_epochs` ends the call early, as an interrupted run.
    `epoch_hooks` run before each epoch's first step (not when resuming inside an epoch), e.g.
    a pixel prompt's label remapping (engine/hooks.py); so does the task's own `before_epoch`,
    after them. The task's other optional hooks (`skip`, `step_lr`, `task_state`, `summary`)
    are described in engine/tasks.py's `Task`.
    """
    run_dir = Path(run_dir)
    tcfg = cfg.train
    task = task or ClassificationTask(tcfg.label_smoothing)
    evaluators = evaluators if evaluators is not None else [TestAccuracy(data.test)]
    if trainable_only is None:
        trainable_only = cfg.adapt.frozen_backbone
    dist_info, device = setup_distributed(resolve_device(cfg.device))
    is_main = dist_info.is_main
    amp_dtype = amp_dtype_for(device, tcfg.amp)
    model.to(device)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    train_loader = make_loader(
        data.train, cfg.data.batch_size, train=True, device=device, seed=cfg.seed,
        crop_pad=cfg.data.augment.crop_pad, flip=cfg.data.augment.flip,
        num_workers=cfg.data.num_workers, img_size=cfg.data.img_size,
        rank=dist_info.rank, world_size=dist_info.world_size,
    )  # fmt: skip
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, len(train_loader), tcfg)
    trainable, total = count_parameters(model)
    # Each rank draws its own dropout masks (nanoGPT: seed + rank); the model was built from the
    # shared seed, and DDP starts every rank from rank 0's weights anyway.
    torch.manual_seed(cfg.seed + dist_info.rank)
    pos = Position()
    if resume:
        pos = _restore(model, optimizer, scheduler, run_dir, trainable_only, dist_info, device,
                       task)  # fmt: skip
    if is_main:  # on resume too: the allowed overrides (epochs, device, output) are recorded
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))

    step_model = wrap_model(model, dist_info, device)
    if tcfg.compile:
        step_model = torch.compile(step_model)
    ctx = EvalContext(cfg, device, amp_dtype, dist_info)
    writer = _tensorboard(run_dir, cfg.output.tensorboard and is_main)
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model.name,
        "mode": cfg.adapt.mode,
        "dataset": data.name,
        "device": str(device),
        "params": {"trainable": trainable, "total": total},
    }

    set_progress = getattr(task, "set_progress", None)
    before_epoch = getattr(task, "before_epoch", None)
    task_summary = getattr(task, "summary", None)

    def checkpoint(position: Position) -> None:
        _checkpoint(model, optimizer, scheduler, position, run_dir, trainable_only, dist_info,
                    task)  # fmt: skip

    try:
        while pos.epoch < tcfg.epochs:
            if stop_after_epochs is not None and pos.epoch >= stop_after_epochs:
                metrics["status"] = "stopped"
                break
            epoch_start = time.perf_counter()
            if pos.batch == 0:
                for hook in epoch_hooks or []:
                    hook(model, ctx, pos.epoch)
                if before_epoch is not None:
                    before_epoch(model, ctx, pos.epoch)
            row = _train_epoch(
                step_model, model, task, train_loader, optimizer, scheduler, pos, cfg, amp_dtype,
                dist_info, checkpoint, show_progress=cfg.output.progress and is_main,
            )  # fmt: skip
            average_batchnorm_statistics(model, dist_info)
            if set_progress is not None:
                # Evaluators that read the task (the robust probe reads its eps ramp) see where
                # the epoch ended; the next step sets its own progress again, resumes included.
                set_progress(float(pos.epoch))
            if pos.epoch % tcfg.eval_every == 0 or pos.epoch == tcfg.epochs:
                for evaluator in evaluators:
                    row.update(evaluator(model, ctx))
            row["wall_seconds"] = time.perf_counter() - epoch_start  # training + evaluation
            pos.history.append(row)
            if writer is not None:
                for key, value in row.items():
                    if key not in ("epoch", "wall_seconds"):
                        writer.add_scalar(key.replace("_", "/", 1), value, pos.epoch)
                writer.flush()
            metrics.update(_summary(pos.history), status="running")
            if task_summary is not None:
                metrics.update(task_summary())
            checkpoint(pos)
            if is_main:
                _write_metrics(run_dir, metrics)
        else:
            metrics["status"] = "complete"
    except TrainingDiverged as error:
        # Recorded, so a study does not resume (and diverge again) on every call.
        metrics.update(_summary(pos.history), status="diverged", error=str(error))
        if is_main:
            _write_metrics(run_dir, metrics)
        raise
    finally:
        if writer is not None:
            writer.close()
    metrics.update(_summary(pos.history))
    if is_main:
        _write_metrics(run_dir, metrics)
    return metrics


def _train_epoch(
    model: nn.Module,
    raw_model: nn.Module,
    task: Task,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pos: Position,
    cfg: ExperimentConfig,
    amp_dtype: torch.dtype | None,
    dist_info: DistInfo,
    checkpoint: Any,
    show_progress: bool,
) -> dict[str, float]:
    """Run the rest of epoch `pos.epoch` from batch `pos.batch`; advances `pos` to the next epoch
    and returns the epoch's row (train loss and accuracy over all ranks, lr, seconds)."""
    tcfg = cfg.train
    every = tcfg.checkpoint_every_steps
    params = [p for p in raw_model.parameters() if p.requires_grad]
    # Tasks whose loss depends on where training stands (an eps ramp) are told before each step;
    # `pos` is checkpointed, so a resumed run tells them the same.
    set_progress = getattr(task, "set_progress", None)
    count_correct = getattr(task, "correct", None)
    skip = getattr(task, "skip", None)
    step_lr = getattr(task, "step_lr", None)
    model.train()
    loader.set_epoch(pos.epoch, pos.batch)
    if pos.lr is None:
        pos.lr = optimizer.param_groups[0]["lr"]
    # Sums stay on the device (reading them back is a sync) and continue the checkpointed ones
    # in the same order of additions, so a resumed epoch reports the uninterrupted numbers.
    loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64)
    correct = torch.tensor(pos.correct, dtype=torch.int64)
    start = time.perf_counter()
    with progress_bar(
        f"{cfg.name} epoch {pos.epoch + 1}/{tcfg.epochs}", len(loader), show_progress,
        completed=pos.batch,
    ) as advance:  # fmt: skip
        loss: torch.Tensor | None = None  # the last step's (None while every step skipped)
        for batch in loader:
            device_type = batch.x.device.type
            if set_progress is not None:
                set_progress(pos.epoch + pos.batch / len(loader))
            if skip is not None and skip(batch):
                # No forward and no optimizer step: AdamW's momentum and weight decay would move
                # the weights on a zero gradient. The schedule follows the loop's position (torch
                # warns when it steps before the optimizer ever has: here that is meant).
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    scheduler.step()
            else:
                with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, logits = task.loss(model, batch, raw_model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                lr = step_lr() if step_lr is not None else None
                if lr is not None:  # this step only: the scheduler's step sets its lr again
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.step()
                scheduler.step()
                loss_sum = loss_sum.to(loss.device) + loss.detach().double() * len(batch.y)
                if count_correct is not None:
                    hits = count_correct(logits, batch)
                else:
                    hits = (logits.detach().argmax(1) == batch.y).sum()
                correct = correct.to(batch.y.device) + hits
                pos.seen += len(batch.y)
            pos.batch += 1
            pos.step += 1
            if pos.step % _CHECK_EVERY == 0 and loss is not None:
                _check_finite(float(loss.detach()), pos)
            if every is not None and pos.step % every == 0 and pos.batch < len(loader):
                if loss is not None:
                    _check_finite(float(loss.detach()), pos)
                pos.loss_sum, pos.correct = float(loss_sum), int(correct)
                pos.seconds += time.perf_counter() - start
                start = time.perf_counter()
                checkpoint(pos)
            advance()
    pos.loss_sum, pos.correct = float(loss_sum), int(correct)
    pos.seconds += time.perf_counter() - start
    sums = all_reduce_sum(
        torch.tensor([pos.loss_sum, pos.correct, pos.seen], dtype=torch.float64), dist_info
    )
    train_loss = float(sums[0]) / max(float(sums[2]), 1.0)
    row = {
        "epoch": pos.epoch + 1,
        "train_loss": train_loss,
        "train_acc": 100.0 * float(sums[1]) / max(float(sums[2]), 1.0),
        "lr": pos.lr,
        "seconds": pos.seconds,
    }
    _check_finite(train_loss, pos)
    pos.next_epoch()
    return row


def _check_finite(loss: float, pos: Position) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"loss became {loss} in epoch {pos.epoch + 1} (step {pos.step}); the last good "
            "checkpoint is kept: resume it if the cause has passed, or start a new run with a "
            "lower train.lr or a train.grad_clip (neither can change on resume)"
        )


def _rng_states(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's RNG state, one row per rank, so a resumed rank continues its own stream."""
    states = {"rng_cpu": all_gather_rows(torch.get_rng_state()[None], info)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["rng_cuda"] = all_gather_rows(torch.cuda.get_rng_state()[None], info)
    return states


def _checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pos: Position,
    run_dir: Path,
    trainable_only: bool,
    info: DistInfo,
    task: Task | None = None,
) -> None:
    """Write model and loop state as a pair that resume can check (same position and digest).

    Two files cannot be replaced at once; the previous model file is kept as a hard link until
    the new state is written, so a kill in between leaves a pair that resume can repair, and a
    write that fails (a full disk) puts the previous model file back before the error goes on.
    """
    rng = _rng_states(info)  # a collective: every rank takes part, rank 0 writes
    if not info.is_main:
        return
    weights = model_state(model, trainable_only)
    digest = tensor_digest(weights)
    place = {"epoch": pos.epoch, "batch": pos.batch, "step": pos.step}
    state: dict[str, Any] = {
        **place,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **rng,
        "history": pos.history,
        "partial": [pos.loss_sum, pos.correct, pos.seen, pos.seconds, pos.lr or 0.0],
        "model_digest": digest,
    }
    if hasattr(task, "task_state"):  # a task's own state (ABL's isolated samples)
        state["task"] = task.task_state()
    model_path, previous = run_dir / MODEL_FILE, run_dir / PREVIOUS_MODEL_FILE
    had_model = model_path.is_file()
    if had_model:
        previous.unlink(missing_ok=True)
        os.link(model_path, previous)
    metadata = {**{k: str(v) for k, v in place.items()}, "digest": digest}
    saved_model = False
    try:
        save_model(model, model_path, trainable_only=trainable_only, metadata=metadata)
        saved_model = True
        save_state(state, run_dir / STATE_FILE)
    except Exception:
        if saved_model:  # the state file was not replaced: make the model file its pair again
            if had_model:
                os.replace(previous, model_path)
            else:
                model_path.unlink(missing_ok=True)
        previous.unlink(missing_ok=True)
        raise
    previous.unlink(missing_ok=True)


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run_dir: Path,
    trainable_only: bool,
    info: DistInfo,
    device: torch.device,
    task: Task | None = None,
) -> Position:
    """Load the last checkpoint pair; a model file one write ahead of its state is repaired."""
    state = load_state(run_dir / STATE_FILE)
    missing = [k for k in ("optimizer", "scheduler", "rng_cpu", "epoch") if k not in state]
    if missing:
        raise VptlabError(f"checkpoint state {run_dir / STATE_FILE} lacks keys: "
                          f"{', '.join(missing)}; retrain the run with --force")  # fmt: skip
    model_path = run_dir / MODEL_FILE
    expected = state.get("model_digest")  # absent in checkpoints of older versions
    if expected is not None:
        _select_model_file(run_dir, expected, state)
    load_model(model, model_path)
    if expected is not None and tensor_digest(model_state(model, trainable_only)) != expected:
        raise VptlabError(
            f"{model_path} does not hold the weights {run_dir / STATE_FILE} was saved with "
            "(the file was changed); retrain the run with --force"
        )
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise VptlabError(f"checkpoint state {run_dir / STATE_FILE}: its optimizer or schedule "
                          f"does not fit this run ({error}); retrain with --force") from None
    if hasattr(task, "load_task_state"):
        if "task" not in state:
            raise VptlabError(f"checkpoint state {run_dir / STATE_FILE} lacks the objective's "
                              "state; retrain the run with --force")  # fmt: skip
        task.load_task_state(state["task"])
    rng = state["rng_cpu"]
    rows = rng if rng.ndim == 2 else rng[None]
    # A run resumed on another number of ranks cannot replay each rank's stream exactly.
    torch.set_rng_state(rows[info.rank] if info.rank < len(rows) else rows[0])
    if device.type == "cuda" and "rng_cuda" in state:
        cuda = state["rng_cuda"]
        cuda = cuda if cuda.ndim == 2 else cuda[None]
        torch.cuda.set_rng_state(cuda[info.rank] if info.rank < len(cuda) else cuda[0], device)
    loss_sum, correct, seen, seconds, lr = state.get("partial", [0.0, 0, 0, 0.0, 0.0])
    batch = int(state.get("batch", 0))
    return Position(
        epoch=int(state["epoch"]),
        batch=batch,
        step=int(state.get("step", 0)),
        history=state["history"],
        loss_sum=float(loss_sum),
        correct=int(correct),
        seen=int(seen),
        seconds=float(seconds),
        lr=float(lr) if batch else None,
    )


def _select_model_file(run_dir: Path, digest: str, state: dict[str, Any]) -> None:
    """Make `model.safetensors` the file whose digest the state names, or say why it cannot."""
    model_path, previous = run_dir / MODEL_FILE, run_dir / PREVIOUS_MODEL_FILE
    if not model_path.is_file():
        raise VptlabError(f"cannot resume {run_dir}: {MODEL_FILE} is missing")
    meta = read_metadata(model_path)
    if meta.get("digest") == digest:
        previous.unlink(missing_ok=True)
        return
    if previous.is_file() and read_metadata(previous).get("digest") == digest:
        os.replace(previous, model_path)  # the kill came between the model and the state write
        return
    raise VptlabError(
        f"cannot resume {run_dir}: {MODEL_FILE} (epoch {meta.get('epoch', '?')}, step "
        f"{meta.get('step', '?')}) and {STATE_FILE} (epoch {state['epoch']}, step "
        f"{state.get('step', '?')}) are not a pair; retrain the run with --force"
    )


def _summary(history: list[dict[str, float]]) -> dict[str, Any]:
    evaluated = [row for row in history if "test_top1" in row]
    summary: dict[str, Any] = {"history": history, "epochs_done": len(history)}
    if evaluated:
        last = evaluated[-1]
        # The last evaluated epoch only: a best test epoch would be chosen on the test split.
        summary["final"] = {k: v for k, v in last.items() if k.startswith("test") or "/" in k}
    if history:
        summary["seconds_per_epoch"] = sum(r["seconds"] for r in history) / len(history)
        summary["wall_seconds"] = sum(r["wall_seconds"] for r in history)
    return summary
