"""Speed and strength of vptlab's PGD beside torchattacks' PGD on the same model, budget and steps.

Both sides attack the same model (eval mode), the same test images in the same batches, with the
same Linf budget, step size and number of steps, from a random start: ours is
`create_attack("pgd", ...)`, theirs `torchattacks.PGD(model, eps, alpha, steps, random_start=True)`.
Reported: image-steps/s (images x PGD steps / attack seconds) and the robust accuracy each side
leaves. Sides alternate batch by batch (ours then theirs, theirs then ours, ...) in one process
after one unrecorded warm-up batch of each, so load from other jobs falls on both; the median of
`--repeats` passes is reported. CUDA: bf16 autocast on both sides
(torchattacks gets the model wrapped to run in bf16 autocast and return fp32 logits, as a user
would write it; the perturbation stays fp32 on both sides), timings bracketed by
`torch.cuda.synchronize()`; CPU: fp32.

Cases (`--models`):
- `simplenet-mnist5k` (CPU default): SimpleNet trained briefly on mnist-5k (28x28).
- `vit-b16-224`, `vit-b4-32` (GPU): timm ViT-B/16 at 224 and ViT-B/16 re-patched to 4 at 32, random
  weights (no pretrained weights offline) on mnist-5k resized: a throughput case; their robust
  accuracies only check that both sides agree.

Part 2, PGD-AT epochs of vptlab's loop beside a plain loop calling torchattacks' PGD, is
benchmarks/adversarial_training_vs_plain.py.

    python benchmarks/attacks_vs_torchattacks.py                                   # CPU case
    python benchmarks/attacks_vs_torchattacks.py --models vit-b16-224,vit-b4-32    # on a GPU
    python benchmarks/attacks_vs_torchattacks.py --n 512 --steps 5 --repeats 1     # quick check
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.attacks import create_attack
from vptlab.attacks.authors import FloatLogits
from vptlab.data import load_dataset
from vptlab.engine.loop import resolve_device
from vptlab.models import create_model

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name: (model, img_size, model options, trained on the CPU first)
    "simplenet-mnist5k": ("simplenet", 28, {}, True),
    "vit-b16-224": ("vit_base_patch16_224", 224, {}, False),
    "vit-b4-32": ("vit_base_patch16_224", 32, {"patch_size": 4}, False),
}


def import_torchattacks() -> ModuleType:
    """torchattacks (the peer), or an exit saying how to install it."""
    try:
        return importlib.import_module("torchattacks")
    except ImportError:
        raise SystemExit("this benchmark needs torchattacks: "
                         "pip install --no-deps 'torchattacks>=3.5'") from None  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    x = x.expand(-1, 3, -1, -1)
    return x if x.shape[-1] == size else F.interpolate(x, size=size, mode="bilinear")


def build_case(case: str, device: torch.device, train_epochs: int, batch: int) -> tuple[
    nn.Module, torch.Tensor, torch.Tensor
]:
    """The case's model (eval mode, on `device`) and the mnist-5k test images at its size."""
    name, size, options, trained = CASES[case]
    torch.manual_seed(0)
    data = load_dataset("mnist-5k", seed=0)
    model = create_model(name, num_classes=10, img_size=size, **options).to(device)
    if trained:
        x, y = data.train.x.to(device), data.train.y.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(train_epochs):
            order = torch.randperm(len(x), device=device)
            for i in range(0, len(x), 128):
                idx = order[i : i + 128]
                loss = F.cross_entropy(model(resize(x[idx], size)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.zero_grad(set_to_none=True)
    return model.eval(), resize(data.test.x, size).to(device), data.test.y.to(device)


def make_attack(side: str, model: nn.Module, args: Any, device: torch.device) -> Any:
    """`attack(model, x, y) -> x_adv` of one side."""
    if side == "vptlab":
        return create_attack("pgd", eps=args.eps, alpha=args.alpha, steps=args.steps,
                             amp=device.type == "cuda", seed=None)  # fmt: skip
    torchattacks = import_torchattacks()
    peer = FloatLogits(model, amp=True) if device.type == "cuda" else model
    pgd = torchattacks.PGD(peer, args.eps, args.alpha, args.steps, random_start=True)
    return lambda m, xb, yb: pgd(xb, yb)


def run_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any,
             device: torch.device, repeat: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """One pass over the images, both sides on every batch back to back (the side that goes
    first alternates per batch), so a change in the machine's load falls on both alike."""
    sides = ("vptlab", "torchattacks")
    attacks = {side: make_attack(side, model, args, device) for side in sides}
    seconds, correct = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0)
    for b, i in enumerate(range(0, len(x), args.batch)):
        xb, yb = x[i : i + args.batch], y[i : i + args.batch]
        for side in sides if (b + repeat) % 2 == 0 else sides[::-1]:
            sync(device)
            start = time.perf_counter()
            x_adv = attacks[side](model, xb, yb)
            sync(device)
            seconds[side] += time.perf_counter() - start
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                                 enabled=device.type == "cuda"):
                correct[side] += int((model(x_adv).argmax(1) == yb).sum())
    return {side: {"side": side, "seconds": seconds[side],
                   "image_steps_per_s": len(x) * args.steps / seconds[side],
                   "robust_top1": 100.0 * correct[side] / len(x)} for side in sides}  # fmt: skip


