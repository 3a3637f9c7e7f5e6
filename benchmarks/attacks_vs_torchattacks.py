"""vptlab's attacks beside torchattacks' on the same model and budget, at budgets where the model
keeps 30-70% robust accuracy, so that a weaker attack shows (at a budget that leaves 0% on both
sides, any attack "agrees").

Part 1, PGD: `create_attack("pgd", ...)` beside `torchattacks.PGD(model, eps, alpha, steps,
random_start=True)`: the same model (eval mode), the same test images in the same batches, the
same Linf budget, step size and steps. Reported: image-steps/s (images x PGD steps / attack
seconds) and the robust accuracy each side leaves. Sides alternate batch by batch (ours then
theirs, theirs then ours, ...) in one process after one unrecorded warm-up batch of each, so load
from other jobs falls on both; the median of `--repeats` passes is reported. CUDA: bf16 autocast
on both sides (ours with `amp=True`; torchattacks gets the model wrapped to run in bf16 autocast
and return fp32 logits, as a user would write it; the perturbation stays fp32 on both sides),
timings bracketed by `torch.cuda.synchronize()`; CPU: fp32.

Part 2, AutoAttack: ours (the authors' code, pyautoattack, version standard: APGD-CE and APGD-T at
100 iterations, 9 targets, FAB-T, Square at 5,000 queries) beside torchattacks' AutoAttack
(standard: the same four attacks at 10 iterations) on the first `--aa-n` test images, fp32 on
both sides, batches alternating which side goes first. PASS when our robust accuracy is at most
theirs + 0.5 points; the script exits 1 on FAIL. Reported with each side's seconds.

The model of the CPU case (`simplenet-mnist5k`) is SimpleNet adversarially trained by vptlab
(`train.objective: pgd`, Linf eps 0.2, PGD-5, 4 epochs with the eps ramped over the first 2, the
rest of configs/adversarial_mnist.yaml's recipe): about 5 minutes on 2 busy CPU cores, cached in
$VPTLAB_CACHE (default ~/.cache/vptlab) under its run key. Both parts attack it at eps 0.2, its
training budget. The GPU cases (`vit-b16-224`, `vit-b4-32`: timm ViT-B/16 at 224 and re-patched to
4 at 32, random weights, mnist-5k resized) are throughput cases for part 1 only; their robust
accuracies only check that both sides agree.

    python benchmarks/attacks_vs_torchattacks.py                                   # CPU case
    python benchmarks/attacks_vs_torchattacks.py --models vit-b16-224,vit-b4-32    # on a GPU
    python benchmarks/attacks_vs_torchattacks.py --n 256 --aa-n 64 --repeats 1     # quick check
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.attacks import create_attack
from vptlab.attacks.authors import FloatLogits
from vptlab.config import run_key
from vptlab.data import load_dataset
from vptlab.engine.loop import resolve_device
from vptlab.models import create_model
from vptlab.steps import train as runner
from vptlab.steps.resolve import resolved
from vptlab.steps.study import cache_root

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name: (model, img_size, model options, adversarially trained by vptlab first)
    "simplenet-mnist5k": ("simplenet", 28, {}, True),
    "vit-b16-224": ("vit_base_patch16_224", 224, {}, False),
    "vit-b4-32": ("vit_base_patch16_224", 32, {"patch_size": 4}, False),
}
INFORMATIVE = (30.0, 70.0)  # robust top-1 % where a weaker attack cannot hide
MARGIN = 0.5  # points ours may exceed theirs by in part 2


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


def pgd_at_config(device: str, epochs: int, eps: float) -> Any:
    """configs/adversarial_mnist.yaml's PGD-AT recipe, scaled down to minutes on a CPU."""
    raw: dict[str, Any] = {
        "seed": 0, "device": device,
        "data": {"name": "mnist-5k", "batch_size": 128, "num_workers": 0},
        "model": {"name": "simplenet"},
        "train": {"epochs": epochs, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01,
                  "warmup_epochs": 0.5, "objective": "pgd", "eps_ramp_epochs": epochs / 2,
                  "attack": {"norm": "linf", "eps": eps, "steps": 5}, "robust_probe": 0},
        "output": {"tensorboard": False, "progress": False},
    }  # fmt: skip
    cfg = resolved(raw)
    cfg.name = f"attacks-bench-pgd-at-{run_key(cfg)}"
    cfg.output.dir = str(cache_root() / "benchmarks")
    return cfg


