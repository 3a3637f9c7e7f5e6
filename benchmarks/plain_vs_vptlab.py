"""Time and accuracy of vptlab's training loop beside a plain PyTorch loop on the demo's models.

The baseline SimpleNet and vit-scratch runs (configs/mnist_baselines.yaml, mnist-5k) are trained
twice over:
by vptlab's public API (`vptlab.steps.train.train`, writing its run folder to a temporary
directory, TensorBoard and progress bar off) and by the tight loop below, which uses nothing of
vptlab's engine: the same model from `create_model` with the same seed (so the same weights at the
start), the same data tensors kept on the device, AdamW without weight decay on norms, biases and
tokens, linear warm-up then per-step cosine, per-image random shifts of +-crop_pad pixels, the same
batch size and epochs, test top-1 after every epoch. Runs alternate (vptlab, plain, vptlab, plain
...) in one process, after one unrecorded 1-epoch warm-up run of each side per model, so both sides
see the same load on a shared machine. CUDA: bf16 autocast on both sides, timings bracketed by
`torch.cuda.synchronize()`; CPU: fp32. Usage:

    python benchmarks/plain_vs_vptlab.py                                  # the demo's epochs
    python benchmarks/plain_vs_vptlab.py --epochs-scale 0.1 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.config import ExperimentConfig, load_yaml
from vptlab.data import load_dataset
from vptlab.engine.loop import resolve_device
from vptlab.models import create_model
from vptlab.steps.build import build_experiment
from vptlab.steps.resolve import resolved
from vptlab.steps.study import deep_merge
from vptlab.steps.train import train

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "mnist_baselines.yaml"
MODELS = ("simplenet", "vit-scratch")
NO_DECAY_NAMES = ("cls_token", "pos_embed")  # tokens are not weights to shrink


def demo_config(label: str, device: str, epochs_scale: float, out_dir: str) -> ExperimentConfig:
    """The demo study's run `label` (base merged with the run), as a run config of its own."""
    study = load_yaml(DEMO)
    raw = deep_merge(study.get("base", {}), study["runs"][label])
    epochs = max(1, round(raw["train"]["epochs"] * epochs_scale))
    return resolved(raw, [
        f"name={label}", f"device={device}", f"train.epochs={epochs}", f"output.dir={out_dir}",
        "output.tensorboard=false", "output.progress=false",
    ])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The plain side: what a researcher would write by hand. Reads only the recipe's numbers from cfg.


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, then crop each image at its own random offset (shift of +-pad px)."""
    b, _, h, w = x.shape
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)  # B,C,2p+1,2p+1,H,W
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), device=x.device)
    return windows[torch.arange(b, device=x.device), :, dy, dx]  # B,C,H,W


@torch.no_grad()
def test_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, amp: bool) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x[i : i + batch])
        correct += (logits.argmax(1) == y[i : i + batch]).sum()
    return 100.0 * correct.item() / len(x)


def plain_run(cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    tcfg, dcfg = cfg.train, cfg.data
    amp = device.type == "cuda"
    sync(device)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_dataset(dcfg.name, seed=cfg.seed)
    model = create_model(cfg.model.name, num_classes=data.num_classes,
                         img_size=data.train.x.shape[-1], **cfg.model.options).to(device)
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)  # gray (N,1,H,W)
    x_test, y_test = data.test.x.to(device).expand(-1, 3, -1, -1), data.test.y.to(device)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_NAMES) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr)
    n, batch = len(x_train), dcfg.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total = tcfg.epochs * steps_per_epoch
    warmup = int(tcfg.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    history = []
    for epoch in range(tcfg.epochs):
        sync(device)
        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        order = torch.randperm(n, device=device)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            x = random_shift(x_train[idx], dcfg.augment.crop_pad).expand(-1, 3, -1, -1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
        top1 = test_top1(model, x_test, y_test, dcfg.eval_batch_size, amp)
        train_loss = loss_sum.item() / n
        sync(device)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_top1": top1,
                        "seconds": time.perf_counter() - epoch_start})
    sync(device)
    return {"run_seconds": time.perf_counter() - start, "history": history}


# ---------------------------------------------------------------------------------------------
# The vptlab side: the public API, as a user runs it.


def vptlab_run(cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    sync(device)
    start = time.perf_counter()
    metrics = train(cfg)
    sync(device)
    run_seconds = time.perf_counter() - start
    history = [{"epoch": r["epoch"], "train_loss": r["train_loss"], "test_top1": r["test_top1"],
                "seconds": r["wall_seconds"]}  # training + evaluation, as the plain epoch
               for r in metrics["history"]]
    return {"run_seconds": run_seconds, "history": history}


def same_init(cfg: ExperimentConfig) -> bool:
    """Whether vptlab's experiment and the plain side start from the very same weights."""
    _, ours = build_experiment(cfg)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data.name, seed=cfg.seed)
    plain = create_model(cfg.model.name, num_classes=data.num_classes,
                         img_size=data.train.x.shape[-1], **cfg.model.options)
    a, b = ours.state_dict(), plain.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------


