"""Kernel launches and host syncs of a training step on the CUDA code path, counted on any machine.

On a GPU, a small op costs its launch (~5-10 µs of host time) whatever its size, so the number
of ops a step issues bounds how close to plain training it can get when the host is the
bottleneck (benchmarks/RESULTS.md, "GPU"). This script runs the code path that CUDA takes
(FG-SGD's batched mode, pomfx's torch ops instead of the CPU's numba kernels, torch SGD with
``foreach``) on the CPU under a dispatch mode that counts every aten op that would launch a
kernel (views, allocations and metadata ops excluded), and the host syncs (``.item()``,
``bool()``, ``nonzero``), phase by phase. pomfx's Triton kernels (:mod:`pomfx.fused_gpu`, what
CUDA runs for kernel layers' step, the λ hook and block layers' maps) run through Triton's
interpreter, each kernel called counted as one launch (``--torch-ops``: FG-SGD's torch ops, as
CUDA runs them without Triton)::

    python benchmarks/launch_count.py                 # resnet50, like the GPU benchmark
    python benchmarks/launch_count.py --arch resnet18 --top 15
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ["POMFX_FUSED"] = "0"  # the torch ops that CUDA runs, not the CPU's numba kernels
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its kernels on CPU tensors
os.environ["POMFX_TRITON"] = "0" if "--torch-ops" in sys.argv else "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# aten ops that launch no kernel: views, allocations, metadata, profiler marks
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "expand", "slice", "select", "as_strided",
    "t", "transpose", "unsqueeze", "squeeze", "alias", "detach", "split", "split_with_sizes", "unbind",
    "diagonal", "narrow", "unfold", "view_as_real", "lift_fresh", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "scalar_tensor", "_record_function_enter_new", "_record_function_exit",
    "set_", "resize_",
}  # fmt: skip
SYNCS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal"}


class Launches(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: ``launches`` (by op) and ``syncs``."""

    active: list = []  # the counters entered, innermost last
    paused = False  # inside a Triton kernel's call (the interpreter's own ops are not launches)

    def __init__(self):
        super().__init__()
        self.launches: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def __enter__(self):
        Launches.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        Launches.active.pop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if Launches.paused:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs[name] += 1
        if name not in NO_LAUNCH:
            self.launches[name] += 1
        return func(*args, **(kwargs or {}))


def _cuda_batch_var(x, cdim: int, count: int):
    """The λ hook's batch variance as on CUDA (one ``var_mean``), for the counts."""
    return torch.var_mean(x.float(), [d for d in range(x.dim()) if d != cdim], correction=0)[0]