def build_case(case: str, device: torch.device, args: Any) -> tuple[
    nn.Module, torch.Tensor, torch.Tensor
]:
    """The case's model (eval mode, on `device`) and the mnist-5k test images at its size."""
    name, size, options, adversarial = CASES[case]
    torch.manual_seed(0)
    if adversarial:
        cfg = pgd_at_config(device.type, args.train_epochs, args.eps)
        run_dir = Path(cfg.output.dir) / cfg.name
        if not (run_dir / "model.safetensors").is_file():
            start = time.perf_counter()
            runner.train(cfg, force=True)
            print(f"PGD-AT SimpleNet trained in {time.perf_counter() - start:.0f} s", flush=True)
        _, model, splits = runner.load_run(run_dir, device=device.type)
        return model.eval(), resize(splits.test.x, size).to(device), splits.test.y.to(device)
    data = load_dataset("mnist-5k", seed=0)
    model = create_model(name, num_classes=10, img_size=size, **options).to(device)
    return model.eval(), resize(data.test.x, size).to(device), data.test.y.to(device)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    """Correct predictions (fp32 logits; bf16 autocast on CUDA as part 1's attacks run)."""
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                         enabled=device.type == "cuda"):  # fmt: skip
        return int((model(x).float().argmax(1) == y).sum())


# --- Part 1: PGD ------------------------------------------------------------------------------


def make_pgd(side: str, model: nn.Module, args: Any, device: torch.device) -> Any:
    """`attack(model, x, y) -> x_adv` of one side."""
    amp = device.type == "cuda"
    if side == "vptlab":
        return create_attack("pgd", eps=args.eps, alpha=args.alpha, steps=args.steps, amp=amp,
                             seed=None)  # fmt: skip
    torchattacks = import_torchattacks()
    peer = FloatLogits(model, amp=True) if amp else model
    pgd = torchattacks.PGD(peer, args.eps, args.alpha, args.steps, random_start=True)
    return lambda m, xb, yb: pgd(xb, yb)


def pgd_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any,
             device: torch.device, repeat: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """One pass over the images, both sides on every batch back to back (the side that goes
    first alternates per batch), so a change in the machine's load falls on both alike."""
    sides = ("vptlab", "torchattacks")
    attacks = {side: make_pgd(side, model, args, device) for side in sides}
    seconds, correct = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0)
    for b, i in enumerate(range(0, len(x), args.batch)):
        xb, yb = x[i : i + args.batch], y[i : i + args.batch]
        for side in sides if (b + repeat) % 2 == 0 else sides[::-1]:
            sync(device)
            start = time.perf_counter()
            x_adv = attacks[side](model, xb, yb)
            sync(device)
            seconds[side] += time.perf_counter() - start
            correct[side] += accuracy(model, x_adv, yb, device)
    return {side: {"side": side, "seconds": seconds[side],
                   "image_steps_per_s": len(x) * args.steps / seconds[side],
                   "robust_top1": 100.0 * correct[side] / len(x)} for side in sides}  # fmt: skip


