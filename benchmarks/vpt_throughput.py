"""Training throughput and peak memory of ViT adaptation modes beside a plain timm fine-tuning loop.

Each case runs in its own process (so the CPU's peak RSS belongs to that case alone), the same
model, batch and input for every mode, bf16 autocast on CUDA, warm-up steps excluded, timings
bracketed by `torch.cuda.synchronize()`. Usage:

    python benchmarks/vpt_throughput.py              # GPU: batch 256, ViT-B/16@224, ViT-B/4@32
    python benchmarks/vpt_throughput.py --cpu-small  # CPU stand-in: smaller batch and steps
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = {  # name: (timm model, img_size, patch_size)
    "vit_b16_224": ("vit_base_patch16_224", 224, 16),
    "vit_b4_32": ("vit_base_patch16_224", 32, 4),
}
MODES = ("timm-full", "full", "linear", "prompt")


def build(case: str, mode: str, num_prompts: int) -> torch.nn.Module:
    name, img_size, patch = CASES[case]
    if mode == "timm-full":  # the peer: a plain timm model and loop, nothing of vptlab
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, img_size=img_size,
                                 patch_size=patch)
    from vptlab.models import create_model
    from vptlab.prompts import PromptConfig, adapt

    model = create_model(name, num_classes=10, img_size=img_size, patch_size=patch)
    return adapt(model, mode, PromptConfig(num_prompts=num_prompts, deep=True))


def measure(case: str, mode: str, batch: int, steps: int, warmup: int, num_prompts: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build(case, mode, num_prompts).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    img = CASES[case][1]
    x = torch.rand(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    use_amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux; the whole process, which runs this one case only
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": case, "mode": mode, "batch": batch, "steps": steps,
        "images_per_s": batch * steps / seconds, "peak_mib": peak_mib,
        "trainable": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or "cpu",
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--cpu-small", action="store_true", help="batch 8, 3 steps, 1 warm-up")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_small:
        args.batch, args.steps, args.warmup = 8, 3, 1
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.steps, args.warmup, args.prompts)))
        return
    rows = []
    for case in args.cases:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", case, mode, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--prompts", str(args.prompts)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{case:12s} {mode:10s} {r['images_per_s']:9.1f} img/s  "
                  f"{r['peak_mib']:9.0f} MiB  trainable {r['trainable']:,}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