class _Counted:
    """A generated module of :mod:`pomfx.fused_gpu` whose kernels count their launches."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name: str):
        return _Kernel(name, getattr(self._mod, name))


class _Kernel:
    """A Triton kernel whose ``kernel[grid](...)`` counts one launch ``triton.<name>`` (and in
    ``calls``); with ``run`` False it is not run at all (``host_cost.py``: the host's time
    without the interpreter's)."""

    run = True
    calls = 0

    def __init__(self, name: str, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Kernel.calls += 1
            if Launches.active:
                Launches.active[-1].launches[f"triton.{self.name}"] += 1
            if not _Kernel.run:
                return None
            Launches.paused = True  # (the interpreter's own ops are not launches)
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                Launches.paused = False

        return launch


def _count_triton() -> None:
    """Each launch of a :mod:`pomfx.fused_gpu` kernel counts as one, ``triton.<name>``; the
    torch ops around them (allocations, products, factorizations) count as themselves."""
    from pomfx import fused_gpu

    real = fused_gpu._module
    fused_gpu._module = lambda key, source: _Counted(real(key, source))
    fused_gpu._BLOCK = 1 << 14  # the interpreter runs programs one by one: fewer, wider ones
    fused_gpu._PROGRAMS = 4
    fused_gpu._BLOCK_TILE, fused_gpu._BLOCK_COLS = 1 << 22, 1 << 12  # a block per program


def narrow(arch: str, num_classes: int, div: int) -> nn.Module:
    """torchvision's ``arch`` (a ResNet) with every width divided by ``div``: the same layers,
    graph and blocks, ~div² less arithmetic (the ops' host cost without their work)."""
    from torchvision.models import resnet

    block, layers = {
        "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
        "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
        "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
        "resnet101": (resnet.Bottleneck, [3, 4, 23, 3]),
    }[arch]

    class Narrow(resnet.ResNet):
        def __init__(self):
            super().__init__(block, layers, num_classes=num_classes)
            w = 64 // div
            self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.fc = nn.Linear(512 * block.expansion // div, num_classes)

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage: its input is the narrow stem's
                self.inplanes = 64 // div
            return super()._make_layer(block, planes // div, blocks, stride, dilate)

    return Narrow()


def build(variant: str, arch: str, num_classes: int, div: int = 1):
    import torchvision

    import pomfx
    import pomfx.renorm

    pomfx.renorm._shifted_var = _cuda_batch_var
    torch.manual_seed(0)
    if div > 1:
        model = narrow(arch, num_classes, div)
    else:
        model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if variant == "pomfx":
        model = pomfx.convert(model, scheme="pio", manifolds="sp+ob+st")
        opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
        opt._batched = True  # what a CUDA device selects
        for group in opt.param_groups:
            group["foreach"] = True  # the plain parameters' torch SGD: CUDA's default
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)  # CUDA's default
    return model.train(), opt


def count(model, opt, x, y) -> dict[str, Launches]:
    """The ops of one training step (after two warm-up steps), by phase."""
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    phases = {name: Launches() for name in ("forward", "backward", "step")}
    with phases["forward"]:
        loss = loss_fn(model(x), y)
    with phases["backward"]:
        loss.backward()
    with phases["step"]:
        opt.step()
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=32, help="input size (the counts do not depend on it)")
    ap.add_argument("--top", type=int, default=0, help="also list the most frequent ops of the pomfx step")
    ap.add_argument("--torch-ops", action="store_true", help="FG-SGD's torch ops, not its Triton kernels")
    ap.add_argument(
        "--div", type=int, default=1, help="every width divided by this (ResNets; see host_cost.py)"
    )
    args = ap.parse_args()
    _count_triton()
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, args.size, args.size, generator=g)
    y = torch.randint(0, args.num_classes, (2,), generator=g)
    rows = {}
    for v in ("plain", "pomfx"):
        rows[v] = count(*build(v, args.arch, args.num_classes, args.div), x, y)
    path = "torch ops" if args.torch_ops else "Triton kernels"
    narrowed = f" (widths / {args.div})" if args.div > 1 else ""
    print(f"{args.arch}{narrowed}, CUDA code path (FG-SGD's {path}): kernel launches (host syncs) a step")
    print(f"{'phase':10s} {'plain':>14s} {'pomfx':>14s} {'ratio':>7s}")
    totals = {v: Launches() for v in rows}
    for phase in ("forward", "backward", "step", "total"):
        cells, n = [], {}
        for v in rows:
            c = totals[v] if phase == "total" else rows[v][phase]
            if phase != "total":
                totals[v].launches.update(c.launches)
                totals[v].syncs.update(c.syncs)
            n[v] = sum(c.launches.values())
            cells.append(f"{n[v]} ({sum(c.syncs.values())})")
        print(f"{phase:10s} {cells[0]:>14s} {cells[1]:>14s} {n['pomfx'] / max(1, n['plain']):7.2f}")
    for phase in ("forward", "backward", "step") if args.top else ():
        top = rows["pomfx"][phase].launches.most_common(args.top)
        print(f"pomfx {phase}:", ", ".join(f"{k} {n}" for k, n in top))


if __name__ == "__main__":
    main()