def pgd_part(case: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any,
             device: torch.device, rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    clean = 100.0 * accuracy(model, x, y, device) / len(x)
    warm = argparse.Namespace(**{**vars(args), "steps": 1})
    pgd_pass(model, x[: args.batch], y[: args.batch], warm, device, 0)  # unrecorded warm-up
    for repeat in range(args.repeats):
        for side, result in pgd_pass(model, x, y, args, device, repeat).items():
            row = result | {"case": case, "repeat": repeat}
            rows.append(row)
            print(f"PGD {case:18s} {side:12s} repeat {repeat}: "
                  f"{row['image_steps_per_s']:8.0f} image-steps/s  "
                  f"robust top-1 {row['robust_top1']:.1f}", flush=True)  # fmt: skip
    entry: dict[str, Any] = {"case": case, "clean_top1": clean}
    for side in ("vptlab", "torchattacks"):
        mine = [r for r in rows if r["case"] == case and r["side"] == side]
        entry[side] = {k: statistics.median(r[k] for r in mine)
                       for k in ("image_steps_per_s", "robust_top1", "seconds")}  # fmt: skip
    entry["speed_ratio"] = (entry["vptlab"]["image_steps_per_s"]
                            / entry["torchattacks"]["image_steps_per_s"])  # fmt: skip
    robust = (entry["vptlab"]["robust_top1"], entry["torchattacks"]["robust_top1"])
    entry["informative"] = all(INFORMATIVE[0] <= r <= INFORMATIVE[1] for r in robust)
    return entry


# --- Part 2: AutoAttack -----------------------------------------------------------------------


def autoattack_part(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any,
                    device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Both AutoAttacks (standard) on the same images, fp32; robust top-1, seconds, PASS/FAIL."""
    torchattacks = import_torchattacks()
    ours = create_attack("autoattack", eps=args.eps, version="standard", seed=0)
    theirs = torchattacks.AutoAttack(model, norm="Linf", eps=args.eps, version="standard",
                                     n_classes=10, seed=0)  # fmt: skip
    run = {"vptlab": lambda xb, yb: ours(model, xb, yb), "torchattacks": theirs}
    sides = tuple(run)
    seconds, correct = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0)
    for b, i in enumerate(range(0, len(x), args.aa_batch)):
        xb, yb = x[i : i + args.aa_batch], y[i : i + args.aa_batch]
        for side in sides if b % 2 == 0 else sides[::-1]:
            sync(device)
            start = time.perf_counter()
            x_adv = run[side](xb, yb)
            sync(device)
            seconds[side] += time.perf_counter() - start
            with torch.no_grad():
                correct[side] += int((model(x_adv).argmax(1) == yb).sum())
            print(f"AutoAttack {side:12s} images {i}-{i + len(xb)}: "
                  f"{100.0 * correct[side] / (i + len(xb)):.1f}% robust so far, "
                  f"{seconds[side]:.0f} s", flush=True)  # fmt: skip
    with torch.no_grad():
        clean = 100.0 * float((model(x).argmax(1) == y).float().mean())
    result: dict[str, Any] = {"images": len(x), "clean_top1": clean, "flags": ours.flags}
    for side in sides:
        result[side] = {"robust_top1": 100.0 * correct[side] / len(x), "seconds": seconds[side]}
    gap = result["vptlab"]["robust_top1"] - result["torchattacks"]["robust_top1"]
    result["gap_points"] = gap
    result["verdict"] = "PASS" if gap <= MARGIN else "FAIL"
    return result


def markdown(pgd: list[dict[str, Any]], aa: dict[str, Any] | None, machine: dict[str, Any],
             args: Any) -> str:  # fmt: skip
    lines = [
        f"Machine: {machine['device']}, {machine['threads']} torch threads, torch "
        f"{machine['torch']}.",
        "",
    ]
    if pgd:
        lines += [
            f"Part 1, vptlab PGD vs torchattacks PGD: {machine['precision']}, Linf eps "
            f"{args.eps:g}, alpha {args.alpha:g}, {args.steps} steps, batch {args.batch}, "
            f"{args.n} images, median of {args.repeats} alternating repeat(s)",
            "",
            "| case | clean top-1 | image-steps/s vptlab | image-steps/s torchattacks | "
            "speed ratio | robust top-1 vptlab | robust top-1 torchattacks | in 30-70% |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in pgd:
            lines.append(
                f"| {s['case']} | {s['clean_top1']:.1f} | "
                f"{s['vptlab']['image_steps_per_s']:.0f} | "
                f"{s['torchattacks']['image_steps_per_s']:.0f} | {s['speed_ratio']:.2f}x | "
                f"{s['vptlab']['robust_top1']:.1f} | {s['torchattacks']['robust_top1']:.1f} | "
                f"{'yes' if s['informative'] else 'no'} |"
            )
        lines.append("")
    if aa is not None:
        lines += [
            f"Part 2, AutoAttack standard, vptlab (the authors' code, pyautoattack) vs "
            f"torchattacks: fp32, Linf eps {args.eps:g}, the first {aa['images']} test images "
            f"of simplenet-mnist5k (PGD-AT), batches of {args.aa_batch}",
            "",
            "| side | robust top-1 | seconds |",
            "|---|---:|---:|",
            f"| vptlab | {aa['vptlab']['robust_top1']:.1f} | {aa['vptlab']['seconds']:.0f} |",
            f"| torchattacks | {aa['torchattacks']['robust_top1']:.1f} | "
            f"{aa['torchattacks']['seconds']:.0f} |",
            "",
            f"Clean top-1 {aa['clean_top1']:.1f}. vptlab - torchattacks = {aa['gap_points']:+.1f} "
            f"points (must be <= +{MARGIN}): **{aa['verdict']}**. Flags raised by the authors' "
            f"checks: {'; '.join(aa['flags']) or 'none'}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="simplenet-mnist5k",
                        help=f"comma-separated cases for part 1: {', '.join(CASES)}")
    parser.add_argument("--parts", default="pgd,autoattack", help="pgd, autoattack or both")
    parser.add_argument("--eps", type=float, default=0.2,
                        help="Linf budget of both parts (and of the PGD-AT training)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=None, help="default 2.5 eps / steps")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--n", type=int, default=1000, help="test images for PGD (max 1,000)")
    parser.add_argument("--aa-n", type=int, default=200, help="test images for AutoAttack")
    parser.add_argument("--aa-batch", type=int, default=100)
    parser.add_argument("--train-epochs", type=int, default=4, help="PGD-AT SimpleNet epochs")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    # One thread by default: on two cores shared with other jobs, two threads mostly wait on each
    # other in the authors' many small per-iteration ops (AutoAttack on 20 images under load:
    # 399 s with two threads, 31 s with one).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=None, help="JSON file (a .md table is written beside "
                        "it); default results/attacks_vs_torchattacks_<cpu|gpu>.json")
    args = parser.parse_args()
    cases = [c.strip() for c in args.models.split(",") if c.strip()]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if not parts or parts - {"pgd", "autoattack"}:
        parser.error("--parts: pgd, autoattack or pgd,autoattack")
    if min(args.repeats, args.steps, args.n, args.aa_n, args.aa_batch, args.batch) < 1:
        parser.error("--repeats, --steps, --n, --aa-n, --batch and --aa-batch must be >= 1")
    if args.alpha is None:
        args.alpha = 2.5 * args.eps / args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
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
    pgd: list[dict[str, Any]] = []
    aa: dict[str, Any] | None = None
    start = time.perf_counter()
    for case in cases if "pgd" in parts else []:
        model, x, y = build_case(case, device, args)
        pgd.append(pgd_part(case, model, x[: args.n], y[: args.n], args, device, rows))
    if "autoattack" in parts:
        model, x, y = build_case("simplenet-mnist5k", device, args)
        aa = autoattack_part(model, x[: args.aa_n], y[: args.aa_n], args, device)
    table = markdown(pgd, aa, machine, args)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "options": vars(args), "pgd": pgd,
                               "autoattack": aa, "runs": rows,
                               "wall_seconds": time.perf_counter() - start}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    return 1 if aa is not None and aa["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
