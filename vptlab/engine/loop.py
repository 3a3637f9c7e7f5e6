"""The one train/eval loop: setup, epochs of steps, evaluation, atomic checkpoint, resume.

Everything that trains in vptlab (plain training, prompt tuning, adversarial training, repair by
fine-tuning or distillation) goes through `fit`; what differs is the `Task` that computes the loss.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vptlab.config import ExperimentConfig, dump_config
from vptlab.data.base import DataSplits
from vptlab.data.loaders import make_loader
from vptlab.engine.checkpoint import (
    atomic_write_text,
    load_model,
    load_state,
    save_model,
    save_state,
)
from vptlab.engine.distributed import average_buffers, setup_distributed, wrap_model
from vptlab.engine.optim import build_optimizer, build_scheduler
from vptlab.engine.progress import progress_bar
from vptlab.engine.tasks import ClassificationTask, Task
from vptlab.errors import ConfigError, TrainingDiverged
from vptlab.metrics.accuracy import evaluate
from vptlab.models.base import count_parameters

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
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


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    task: Task | None = None,
    resume: bool = False,
    trainable_only: bool | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train `model` on `data` as `cfg` says, writing checkpoints and metrics into `run_dir`.

    `trainable_only` saves just the trained tensors (prompts, head); by default it follows the
    adaptation mode. `stop_after_epochs` ends the call early, as an interrupted run would.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    task = task or ClassificationTask(tcfg.label_smoothing)
    if trainable_only is None:
        trainable_only = cfg.adapt.mode in ("prompt", "linear")
    dist_info, device = setup_distributed(resolve_device(cfg.device))
    is_main = dist_info.is_main
    amp_dtype = amp_dtype_for(device, tcfg.amp)
    model.to(device)

    train_loader = make_loader(
        data.train, cfg.data.batch_size, train=True, device=device, seed=cfg.seed,
        crop_pad=cfg.data.augment.crop_pad, flip=cfg.data.augment.flip,
        num_workers=cfg.data.num_workers, img_size=cfg.data.img_size,
        rank=dist_info.rank, world_size=dist_info.world_size,
    )
    test_loader = make_loader(
        data.test, cfg.data.eval_batch_size, train=False, device=device, seed=cfg.seed,
        num_workers=cfg.data.num_workers, img_size=cfg.data.img_size,
    )
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, len(train_loader), tcfg)
    trainable, total = count_parameters(model)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        load_model(model, run_dir / MODEL_FILE)
        state = load_state(run_dir / STATE_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        history = state["history"]
        start_epoch = state["epoch"]
    elif is_main:
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))

    step_model = wrap_model(model, dist_info, device)
    if tcfg.compile:
        step_model = torch.compile(step_model)
    params = [p for p in model.parameters() if p.requires_grad]
    writer = _tensorboard(run_dir, cfg.output.tensorboard and is_main)
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model.name,
        "mode": cfg.adapt.mode,
        "dataset": data.name,
        "device": str(device),
        "params": {"trainable": trainable, "total": total},
    }
    try:
        for epoch in range(start_epoch, tcfg.epochs):
            if stop_after_epochs is not None and epoch >= stop_after_epochs:
                metrics["status"] = "stopped"
                break
            epoch_start = time.perf_counter()
            row = _train_epoch(
                step_model, task, train_loader, optimizer, scheduler, params, epoch, cfg, amp_dtype,
                show_progress=cfg.output.progress and is_main,
            )
            average_buffers(model, dist_info)
            if (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == tcfg.epochs:
                test = evaluate(model, test_loader, amp_dtype)
                row.update(test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"])
            row["wall_seconds"] = time.perf_counter() - epoch_start  # training + evaluation
            history.append(row)
            if writer is not None:
                for key, value in row.items():
                    if key not in ("epoch", "wall_seconds"):
                        writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
                writer.flush()
            metrics.update(_summary(history), status="running")
            if is_main:
                _checkpoint(
                    model, optimizer, scheduler, history, epoch + 1, run_dir, trainable_only
                )
                _write_metrics(run_dir, metrics)
        else:
            metrics["status"] = "complete"
    finally:
        if writer is not None:
            writer.close()
    metrics.update(_summary(history))
    if is_main:
        _write_metrics(run_dir, metrics)
    return metrics


def _train_epoch(
    model: nn.Module,
    task: Task,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    epoch: int,
    cfg: ExperimentConfig,
    amp_dtype: torch.dtype | None,
    show_progress: bool,
) -> dict[str, float]:
    tcfg = cfg.train
    model.train()
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    with progress_bar(
        f"{cfg.name} epoch {epoch + 1}/{tcfg.epochs}", len(loader), show_progress
    ) as advance:
        for step, (x, y) in enumerate(loader):
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, logits = task.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum = loss_sum.to(loss.device) + loss.detach().double() * len(y)
            correct = correct.to(y.device) + (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if step % _CHECK_EVERY == 0:
                _check_finite(float(loss.detach()), epoch, step)
            advance()
    train_loss = float(loss_sum) / max(seen, 1)
    _check_finite(train_loss, epoch, len(loader))
    return {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_acc": 100.0 * float(correct) / max(seen, 1),
        "lr": lr,
        "seconds": time.perf_counter() - start,
    }


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"loss became {loss} in epoch {epoch + 1} (step {step}); the last good checkpoint "
            "is kept. Lower train.lr or set train.grad_clip."
        )


def _checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: list[dict[str, float]],
    epoch: int,
    run_dir: Path,
    trainable_only: bool,
) -> None:
    state: dict[str, Any] = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "history": history,
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    save_model(model, run_dir / MODEL_FILE, trainable_only=trainable_only)
    save_state(state, run_dir / STATE_FILE)


def _summary(history: list[dict[str, float]]) -> dict[str, Any]:
    evaluated = [row for row in history if "test_top1" in row]
    summary: dict[str, Any] = {"history": history, "epochs_done": len(history)}
    if evaluated:
        last = evaluated[-1]
        summary["final"] = {k: last[k] for k in ("test_top1", "test_top5", "test_loss")}
        summary["best_top1"] = max(row["test_top1"] for row in evaluated)
    if history:
        summary["seconds_per_epoch"] = sum(r["seconds"] for r in history) / len(history)
        summary["wall_seconds"] = sum(r["wall_seconds"] for r in history)
    return summary
