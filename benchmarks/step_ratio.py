"""Cost of a training step with pomfx, against plain training and two peers, side by side.

One process builds four variants of the same torchvision model and times a full training step
(forward + backward + optimizer step) of each, interleaved round by round after a warm-up, and
prints the medians and their ratios to plain training (DESIGN §4), the same ratios taken round by
round (a host whose speed drifts moves them less), and each variant's optimizer step alone
(``opt ms``):

- ``plain``: the model with ``torch.optim.SGD(momentum=0.9)``;
- ``pomfx``: ``pomfx.convert(model, scheme="pio", manifolds="sp+ob+st")`` with
  ``pomfx.FGSGD(momentum=0.9)``;
- ``geotorch``: ``geotorch.orthogonal`` on every conv weight, trained with SGD(momentum=0.9);
- ``geoopt``: every conv weight a ``geoopt.ManifoldParameter`` on ``geoopt.EuclideanStiefel``
  (QR retraction, the metric pomfx uses), trained with ``geoopt.optim.RiemannianSGD``.

The peers constrain what they support on a conv weight, the way pomfx cuts it: a conv with a
k×k kernel gets orthogonal kernels (the last two dims of the weight, geotorch's own reading of
``orthogonal(conv)``), a 1×1 conv an orthogonal (out × in) matrix (``--peer-shape matrix``
flattens every conv to (out, in·k·k) instead). As with pomfx's default, the classifier stays
plain. Peak memory is measured per variant in a child process (CPU: peak RSS growth over the
process after imports, over two steps after the model is built; CUDA:
``torch.cuda.max_memory_allocated`` over two steps). ``faults`` is the median count of minor page
faults a step (the process's, so on CUDA mostly host-side): fresh pages, each costing
microseconds, where the allocator gave memory back and took it again.

    python benchmarks/step_ratio.py                       # CPU: resnet18, bs 16, 64×64, 2 threads
    python benchmarks/step_ratio.py --device cuda         # GPU: resnet50, bs 64, 224×224
    python benchmarks/step_ratio.py --device cuda --graph --variants plain,pomfx   # steps as CUDA graphs
    python benchmarks/step_ratio.py --variants plain,pomfx --rounds 30
    python benchmarks/step_ratio.py --variants plain,pomfx --lr 0.1 --fresh --batch 64 --size 32  # CIFAR-like
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("plain", "pomfx", "geotorch", "geoopt")
LR, MOMENTUM = 0.01, 0.9


# -- the peers ----------------------------------------------------------------------------------
class MatrixConv2d(nn.Module):
    """A conv whose weight is held as one matrix (for the peers' Stiefel constraints).

    ``weight`` is ``(out, in·k·k)``, or its transpose when that is taller (``tall=True``, for
    geoopt, whose Stiefel manifold takes tall matrices only)."""

    def __init__(self, conv: nn.Conv2d, tall: bool):
        super().__init__()
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        self.shape = conv.weight.shape
        self.transposed = tall and w.shape[0] < w.shape[1]
        self.weight = nn.Parameter(w.t().contiguous() if self.transposed else w.clone())
        self.bias = conv.bias
        self.kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def forward(self, x):
        w = self.weight.t() if self.transposed else self.weight
        return F.conv2d(x, w.reshape(self.shape), self.bias, **self.kw)


def _convs(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def with_geotorch(model: nn.Module, peer_shape: str) -> nn.Module:
    import geotorch

    for name, conv in _convs(model):
        if peer_shape == "kernel" and conv.weight[0, 0].numel() > 1:
            geotorch.orthogonal(conv, "weight")  # orthogonal k×k kernels
        else:
            m = MatrixConv2d(conv, tall=False)
            geotorch.orthogonal(m, "weight")
            _swap(model, name, m)
    return model


def with_geoopt(model: nn.Module, peer_shape: str) -> nn.Module:
    import geoopt

    st = geoopt.EuclideanStiefel()
    for name, conv in _convs(model):
        if peer_shape == "kernel" and conv.weight[0, 0].numel() > 1:
            w = conv.weight.detach()
            if w.shape[-2] < w.shape[-1]:
                raise ValueError(f"{name}: wide kernels are not handled by this benchmark")
            conv.weight = geoopt.ManifoldParameter(st.projx(w), manifold=st)
        else:
            m = MatrixConv2d(conv, tall=True)
            m.weight = geoopt.ManifoldParameter(st.projx(m.weight.detach()), manifold=st)
            _swap(model, name, m)
    return model


# -- building and timing ----------------------------------------------------------------------
def build(variant: str, args) -> tuple[nn.Module, torch.optim.Optimizer]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(num_classes=args.num_classes)
    if variant == "pomfx":
        import pomfx

        model = pomfx.convert(model, scheme="pio", manifolds="sp+ob+st")
    elif variant == "geotorch":
        model = with_geotorch(model, args.peer_shape)
    elif variant == "geoopt":
        model = with_geoopt(model, args.peer_shape)
    model = model.to(args.device).train()
    if variant == "pomfx":
        opt = pomfx.FGSGD(model.parameters(), lr=args.lr, momentum=MOMENTUM)
    elif variant == "geoopt":
        import geoopt

        opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=args.lr, momentum=MOMENTUM)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM)
    return model, opt


def batch(args, g: torch.Generator | None = None):
    """A random batch (images, labels); from ``g``, else the fixed one (seed 1)."""
    g = g or torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    return x.to(args.device), y.to(args.device)


def refill(x: torch.Tensor, y: torch.Tensor, args, g: torch.Generator) -> None:
    """``--fresh``: the next random batch, into the tensors the steps read (CUDA graphs too)."""
    nx, ny = batch(args, g)
    x.copy_(nx)
    y.copy_(ny)


def make_step(model, opt, x, y, graph: bool = False, clock=time.perf_counter, device: str = "cpu"):
    """A training step of ``model``: eager, or (``graph``, CUDA) the whole step captured once in
    a CUDA graph and replayed (torch's whole-network capture: warm-up on a side stream, then
    capture; the inputs, learning rate and hyperparameters stay fixed). ``step.opt_time()``: the
    last eager step's optimizer step alone, in s (CUDA: between two events, no sync added)."""
    loss_fn = nn.CrossEntropyLoss()
    cuda = device.startswith("cuda")
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else [0.0, 0.0]

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if cuda:
            marks[0].record()
        else:
            marks[0] = clock()
        opt.step()
        if cuda:
            marks[1].record()
        else:
            marks[1] = clock()

    def opt_time() -> float:  # CUDA: read after the step is synchronized
        return marks[0].elapsed_time(marks[1]) / 1e3 if cuda else marks[1] - marks[0]

    step.opt_time = opt_time

    if not graph:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss_fn(model(x), y).backward()
        opt.step()
    return g.replay


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(args) -> tuple[dict, dict, dict, dict]:
    """Per variant, lists over its timed steps: the step's time (s), on CPU its minor page faults
    (fresh pages the allocator had given back: each costs microseconds), its round, and the time
    of its optimizer step alone (s; NaN for CUDA graphs)."""
    x, y = batch(args)
    steps = {}
    for v in args.variants:
        t0 = time.perf_counter()
        model, opt = build(v, args)
        print(f"  built {v} in {time.perf_counter() - t0:.2f} s", flush=True)
        steps[v] = make_step(model, opt, x, y, args.graph, args.clock, args.device)
    fresh = torch.Generator().manual_seed(2) if args.fresh else None
    for w in range(args.warmup):
        if fresh is not None:
            refill(x, y, args, fresh)
        for v in args.variants:
            if w == 0 or v not in args.slow:  # the peers take seconds a step: one warm-up
                steps[v]()
    sync(args.device)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    faults: dict[str, list[int]] = {v: [] for v in args.variants}
    rounds: dict[str, list[int]] = {v: [] for v in args.variants}
    opt_times: dict[str, list[float]] = {v: [] for v in args.variants}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        if fresh is not None:  # every variant steps on the round's batch
            refill(x, y, args, fresh)
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for v in order:
            if r >= args.min_rounds and v in args.slow and times[v]:
                continue
            sync(args.device)
            f0, t0 = _minor_faults(), args.clock()
            steps[v]()
            sync(args.device)
            times[v].append(args.clock() - t0)
            opt_times[v].append(steps[v].opt_time() if hasattr(steps[v], "opt_time") else float("nan"))
            faults[v].append(_minor_faults() - f0)
            rounds[v].append(r)
        if time.perf_counter() - t_start > args.budget and r + 1 >= args.min_rounds:
            break
    return times, faults, rounds, opt_times


def paired_ratio(times: dict, rounds: dict, a: str, b: str) -> tuple[float, int]:
    """The median over the rounds that timed both of ``a``'s step time over ``b``'s, and how many
    rounds: neighbours in time, so a host that drifts through the run moves both alike."""
    tb = dict(zip(rounds[b], times[b]))
    ratios = [t / tb[r] for r, t in zip(rounds[a], times[a]) if r in tb]
    return (statistics.median(ratios) if ratios else float("nan")), len(ratios)


def peak_memory(variant: str, args) -> float:
    """Peak memory of training ``variant`` (MB), measured in a fresh child process."""
    cmd = [sys.executable, __file__, "--memory-of", variant, *args.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.budget * 4 + 600)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB. (``ru_maxrss`` would not do: on Linux
    a child started by exec inherits the high-water mark of the process that forked it.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(variant: str, args) -> None:
    """Peak memory over two training steps, the model and optimizer state included; what
    building (converting) the model took before is not counted."""
    x, y = batch(args)
    if args.device.startswith("cuda"):
        step = make_step(*build(variant, args), x, y, args.graph)
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import pomfx  # noqa: F401  (every variant's libraries loaded before the baseline)

        for lib in ("geotorch", "geoopt"):
            try:
                __import__(lib)
            except ImportError:
                pass
        base = _status_mb("VmRSS")  # the process after imports, before any model
        step = make_step(*build(variant, args), x, y)
        try:  # give what building freed back to the OS (glibc), then reset the high-water mark
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        for _ in range(2):
            step()
        peak = _status_mb("VmHWM") - base
    print(json.dumps({"variant": variant, "peak_mb": peak}))


def convert_time(args, repeats: int = 5) -> float:
    import torchvision

    import pomfx

    model = torchvision.models.resnet50()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pomfx.convert(model, scheme="pio")
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default=None, help="torchvision model (cpu: resnet18, cuda: resnet50)")
    ap.add_argument("--batch", type=int, default=None, help="cpu: 16, cuda: 64")
    ap.add_argument("--size", type=int, default=None, help="image size (cpu: 64, cuda: 224)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--lr", type=float, default=LR, help=f"every variant's learning rate (default {LR})")
    ap.add_argument(
        "--fresh", action="store_true", help="a new random batch each round (default: one batch throughout)"
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the thread's CPU time (with --threads 1), robust to other processes on a shared machine",
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--peer-shape", choices=("kernel", "matrix"), default="kernel")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of timed rounds at most")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--graph", action="store_true", help="CUDA: each variant's whole step as one CUDA graph")
    ap.add_argument("--convert", action="store_true", help="also time pomfx.convert(resnet50)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.batch = args.batch or (64 if cuda else 16)
    args.size = args.size or (224 if cuda else 64)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; valid: {', '.join(VARIANTS)}")
    if args.graph and not cuda:
        ap.error("--graph captures CUDA graphs: use it with --device cuda")
    if args.clock == "cpu" and (args.threads != 1 or cuda):
        ap.error("--clock cpu measures one thread's CPU time: use it with --threads 1 on CPU")
    args.clock_name = args.clock
    args.clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    args.slow = {"geotorch", "geoopt"}  # after min_rounds, peers are timed no more
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.passthrough = [
        f"--device={args.device}", f"--arch={args.arch}", f"--batch={args.batch}", f"--size={args.size}",
        f"--num-classes={args.num_classes}", f"--lr={args.lr}", f"--threads={args.threads}",
        f"--peer-shape={args.peer_shape}",
        *(["--graph"] if args.graph else []),
    ]  # fmt: skip
    if args.memory_of:
        memory_child(args.memory_of, args)
        return {}

    where = machine(args.device)
    print(f"step_ratio: {args.arch}, batch {args.batch}{' (fresh)' if args.fresh else ''}, "
          f"{args.size}×{args.size}, lr {args.lr}, {args.device} ({where}), torch {torch.__version__}, "
          f"{args.clock_name} clock"
          f"{', CUDA graphs' if args.graph else ''}",
          flush=True)  # fmt: skip
    times, faults, rounds, opt_times = time_steps(args)
    med = {v: statistics.median(t) for v, t in times.items()}
    flt = {v: statistics.median(f) for v, f in faults.items()}
    mem = {} if args.no_memory else {v: peak_memory(v, args) for v in args.variants}
    base = med.get("plain")
    rows = []
    print(f"\n{'variant':<10} {'median ms':>10} {'ratio':>7} {'opt ms':>8} "
          f"{'steps':>6} {'peak MB':>9} {'faults':>8}")  # fmt: skip
    for v in args.variants:
        ratio = med[v] / base if base else float("nan")
        opt_ms = statistics.median(opt_times[v]) * 1e3
        row = {"variant": v, "median_ms": med[v] * 1e3, "ratio": ratio, "optimizer_ms": opt_ms}
        rows.append(row | {"steps": len(times[v]), "peak_mb": mem.get(v), "minor_faults_per_step": flt[v]})
        pm = f"{mem[v]:9.0f}" if v in mem else f"{'-':>9}"
        print(f"{v:<10} {med[v] * 1e3:10.1f} {ratio:7.2f} {opt_ms:8.1f} "
              f"{len(times[v]):6d} {pm} {flt[v]:8.0f}")  # fmt: skip
    if "pomfx" in med and base:
        paired, n = paired_ratio(times, rounds, "pomfx", "plain")
        rows[args.variants.index("pomfx")]["ratio_paired"] = paired
        print(f"pomfx over plain, round by round: {paired:.2f} (median of {n})")
    if "pomfx" in med:
        for peer in ("geotorch", "geoopt"):
            if peer in med:
                paired, n = paired_ratio(times, rounds, peer, "pomfx")
                row = rows[args.variants.index(peer)]
                row["pomfx_faster"], row["pomfx_faster_paired"] = med[peer] / med["pomfx"], paired
                print(f"pomfx is {med[peer] / med['pomfx']:.1f}× faster per step than {peer} "
                      f"(round by round: {paired:.1f}×, median of {n})")  # fmt: skip
        if "geoopt" in med:  # (geotorch's optimizer is torch's SGD: its cost is in the forward)
            a, b = (rows[args.variants.index(v)]["optimizer_ms"] for v in ("geoopt", "pomfx"))
            alone = f"FGSGD {b:.1f} ms, geoopt's RiemannianSGD {a:.1f} ms ({a / b:.0f}×)"
            print(f"the optimizer step alone: {alone}")
    result = {"machine": where, "device": args.device, "clock": args.clock_name, "graph": args.graph,
              "arch": args.arch, "batch": args.batch, "size": args.size, "lr": args.lr, "fresh": args.fresh,
              "torch": torch.__version__, "rows": rows}  # fmt: skip
    if args.convert:
        result["convert_resnet50_s"] = convert_time(args)
        print(f"pomfx.convert(resnet50): {result['convert_resnet50_s']:.3f} s (median of 5)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
