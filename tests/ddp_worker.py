"""Worker for tests/test_distributed.py: run it under torchrun, one process per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR [--device ...]

Backend and device are chosen by availability (``--device auto``): NCCL with one GPU per rank
when there are enough GPUs, else gloo on CPU; ``--device cuda`` with fewer GPUs than ranks
puts every rank on ``cuda:0`` with gloo (NCCL refuses two ranks on one GPU). Each rank writes
``OUT_DIR/rank{r}.pt``: a dict of results that the test compares across ranks and against a
single-process run (the helpers here build the same model and batches for that run). The
checks, in one launch to pay the start-up of two processes once:

1. ``layouts``: every rank converts its own model, from a different torch seed, and gets the
   same layout (compared before DDP, whose broadcast of buffers would hide a difference).
2. ``ddp``: DDP + FGSGD for ``STEPS`` steps on shards of a fixed global batch; the parameters,
   then ``running_var`` and R before and after ``pomfx.update_scales`` (which all-reduces λ).
3. ``resume``: a run checkpointed mid-epoch by rank 0 (atomic write), reloaded by every rank
   into a freshly built model and optimizer, against the same run uninterrupted: bitwise.
4. ``compile`` (only when asked): DDP around ``torch.compile(model)``; graph breaks, parameters.
5. ``fsdp``: FSDP2 ``fully_shard`` (and FSDP1, with and without ``use_orig_params``) on a
   converted model, then ``FGSGD``: the error it raises (pomfx refuses sharded constrained
   weights; see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import pomfx

STEPS = 8  # DDP vs single process
EPOCH = 3  # resume run: steps per epoch (update_scales after each)
TOTAL = 12  # resume run: steps in all
CUT = 5  # resume run: checkpoint after this many steps (mid-epoch)
GLOBAL_BATCH = 16
HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


class GlobalAvgPool(nn.Module):
    """``x.mean((2, 3))``: unlike AdaptiveAvgPool2d, its CUDA backward is deterministic."""

    def forward(self, x):
        return x.mean((2, 3))


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from deterministic CUDA kernels (nll_loss has none under
    ``torch.use_deterministic_algorithms``); the same value as ``F.cross_entropy``."""
    return -out.log_softmax(1).gather(1, y[:, None]).mean()


