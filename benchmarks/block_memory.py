"""Memory and time of large block layers (Linear, 1×1 conv): a stack of ``Linear(n, n)``, plain
SGD against pomfx + FG-SGD, each variant in its own process.

Prints the resident-memory growth per weight (bytes over the process before the model) after
building (and converting) the model, its peak during that, and the peak of two training steps
(forward, backward, optimizer step, with momentum: gradients and momentum included), and the
time of conversion and of one step. The largest torchvision models are mostly such layers: this
is what decides whether they fit (docs/zoo.md).

    python benchmarks/block_memory.py                       # 8 × Linear(4096, 4096), sp+ob+st
    python benchmarks/block_memory.py --manifolds sp+ob --layers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux: ``5`` to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(variant: str, n: int, layers: int, manifolds: str, threads: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    import pomfx

    base = _status("VmRSS")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(n, n) for _ in range(layers)], nn.Linear(n, 10))
    t0 = time.perf_counter()
    if variant == "pomfx":
        model = pomfx.convert(model, inplace=True, manifolds=manifolds)
        opt = pomfx.FGSGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    convert_s = time.perf_counter() - t0
    built, convert_peak = _status("VmRSS"), _status("VmHWM")
    _reset_peak()
    x = torch.randn(8, n)
    t1 = time.perf_counter()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    steps_s = time.perf_counter() - t1
    weights = layers * n * n
    return {
        "variant": variant,
        "bytes_per_weight_built": (built - base) / weights,
        "bytes_per_weight_convert_peak": (convert_peak - base) / weights,
        "bytes_per_weight_peak": (_status("VmHWM") - base) / weights,
        "convert_s": convert_s,
        "step_s": steps_s / 2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--manifolds", default="sp+ob+st")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.width, a.layers, a.manifolds, a.threads)))
        return
    print(f"{a.layers} × Linear({a.width}, {a.width}), batch 8, {a.threads} threads, pomfx: {a.manifolds}")
    head = ("variant", "B/w built", "B/w convert peak", "B/w step peak", "convert s", "step s")
    print("  ".join(f"{h:>16}" for h in head))
    for variant in ("plain", "pomfx"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--width",
            str(a.width),
            "--layers",
            str(a.layers),
        ]
        cmd += ["--manifolds", a.manifolds, "--threads", str(a.threads)]
        r = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        keys = ("bytes_per_weight_built", "bytes_per_weight_convert_peak", "bytes_per_weight_peak")
        cells = [f"{r[k]:16.1f}" for k in keys] + [f"{r['convert_s']:16.2f}", f"{r['step_s']:16.2f}"]
        print(f"{variant:>16}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