def measure(side: str, run: Callable[[ExperimentConfig, torch.device], dict[str, Any]],
            cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(cfg.model_copy(update={"output": cfg.output.model_copy(
            update={"dir": tmp})}), device)
    history = result["history"]
    later = history[1:] or history  # the first epoch of a run is warm-up; kept if it is the only
    epochs = len(history)
    return {
        "model": cfg.name, "side": side, "epochs": epochs,
        "s_per_epoch": statistics.median(r["seconds"] for r in later),
        "run_s_per_epoch": result["run_seconds"] / epochs,
        "run_seconds": result["run_seconds"],
        "final_top1": history[-1]["test_top1"],
        "history": history,
    }


def summarize(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["model"] == model and r["side"] == side)

    out: dict[str, Any] = {"model": model,
                           "epochs": next(r["epochs"] for r in rows if r["model"] == model)}
    for key in ("s_per_epoch", "run_s_per_epoch", "final_top1"):
        out[key] = {side: median(side, key) for side in ("vptlab", "plain")}
    out["time_ratio"] = out["s_per_epoch"]["vptlab"] / out["s_per_epoch"]["plain"]
    out["run_time_ratio"] = out["run_s_per_epoch"]["vptlab"] / out["run_s_per_epoch"]["plain"]
    out["top1_gap"] = out["final_top1"]["vptlab"] - out["final_top1"]["plain"]
    out["goal_met"] = out["time_ratio"] <= 1.1 and out["top1_gap"] >= -1.0
    return out


def markdown(summary: list[dict[str, Any]], machine: dict[str, Any], repeats: int) -> str:
    lines = [
        f"vptlab vs a plain PyTorch loop: {machine['device']}, {machine['precision']}, "
        f"{machine['threads']} threads, median of {repeats} alternating repeat(s)",
        "",
        "| model | epochs | s/epoch vptlab | s/epoch plain | ratio | run s/epoch vptlab | "
        "run s/epoch plain | run ratio | top-1 vptlab | top-1 plain | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        t, r, a = s["s_per_epoch"], s["run_s_per_epoch"], s["final_top1"]
        lines.append(
            f"| {s['model']} | {s['epochs']} | {t['vptlab']:.2f} | {t['plain']:.2f} | "
            f"{s['time_ratio']:.2f}x | {r['vptlab']:.2f} | {r['plain']:.2f} | "
            f"{s['run_time_ratio']:.2f}x | {a['vptlab']:.1f} | {a['plain']:.1f} | "
            f"{'met' if s['goal_met'] else 'missed'} |"
        )
    lines += [
        "",
        "s/epoch: training + test evaluation, median over epochs after the first; run s/epoch: "
        "the whole run (data, model, every epoch, vptlab's checkpoints and metrics) / epochs. "
        "Goal: ratio <= 1.1x and top-1 within 1 point of the plain loop.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated demo runs")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply the demo's epochs (at least 1 each); 1 = the demo")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=None, help="JSON file (a .md table is written beside it); "
                        "default results/plain_vs_vptlab_<cpu|gpu>[_x<scale>].json")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; the demo has {', '.join(MODELS)}")
    if args.repeats < 1 or args.epochs_scale <= 0:
        parser.error("--repeats must be >= 1 and --epochs-scale > 0")
    device = resolve_device(args.device)
    if args.out is None:
        scale = "" if args.epochs_scale == 1 else f"_x{args.epochs_scale:g}"
        kind = "gpu" if device.type == "cuda" else "cpu"
        args.out = str(ROOT / "benchmarks" / "results" / f"plain_vs_vptlab_{kind}{scale}.json")
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

    rows: list[dict[str, Any]] = []
    checks: dict[str, bool] = {}
    for model in models:
        cfg = demo_config(model, device.type, args.epochs_scale, "unused")
        checks[model] = same_init(cfg)
        if not checks[model]:
            raise SystemExit(f"{model}: vptlab and the plain loop start from different weights")
        warm = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
        measure("vptlab", vptlab_run, warm, device)  # unrecorded warm-up of each side
        measure("plain", plain_run, warm, device)
        for repeat in range(args.repeats):
            for side, run in (("vptlab", vptlab_run), ("plain", plain_run)):
                row = measure(side, run, cfg, device) | {"repeat": repeat}
                rows.append(row)
                print(f"{model:12s} {side:7s} repeat {repeat}: {row['s_per_epoch']:6.2f} s/epoch "
                      f"({row['run_seconds']:6.1f} s run, {row['epochs']} epochs)  "
                      f"top-1 {row['final_top1']:.1f}", flush=True)
    summary = [summarize(rows, model) for model in models]
    table = markdown(summary, machine, args.repeats)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "epochs_scale": args.epochs_scale, "repeats": args.repeats,
              "same_init": checks, "summary": summary, "runs": rows}
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
