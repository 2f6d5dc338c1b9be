"""Where a training step's time goes: forward+backward and optimizer step timed apart, then the
torch profiler's top operators, for plain training and pomfx side by side.

    python benchmarks/profile_step.py --device cuda     # resnet50, bs 64, 224×224
    python benchmarks/profile_step.py --threads 1       # resnet18, bs 16, 64×64 on CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_ratio import LR, batch, build, sync
from torch import nn


def phases(model, opt, x, y, device: str, rounds: int) -> tuple[float, float]:
    """Median milliseconds of (forward + backward, optimizer step)."""
    loss_fn = nn.CrossEntropyLoss()
    fb, st = [], []
    for _ in range(rounds):
        opt.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        loss_fn(model(x), y).backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        fb.append(t1 - t0)
        st.append(t2 - t1)
    return 1e3 * statistics.median(fb), 1e3 * statistics.median(st)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.batch = args.batch or (64 if cuda else 16)
    args.size = args.size or (224 if cuda else 64)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    x, y = batch(args)
    for variant in ("plain", "pomfx"):
        model, opt = build(variant, args)
        phases(model, opt, x, y, args.device, 3)  # warm-up
        fb, st = phases(model, opt, x, y, args.device, args.rounds)
        print(f"{variant}: forward+backward {fb:.2f} ms, step {st:.2f} ms, total {fb + st:.2f} ms")
        acts = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            phases(model, opt, x, y, args.device, 3)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
