"""Train any torchvision classifier on an ImageFolder with pomfx: one process or many (torchrun).

    # one process (CPU, or the first GPU)
    python examples/train_imagefolder.py DATA --model resnet18 --epochs 90 --out runs/r18
    # 4 GPUs on one machine (NCCL), or 2 CPU processes (gloo)
    torchrun --nproc_per_node 4 examples/train_imagefolder.py DATA --model resnet50 --out runs/r50
    # after an interruption: the same command with --resume (continues where the checkpoint ends)
    torchrun --nproc_per_node 4 examples/train_imagefolder.py DATA --model resnet50 --out runs/r50 --resume

``DATA`` is an ImageFolder root (one sub-directory per class), or a directory holding ``train/``
and, optionally, ``val/`` in that layout. The model is built by ``torchvision.models.get_model(
NAME, weights=None, num_classes=<classes found>)``, converted with ``pomfx.convert`` (the same
layout on every rank: it is seeded by ``--seed`` and the layer names), wrapped in
``DistributedDataParallel`` under torchrun, and trained with ``pomfx.FGSGD`` and a cosine
schedule; ``pomfx.update_scales`` runs after every epoch (it averages λ over the ranks).

Every epoch, rank 0 writes ``OUT/checkpoint.pt`` atomically (a temporary file, then
``os.replace``: an interruption never leaves a half-written checkpoint): model, optimizer,
scheduler and GradScaler states, the epoch, the arguments and every rank's RNG states, so a
resumed run continues as the uninterrupted one would have (bit for bit on CPU; on GPUs, with
``--deterministic``, as far as torch has deterministic CUDA kernels: it warns about the others,
e.g. the backward of AdaptiveAvgPool2d). At the end rank 0 exports ``OUT/model.onnx`` with
``pomfx.export_onnx`` (folded plain weights, checked with onnxruntime) and writes
``OUT/summary.json``.

``--amp bf16`` (CPU or CUDA) or ``--amp fp16`` (CUDA, with a GradScaler) trains under autocast:
ω stays in fp32, the retractions too. ``--compile`` compiles the model with ``torch.compile``
(FGSGD's step runs eagerly). FSDP is not offered: pomfx refuses sharded weights (see
docs/scaling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

import pomfx

CHECKPOINT = "checkpoint.pt"
# arguments that must match between a checkpoint and the run that resumes it
SAME_ON_RESUME = ("model", "scheme", "manifolds", "group_size", "seed", "renorm", "image_size", "schedule")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="ImageFolder root, or a directory with train/ (and val/)")
    ap.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    ap.add_argument("--out", type=Path, default=Path("runs/imagefolder"), help="checkpoints, ONNX, summary")
    ap.add_argument("--epochs", type=int, default=90)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument(
        "--schedule", choices=("cosine", "constant"), default="cosine", help="lr schedule over --epochs"
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop/flip")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    ap.add_argument("--scheme", default="pio", choices=("pi", "po", "pio"))
    ap.add_argument("--manifolds", default="sp+ob+st")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--no-renorm", dest="renorm", action="store_false", help="R = 1 (no stage ii)")
    ap.add_argument("--seed", type=int, default=0, help="weights, layout and data order")
    ap.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                    help="continue from CHECKPOINT (default: OUT/checkpoint.pt, if it exists)")  # fmt: skip
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (GPUs)")
    ap.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--no-export", dest="export", action="store_false", help="skip the ONNX export")
    return ap.parse_args(argv)


# -- processes ------------------------------------------------------------------------------------
def setup(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device(args.device if args.device != "auto" else "cpu")
    if world > 1 and not dist.is_initialized():
        one_gpu_each = device.type == "cuda" and torch.cuda.device_count() >= world
        dist.init_process_group("nccl" if one_gpu_each else "gloo")
    if args.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns about the few ops without one
        torch.backends.cudnn.benchmark = False
    return rank, world, device


def log(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


# -- data -----------------------------------------------------------------------------------------
def datasets(args):
    root = args.data
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if (root / "val").is_dir() and train_dir != root else None
    norm = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    size = args.image_size
    plain = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    train_tf = plain
    if args.augment:
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        )
    train = torchvision.datasets.ImageFolder(train_dir, transform=train_tf)
    val = torchvision.datasets.ImageFolder(val_dir, transform=plain) if val_dir else None
    if val is not None and val.classes != train.classes:
        raise SystemExit(f"train/ and val/ have different classes: {train.classes} vs {val.classes}")
    return train, val


def loader(ds, args, rank, world, shuffle: bool) -> DataLoader:
    # DistributedSampler even in one process: the data order is a function of (seed, epoch) only,
    # so a resumed run sees the batches the uninterrupted run would have seen
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=args.seed)
    return DataLoader(
        ds,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        drop_last=False,
    )


# -- checkpoints ------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write beside the target, then rename over it (os.replace is atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def gather_rng(world: int) -> list[dict]:
    """Every rank's RNG states, on every rank (rank 0 saves them)."""
    mine = rng_state()
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