def markdown(summary: list[dict[str, Any]], machine: dict[str, Any], args: Any) -> str:
    lines = [
        f"vptlab PGD vs torchattacks PGD: {machine['device']}, {machine['precision']}, "
        f"{machine['threads']} threads, Linf eps {args.eps:g}, alpha {args.alpha:g}, "
        f"{args.steps} steps, batch {args.batch}, {args.n} images, "
        f"median of {args.repeats} alternating repeat(s)",
        "",
        "| case | clean top-1 | image-steps/s vptlab | image-steps/s torchattacks | speed ratio | "
        "robust top-1 vptlab | robust top-1 torchattacks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['case']} | {s['clean_top1']:.1f} | {s['vptlab']['image_steps_per_s']:.0f} | "
            f"{s['torchattacks']['image_steps_per_s']:.0f} | {s['speed_ratio']:.2f}x | "
            f"{s['vptlab']['robust_top1']:.1f} | {s['torchattacks']['robust_top1']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="simplenet-mnist5k",
                        help=f"comma-separated cases: {', '.join(CASES)}")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=None, help="default 2.5 eps / steps")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--n", type=int, default=1000, help="test images attacked (max 1,000)")
    parser.add_argument("--train-epochs", type=int, default=1, help="SimpleNet training epochs")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=None, help="JSON file (a .md table is written beside "
                        "it); default results/attacks_vs_torchattacks_<cpu|gpu>.json")
    args = parser.parse_args()
    cases = [c.strip() for c in args.models.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.repeats < 1 or args.steps < 1 or args.n < 1:
        parser.error("--repeats, --steps and --n must be >= 1")
    if args.alpha is None:
        args.alpha = 2.5 * args.eps / args.steps
    device = resolve_device(args.device)
    kind = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"attacks_vs_torchattacks_{kind}.json")
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    import_torchattacks()  # one clear error before any training if it is missing

    rows: list[dict[str, Any]] = []
    summary = []
    for case in cases:
        model, x, y = build_case(case, device, args.train_epochs, args.batch)
        x, y = x[: args.n], y[: args.n]
        with torch.no_grad():
            clean = 100.0 * float((model(x).argmax(1) == y).float().mean())
        warm = argparse.Namespace(**{**vars(args), "steps": 1})
        run_pass(model, x[: args.batch], y[: args.batch], warm, device, 0)  # unrecorded warm-up
        for repeat in range(args.repeats):
            for side, result in run_pass(model, x, y, args, device, repeat).items():
                row = result | {"case": case, "repeat": repeat}
                rows.append(row)
                print(f"{case:18s} {side:12s} repeat {repeat}: "
                      f"{row['image_steps_per_s']:8.0f} image-steps/s  "
                      f"robust top-1 {row['robust_top1']:.1f}", flush=True)
        entry: dict[str, Any] = {"case": case, "clean_top1": clean}
        for side in ("vptlab", "torchattacks"):
            mine = [r for r in rows if r["case"] == case and r["side"] == side]
            entry[side] = {k: statistics.median(r[k] for r in mine)
                           for k in ("image_steps_per_s", "robust_top1", "seconds")}
        entry["speed_ratio"] = (entry["vptlab"]["image_steps_per_s"]
                                / entry["torchattacks"]["image_steps_per_s"])
        summary.append(entry)
    table = markdown(summary, machine, args)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "options": vars(args), "summary": summary,
                               "runs": rows}, indent=2))
    out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