def build_model(init_seed: int = 0) -> nn.Module:
    """A small CNN with every kind of converted layer: 3×3 convs, a 1×1 conv, a hidden Linear.

    GroupNorm, not BatchNorm: DDP gives BatchNorm per-rank statistics, which a single-process run
    on the global batch cannot reproduce (use SyncBatchNorm for that; it needs GPUs).
    """
    torch.manual_seed(init_seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        GlobalAvgPool(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )
    return pomfx.convert(model, scheme="pio", seed=0)


def global_batch(step: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return x.to(device), y.to(device)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def train_steps(model, opt, steps, device, rank=0, world=1, start=0, epoch=None) -> None:
    """``steps`` steps from global step ``start``, each on this rank's shard of the global batch;
    with ``epoch``, ``update_scales`` after every ``epoch``-th global step."""
    for step in range(start, start + steps):
        x, y = global_batch(step, device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(shard(x, rank, world)), shard(y, rank, world)).backward()
        opt.step()
        if epoch and (step + 1) % epoch == 0:
            pomfx.update_scales(model)


def _cpu(sd: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in sd.items()}


def _opt_state(opt) -> dict:
    """The optimizer's per-parameter tensors, by parameter index, on CPU."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{i}.{k}"] = v.detach().cpu().clone()
    return out


def _layouts(model) -> dict:
    from pomfx.renorm import poms

    return {name: (pom.layout.describe(), pom.index.cpu().tolist()) for name, _, _, pom in poms(model)}


def _ddp(model, device):
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def check_ddp(rank, world, device, out):
    from pomfx.renorm import poms

    model = build_model(init_seed=rank).to(device)  # rank 1 starts from other weights: DDP syncs
    out["layouts"] = _layouts(model)
    ddp = _ddp(model, device)
    opt = pomfx.FGSGD(ddp.parameters(), **HP)
    train_steps(ddp, opt, STEPS, device, rank, world)
    out["params"] = _cpu(dict(model.named_parameters()))
    out["running_var_before"] = {n: pom.running_var.cpu().clone() for n, _, _, pom in poms(model)}
    out["scale_before"] = {n: pom.scale.cpu().clone() for n, _, _, pom in poms(model)}
    out["committed"] = pomfx.update_scales(model)
    out["running_var_after"] = {n: pom.running_var.cpu().clone() for n, _, _, pom in poms(model)}
    out["scale_after"] = {n: pom.scale.cpu().clone() for n, _, _, pom in poms(model)}
    out["constraint_error"] = pomfx.constraint_error(model)


def check_compile(rank, world, device, out):
    """DDP around ``torch.compile(model)`` (aot_eager: the capture without code generation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_model().to(device)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(torch.compile(model, backend="aot_eager"), device_ids=ids)
    opt = pomfx.FGSGD(ddp.parameters(), **HP)
    train_steps(ddp, opt, STEPS, device, rank, world)
    out["compile_graph_breaks"] = {k.split("\n")[0]: v for k, v in counters["graph_break"].items()}
    out["compile_params"] = _cpu(dict(model.named_parameters()))


def check_resume(rank, world, device, out, ckpt: Path):
    # the uninterrupted run
    model = build_model().to(device)
    ddp = _ddp(model, device)
    opt = pomfx.FGSGD(ddp.parameters(), **HP)
    train_steps(ddp, opt, TOTAL, device, rank, world, epoch=EPOCH)
    out["straight"] = _cpu(model.state_dict())
    out["straight_opt"] = _opt_state(opt)
    del model, ddp, opt

    # the same run, stopped after CUT steps: rank 0 saves, atomically
    model = build_model().to(device)
    ddp = _ddp(model, device)
    opt = pomfx.FGSGD(ddp.parameters(), **HP)
    train_steps(ddp, opt, CUT, device, rank, world, epoch=EPOCH)
    if rank == 0:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": CUT}, tmp)
        os.replace(tmp, ckpt)
    dist.barrier()
    del model, ddp, opt

    # a fresh process would do this: build (from other weights), load, wrap, continue
    model = build_model(init_seed=100 + rank).to(device)
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    ddp = _ddp(model, device)
    opt = pomfx.FGSGD(ddp.parameters(), **HP)
    opt.load_state_dict(state["optimizer"])
    train_steps(ddp, opt, TOTAL - state["step"], device, rank, world, start=state["step"], epoch=EPOCH)
    out["resumed"] = _cpu(model.state_dict())
    out["resumed_opt"] = _opt_state(opt)


def _try_fgsgd(model, rank, world, device):
    """Build FGSGD on ``model`` and take a step: None, or the error (type name, message)."""
    try:
        opt = pomfx.FGSGD(model.parameters(), **HP)
        x, y = global_batch(0, device)
        nn.functional.cross_entropy(model(shard(x, rank, world)), shard(y, rank, world)).backward()
        opt.step()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return (type(e).__name__, str(e))
    return None


def check_fsdp(rank, world, device, out):
    """Shard a converted model (FSDP2 fully_shard; FSDP1 with and without use_orig_params), build
    FGSGD on it and step: record what happens (pomfx must refuse, docs/scaling.md)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = build_model().to(device)
    fully_shard(model)
    out["fsdp_param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    out["fsdp_error"] = _try_fgsgd(model, rank, world, device)
    for orig in (False, True):
        model = FSDP(build_model().to(device), use_orig_params=orig, device_id=device)
        out[f"fsdp1_error_orig{int(orig)}"] = _try_fgsgd(model, rank, world, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--checks", default="ddp,resume,fsdp")
    ap.add_argument("--hang-timeout", type=float, default=150.0, help="seconds; then dump stacks and exit")
    args = ap.parse_args(argv)

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() >= world:
        backend, device = "nccl", torch.device("cuda", local)
    elif cuda:
        backend, device = "gloo", torch.device("cuda", 0)
    else:
        backend, device = "gloo", torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # bitwise resume on CUDA: no atomics-based reductions, no autotuned conv algorithms
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.set_flush_denormal(True)
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)  # a hang shows where it is
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.hang_timeout))
    out = {"rank": rank, "world": world, "backend": backend, "device": str(device), "errors": {}}
    checks = {"ddp": check_ddp, "resume": check_resume, "fsdp": check_fsdp, "compile": check_compile}
    try:
        for name in args.checks.split(","):
            try:
                if name == "resume":
                    check_resume(rank, world, device, out, args.out_dir / "ckpt.pt")
                else:
                    checks[name](rank, world, device, out)
            except Exception:  # noqa: BLE001 - reported to the test, the other checks still run
                out["errors"][name] = traceback.format_exc()
                print(f"[rank {rank}] check {name} failed:\n{out['errors'][name]}", file=sys.stderr)
            dist.barrier()
    finally:
        torch.save(out, args.out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
