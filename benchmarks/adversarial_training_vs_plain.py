"""One PGD-AT recipe trained twice side by side: vptlab's loop (`train.objective: pgd`) and a plain
PyTorch loop that calls torchattacks' PGD every step. Seconds per epoch and final clean / PGD-20
accuracy of each.

The recipe is configs/adversarial_mnist.yaml's `pgd-at` run (SimpleNet on mnist-5k, AdamW lr 3e-3,
weight decay 0.01, batch 128, 0.5 epoch warm-up then cosine, Linf eps 0.3 ramped over the first 5
epochs, PGD-7 with step 2.5 eps / 7 from a random start), without its per-epoch robust probe. The
plain loop is what a user would write by hand: the same model init, data resident on the device,
a shuffled index per epoch, `AdamW(model.parameters())`, the same warm-up + cosine in a LambdaLR,
and `torchattacks.PGD(model, eps_t, alpha_t, 7, random_start=True)` with its defaults (it
switches the model to eval mode for the attack; vptlab attacks in train mode with the BatchNorm
statistics kept, as Madry's code does). Gray digits are repeated to 3 channels once, up front.

Timing: the two trainings alternate epoch by epoch in one process (vptlab resumes its run folder
for each next epoch with `stop_after_epochs`, so its time includes its checkpoint writes and
restore), after one unrecorded warm-up step of each. Both final models are then scored by the same
attack: vptlab's PGD-20 (random start, step eps/8, seed 0) on the 1,000 test digits.

    python benchmarks/adversarial_training_vs_plain.py                 # the preset's 15 epochs
    python benchmarks/adversarial_training_vs_plain.py --epochs 2      # a quick check
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.attacks import create_attack
from vptlab.config import load_yaml
from vptlab.data.loaders import Batch
from vptlab.engine.loop import fit, resolve_device
from vptlab.metrics.suite import evaluate_suite
from vptlab.steps.build import build_experiment, build_task
from vptlab.steps.resolve import resolved

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "adversarial_mnist.yaml"


def import_torchattacks() -> ModuleType:
    """torchattacks (the peer), or an exit saying how to install it."""
    try:
        return importlib.import_module("torchattacks")
    except ImportError:
        raise SystemExit("this benchmark needs torchattacks: "
                         "pip install --no-deps 'torchattacks>=3.5'") from None  # fmt: skip


def recipe(epochs: int, device: str, run_root: str) -> Any:
    """The preset's pgd-at config, probe off, in a scratch folder."""
    study = load_yaml(PRESET)
    raw = {**study["base"], "name": "vptlab-pgd-at", "device": device,
           "output": {"dir": run_root, "progress": False, "tensorboard": False}}
    overrides = [f"train.{k}={v}" for k, v in study["runs"]["pgd-at"]["train"].items()]
    ramp = min(float(overrides_ramp(study)), epochs)  # a quick check may be shorter than the ramp
    overrides += [f"train.epochs={epochs}", f"train.eps_ramp_epochs={ramp}", "train.robust_probe=0",
                  "train.keep_best_robust=false", "data.num_workers=0"]
    return resolved(raw, overrides)


def overrides_ramp(study: dict[str, Any]) -> float:
    run = study["runs"]["pgd-at"]["train"]
    return run.get("eps_ramp_epochs", study["base"]["train"].get("eps_ramp_epochs", 0))


