"""Host time of a training step on the CUDA code path, measured on any machine.

On a GPU the host issues a step's kernels while the device runs the earlier ones; when the
host's share of a step is longer than the device's, the device waits, and that was pomfx's
GPU cost (benchmarks/RESULTS.md, "GPU"). This script times what the host does: the CUDA code
path (as ``launch_count.py`` runs it: FG-SGD batched, the torch ops CUDA runs, torch SGD with
``foreach``) on CPU tensors of a ResNet whose widths are divided by ``--div`` (the same layers,
jobs and launches as the full network, :func:`launch_count.narrow`; the ops' arithmetic is then
small beside their dispatch), with pomfx's Triton kernels counted but not run (their launch,
the driver's part of it, is the one host cost not in the times). Phases and the whole step,
medians of ``--rounds``, plain and pomfx interleaved, one thread::

    python benchmarks/host_cost.py                        # resnet50 / 16
    python benchmarks/host_cost.py --arch resnet18 --profile 20
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import launch_count as lc  # (first: the CUDA code path's environment, before torch)
import torch
from torch import nn


def phases(model, opt, x, y) -> tuple[float, float, float, int]:
    """Seconds of forward, backward and step of one training step, and its Triton launches."""
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad(set_to_none=True)
    calls = lc._Kernel.calls
    t0 = time.perf_counter()
    loss = loss_fn(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, lc._Kernel.calls - calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--div", type=int, default=16, help="every width divided by this")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--profile", type=int, default=0, help="also cProfile pomfx's steps: the top N functions")
    args = ap.parse_args()
    lc._count_triton()
    lc._Kernel.run = False
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, args.num_classes, (2,), generator=g)
    built = {v: lc.build(v, args.arch, args.num_classes, args.div) for v in ("plain", "pomfx")}
    times: dict = {v: [] for v in built}
    for r in range(args.rounds + 3):
        for v, (model, opt) in built.items():
            t = phases(model, opt, x, y)
            if r >= 3:  # after the warm-up
                times[v].append(t)
    print(f"{args.arch} (widths / {args.div}), CUDA code path on the host: ms per training step (median)")
    print(f"{'phase':10s} {'plain':>8s} {'pomfx':>8s} {'ratio':>7s}")
    for i, phase in enumerate(("forward", "backward", "step", "total")):
        pick = (lambda t: sum(t[:3])) if i == 3 else (lambda t, i=i: t[i])
        m = {v: 1e3 * statistics.median(pick(t) for t in ts) for v, ts in times.items()}
        print(f"{phase:10s} {m['plain']:8.2f} {m['pomfx']:8.2f} {m['pomfx'] / m['plain']:7.2f}")
    print(f"Triton launches a step (not run, not in the times): {times['pomfx'][-1][3]}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            phases(*built["pomfx"], x, y)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
