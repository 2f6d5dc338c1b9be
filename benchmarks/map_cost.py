"""Cost of the parametrization's maps on a CPU: ``W = R ⊙ ω`` of every converted layer (the
forward) and ``∇ω = R ⊙ ∇W`` (its backward), pomfx's numba kernels against the torch ops that
CUDA and ``POMFX_FUSED=0`` use, interleaved round by round in one process. (A kernel layer's
backward is the torch multiply in both columns; its forward and the block layers' maps are not.)

    python benchmarks/map_cost.py                      # resnet50: 36 block layers, 17 kernel layers
    python benchmarks/map_cost.py --arch resnet18
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import pomfx
from pomfx import renorm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = pomfx.convert(getattr(torchvision.models, args.arch)(num_classes=10))
    layers = {"block": [], "kernel": []}
    for _, module, t, pom in renorm.poms(model):
        omega = module.parametrizations[t].original.detach().requires_grad_()
        grad = torch.randn(pom.layout.weight_shape)
        layers["kernel" if pom.layout.kernel else "block"].append((pom, omega, grad))

    def run(kind: str, backward: bool) -> None:
        for pom, omega, grad in layers[kind]:
            if backward:
                torch.autograd.grad(pom(omega), omega, grad)
            else:
                with torch.no_grad():
                    pom(omega)

    fused_on = pomfx.fused.enabled
    cases = {}
    for kind in layers:
        for backward in (False, True):
            for fused in (True, False):
                cases[(kind, "forward+backward" if backward else "forward", fused)] = (kind, backward, fused)
    times = {k: [] for k in cases}
    for r in range(args.rounds + 2):
        for key, (kind, backward, fused) in cases.items():
            pomfx.fused.enabled = fused_on if fused else (lambda: False)
            t = time.perf_counter()
            run(kind, backward)
            if r >= 2:  # two warm-up rounds (numba compiles on first use)
                times[key].append(time.perf_counter() - t)
    pomfx.fused.enabled = fused_on
    n = {k: sum(o.numel() for _, o, _ in v) for k, v in layers.items()}
    print(f"{args.arch}: {len(layers['block'])} block layers ({n['block'] / 1e6:.1f} M weights), "
          f"{len(layers['kernel'])} kernel layers ({n['kernel'] / 1e6:.1f} M)")  # fmt: skip
    print(f"{'layers':8} {'map':18} {'numba ms':>9} {'torch ms':>9} {'speed-up':>9}")
    for kind in layers:
        for what in ("forward", "forward+backward"):
            a = 1e3 * statistics.median(times[(kind, what, True)])
            b = 1e3 * statistics.median(times[(kind, what, False)])
            print(f"{kind:8} {what:18} {a:9.2f} {b:9.2f} {b / a:8.2f}×")


if __name__ == "__main__":
    main()