class PlainPGDAT:
    """The hand-written peer: the same recipe, torchattacks' PGD for the inner maximization."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Any,
                 attack_mode: str = "train") -> None:  # fmt: skip
        self.model, self.x, self.y, self.cfg = model, x, y, cfg
        self.attack_mode = attack_mode
        t = cfg.train
        self.batch = cfg.data.batch_size
        self.steps_per_epoch = math.ceil(len(x) / self.batch)
        self.opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        total, warmup = t.epochs * self.steps_per_epoch, int(t.warmup_epochs * self.steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.torchattacks = import_torchattacks()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0

    def step(self, xb: torch.Tensor, yb: torch.Tensor, progress: float) -> None:
        t = self.cfg.train
        eps = t.attack.eps * min(1.0, progress / t.eps_ramp_epochs) if t.eps_ramp_epochs else \
            t.attack.eps
        self.model.train()
        if eps > 0:
            alpha = 2.5 * eps / t.attack.steps
            pgd = self.torchattacks.PGD(self.model, eps, alpha, t.attack.steps, random_start=True)
            if self.attack_mode == "train":  # the function the step trains, as vptlab attacks
                pgd.set_model_training_mode(model_training=True, batchnorm_training=True)
            xb = pgd(xb, yb)
        loss = F.cross_entropy(self.model(xb), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()

    def train_epoch(self) -> None:
        order = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for i, start in enumerate(range(0, len(self.x), self.batch)):
            idx = order[start : start + self.batch]
            self.step(self.x[idx], self.y[idx], self.epoch + i / self.steps_per_epoch)
        self.epoch += 1


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def score(model: nn.Module, data: Any, device: torch.device) -> dict[str, float]:
    model.eval()
    attack = create_attack("pgd", eps=0.3, alpha=0.0375, steps=20, seed=0)
    out = evaluate_suite(model, data.test, [attack], progress=False)
    return {"clean_top1": out["clean/top1"], "pgd20_top1": out[f"{attack.name}/acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--peer-attack-mode", choices=("train", "eval"), default="train",
                        help="the mode torchattacks attacks the peer's model in: train (the same "
                        "workload as vptlab's, BatchNorm on batch statistics) or eval "
                        "(torchattacks' default)")
    parser.add_argument("--out", default=None, help="JSON file (a .md table is written beside "
                        "it); default results/adversarial_training_vs_plain_<cpu|gpu>_peer-<mode>"
                        ".json")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    device = resolve_device(args.device)
    kind = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results"
               / f"adversarial_training_vs_plain_{kind}_peer-{args.peer_attack_mode}.json")
    import_torchattacks()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(args.epochs, device.type, tmp)
        run_dir = Path(tmp) / cfg.name
        data, ours = build_experiment(cfg)
        _, theirs = build_experiment(cfg)  # the same seed: the same initial weights
        theirs.to(device)
        plain = PlainPGDAT(theirs, rgb(data.train.x).to(device), data.train.y.to(device), cfg,
                           args.peer_attack_mode)
        warm_up(cfg, data, device, args.peer_attack_mode)
        seconds: dict[str, list[float]] = {"vptlab": [], "plain": []}
        for epoch in range(args.epochs):
            sync(device)
            start = time.perf_counter()
            fit(ours, data, cfg, run_dir, task=build_task(cfg), evaluators=[],
                resume=epoch > 0, stop_after_epochs=epoch + 1)
            sync(device)
            seconds["vptlab"].append(time.perf_counter() - start)
            start = time.perf_counter()
            plain.train_epoch()
            sync(device)
            seconds["plain"].append(time.perf_counter() - start)
            print(f"epoch {epoch + 1:2d}: vptlab {seconds['vptlab'][-1]:6.2f} s   "
                  f"plain {seconds['plain'][-1]:6.2f} s", flush=True)
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        seconds["vptlab loop"] = [row["seconds"] for row in history]
        results = {"vptlab": score(ours, data, device), "plain": score(theirs, data, device)}
    for side in results:
        results[side]["median_s_per_epoch"] = statistics.median(seconds[side])
        results[side]["total_s"] = sum(seconds[side])
    results["vptlab"]["median_loop_s_per_epoch"] = statistics.median(seconds["vptlab loop"])
    ratio = results["plain"]["median_s_per_epoch"] / results["vptlab"]["median_s_per_epoch"]
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    table = markdown(results, ratio, machine, args.epochs, args.peer_attack_mode)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "epochs": args.epochs, "results": results,
                               "peer_attack_mode": args.peer_attack_mode,
                               "speed_ratio": ratio, "seconds": seconds}, indent=2))
    out.with_suffix(".md").write_text(table)


def warm_up(cfg: Any, data: Any, device: torch.device, attack_mode: str) -> None:
    """One unrecorded PGD-AT step of each side on throwaway models (allocator, kernels)."""
    x, y = rgb(data.train.x[:128]).to(device), data.train.y[:128].to(device)
    model = build_experiment(cfg)[1].to(device).train()
    task = build_task(cfg)
    task.set_progress(cfg.train.eps_ramp_epochs)
    loss, _ = task.loss(model, Batch(x, y, torch.arange(len(y), device=device)), model)
    loss.backward()
    peer = PlainPGDAT(build_experiment(cfg)[1].to(device), x, y, cfg, attack_mode)
    peer.step(x, y, cfg.train.eps_ramp_epochs)


def markdown(results: dict[str, Any], ratio: float, machine: dict[str, Any], epochs: int,
             peer_mode: str) -> str:  # fmt: skip
    lines = [
        f"PGD-AT, vptlab loop vs plain loop + torchattacks PGD: {machine['device']}, "
        f"{machine['threads']} threads, SimpleNet on mnist-5k, configs/adversarial_mnist.yaml "
        f"pgd-at recipe (batch 128, PGD-7, Linf eps 0.3 ramped over 5 epochs), {epochs} epochs, "
        "epochs alternating in one process; scored by the same PGD-20 (eps 0.3, step 0.0375) "
        f"on the 1,000 test digits. The peer's torchattacks PGD attacks its model in {peer_mode} "
        "mode (vptlab attacks in train mode, BatchNorm statistics kept)",
        "",
        "| side | median s / epoch | of which training steps | total s | clean top-1 | "
        "PGD-20 top-1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side, r in results.items():
        loop = r.get("median_loop_s_per_epoch", r["median_s_per_epoch"])
        lines.append(f"| {side} | {r['median_s_per_epoch']:.2f} | {loop:.2f} | "
                     f"{r['total_s']:.1f} | {r['clean_top1']:.1f} | {r['pgd20_top1']:.1f} |")
    loop_ratio = results["plain"]["median_s_per_epoch"] / results["vptlab"][
        "median_loop_s_per_epoch"]
    lines += ["", f"Speed ratio (plain s / vptlab s per epoch): {ratio:.2f}x with vptlab's "
              f"per-epoch resume, checkpoint and metrics files; {loop_ratio:.2f}x for the "
              "training steps alone (the loop's own per-epoch `seconds`). vptlab resumes its "
              "run folder before each epoch only so that the sides can alternate; a normal run "
              "restores once."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