# -- training ----------------------------------------------------------------------------------------
def build_model(args, num_classes: int) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP would sync them anyway)
    try:
        model = torchvision.models.get_model(args.model, weights=None, num_classes=num_classes)
    except ValueError as e:
        names = ", ".join(torchvision.models.list_models(module=torchvision.models))
        raise SystemExit(f"unknown --model {args.model!r}: {e}\nclassification models: {names}") from None
    return pomfx.convert(
        model,
        scheme=args.scheme,
        manifolds=args.manifolds,
        group_size=args.group_size,
        seed=args.seed,
        renorm=args.renorm,
        example_inputs=(torch.zeros(1, 3, args.image_size, args.image_size),),
    )


def autocast(args, device):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def train_epoch(model, opt, scaler, data, args, device) -> tuple[float, int]:
    model.train()
    total, count = torch.zeros((), device=device), 0
    for x, y in data:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(args, device):
            loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        total += loss.detach().float() * x.shape[0]
        count += x.shape[0]
    return float(total) / max(count, 1), count


@torch.no_grad()
def evaluate(model, data, args, device, world) -> float:
    model.eval()
    hits = torch.zeros(2, device=device, dtype=torch.float64)
    for x, y in data:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(args, device):
            pred = model(x).argmax(1)
        hits += torch.stack([(pred == y).sum(), torch.tensor(y.numel(), device=device)]).double()
    if world > 1:
        dist.all_reduce(hits)  # (DistributedSampler pads the last shard: a few samples count twice)
    return float(hits[0] / hits[1].clamp_min(1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup(args)
    try:
        return run(args, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device) -> dict:
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / CHECKPOINT
    train_ds, val_ds = datasets(args)
    classes = train_ds.classes
    log(
        rank, f"{len(train_ds)} training images, {len(classes)} classes; {world} process(es) on {device.type}"
    )

    model = build_model(args, len(classes))
    n_converted = len(pomfx.constraint_error(model))
    log(rank, f"{args.model}: pomfx converted {n_converted} layers ({args.scheme}, {args.manifolds})")
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    net = torch.compile(model) if args.compile else model  # compile inside DDP: no graph break
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    opt = pomfx.FGSGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        nesterov=args.nesterov,
    )
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    scaler = None
    if args.amp == "fp16":
        if device.type != "cuda":
            raise SystemExit("--amp fp16 needs a GPU (GradScaler); use --amp bf16 on CPU")
        scaler = torch.amp.GradScaler("cuda")

    start, history = 0, []
    resume = args.resume
    if resume == "auto":
        resume = ckpt_path if ckpt_path.is_file() else None
        if resume is None:
            log(rank, f"--resume: no {ckpt_path} yet, starting from scratch")
    if resume is not None:
        state = torch.load(resume, map_location=device, weights_only=True)
        saved = state["args"]
        diff = {
            k: (saved.get(k), getattr(args, k)) for k in SAME_ON_RESUME if saved.get(k) != getattr(args, k)
        }
        if diff:
            raise SystemExit(f"--resume: {resume} was made with other settings (checkpoint, now): {diff}")
        model.load_state_dict(state["model"])  # layouts are checked: a different conversion raises
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if args.schedule == "cosine" and sched.T_max != args.epochs:  # resumed to train longer (or shorter)
            log(rank, f"--resume: cosine schedule stretched from {sched.T_max} to {args.epochs} epochs")
            sched.T_max = args.epochs
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, history = state["epoch"], state["history"]
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            log(rank, f"--resume: checkpoint made by {len(rngs)} process(es), now {world}: data order kept")
        log(rank, f"resumed from {resume} at epoch {start}")
    elif rank == 0 and ckpt_path.exists():
        print(f"note: {ckpt_path} exists and will be overwritten (pass --resume to continue it)", flush=True)

    train_dl = loader(train_ds, args, rank, world, shuffle=True)
    val_dl = loader(val_ds, args, rank, world, shuffle=False) if val_ds is not None else None
    for epoch in range(start, args.epochs):
        t0 = time.perf_counter()
        train_dl.sampler.set_epoch(epoch)
        loss, seen = train_epoch(net, opt, scaler, train_dl, args, device)
        if world > 1:
            t = torch.tensor([loss * seen, seen], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            loss = float(t[0] / t[1])
        sched.step()
        pomfx.update_scales(model)  # commits λ into R; all-reduced across ranks
        acc = evaluate(net, val_dl, args, device, world) if val_dl is not None else None
        err = max(pomfx.constraint_error(model).values(), default=0.0)
        history.append({"epoch": epoch + 1, "loss": loss, "val_acc": acc, "constraint_error": err})
        acc_s = f", val acc {acc:.4f}" if acc is not None else ""
        log(rank, f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}{acc_s}, constraint error {err:.1e}, "
                  f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        if not math.isfinite(loss):
            raise SystemExit(f"epoch {epoch + 1}: the loss is {loss}; lower --lr")
        rngs = gather_rng(world)
        if rank == 0:
            save_checkpoint(
                ckpt_path,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "classes": classes,
                    "history": history,
                    "rng": rngs,
                },
            )

    summary = {"epochs": args.epochs, "history": history, "checkpoint": str(ckpt_path), "classes": classes}
    if rank == 0 and args.export:
        model.eval()
        example = torch.randn(2, 3, args.image_size, args.image_size, device=device)
        report = pomfx.export_onnx(model, args.out / "model.onnx", (example,))
        log(rank, f"exported: {report}")
        summary["onnx"] = str(args.out / "model.onnx")
        summary["onnx_max_rel_error"] = report.max_rel_error
    if rank == 0:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
