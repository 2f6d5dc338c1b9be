"""The torchvision zoo under pomfx: every classification, segmentation, video and detection model.

Each model is built with ``weights=None``, converted (default options), run forward and backward
on a small input in training mode, stepped once by FGSGD, and its constraints are checked
(``max(constraint_error) <= 1e-5``). Detection models cannot be traced whole by torch.fx: they go
through per-submodule tracing and the module walk, and are run in training mode (their loss) on
two 64×64 images (``min_size=max_size=64``; the SSDs resize to 300/320) with one target box each.

    python tests/zoo_report.py                      # the whole zoo, one subprocess per model
    python tests/zoo_report.py resnet18 s3d         # some models
    python tests/zoo_report.py --family video       # one family
    python tests/zoo_report.py --json out/zoo.json  # also write the rows as JSON
    python tests/zoo_report.py --jobs 8             # 8 models at once, one thread each

Each model runs in its own subprocess (memory cap ``--mem-gb``, time cap ``--timeout``), so one
failure or one out-of-memory cannot stop the report. ``tests/test_zoo.py`` runs the same
:func:`check_model` under pytest (fast subset by default, the whole zoo with ``-m zoo``).

Input sizes: the smallest that each architecture accepts, batch 2 (BatchNorm in training mode
needs more than one value per channel): 64×64 by default; ``inception_v3`` 299 (its auxiliary
classifier needs it); ``maxvit_t`` 224 (fixed partition grid); the ViTs are built with
``image_size=64`` (56 for ``vit_h_14``): a constructor argument of torchvision's ViT that only
shortens the position embedding; ``s3d`` and the MViTs take 16 frames of 224×224 (fixed
pooling / position sizes), the other video models 4 frames of 32×32 (swin3d: 64×64).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

FAMILIES = ("classification", "segmentation", "video", "detection")

# name -> (constructor kwargs, input shape); classification default (2, 3, 64, 64)
SPECIAL = {
    "inception_v3": ({"aux_logits": True, "init_weights": False}, (2, 3, 299, 299)),
    "googlenet": ({"aux_logits": True, "init_weights": False}, (2, 3, 64, 64)),
    "maxvit_t": ({}, (2, 3, 224, 224)),
    "vit_b_16": ({"image_size": 64}, (2, 3, 64, 64)),
    "vit_b_32": ({"image_size": 64}, (2, 3, 64, 64)),
    "vit_l_16": ({"image_size": 64}, (2, 3, 64, 64)),
    "vit_l_32": ({"image_size": 64}, (2, 3, 64, 64)),
    "vit_h_14": ({"image_size": 56}, (2, 3, 56, 56)),
    "s3d": ({}, (1, 3, 16, 224, 224)),
    "mvit_v1_b": ({}, (1, 3, 16, 224, 224)),
    "mvit_v2_s": ({}, (1, 3, 16, 224, 224)),
    "swin3d_t": ({}, (2, 3, 4, 64, 64)),
    "swin3d_s": ({}, (2, 3, 4, 64, 64)),
    "swin3d_b": ({}, (2, 3, 4, 64, 64)),
}
DEFAULT_SHAPE = {
    "classification": (2, 3, 64, 64),
    "segmentation": (2, 3, 64, 64),
    "video": (2, 3, 4, 32, 32),
    "detection": (2, 3, 64, 64),  # two images: BatchNorm in training mode meets 1×1 maps
}
TOLERANCE = 1e-5
# address-space cap per model (RLIMIT_AS): virtual memory, of which torch, torchvision and numba
# take 3.7 GB at import; 20 GB leaves the largest models (645 M weights) their ~15 GB of memory
MEM_GB = 20.0


def models(family: str) -> list[str]:
    import torchvision.models as M

    module = {"classification": M, "segmentation": M.segmentation, "video": M.video, "detection": M.detection}
    return M.list_models(module=module[family])


def family_of(name: str) -> str:
    for f in FAMILIES:
        if name in models(f):
            return f
    raise ValueError(f"{name!r} is not a torchvision classification/segmentation/video/detection model")


def build(name: str, family: str):
    import torchvision.models as M

    kwargs, shape = SPECIAL.get(name, ({}, DEFAULT_SHAPE[family]))
    kwargs = dict(kwargs)
    if family in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if family == "detection":
        kwargs.update(min_size=64, max_size=64)
        if name.startswith("ssd"):
            kwargs = {"weights_backbone": None}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = M.get_model(name, weights=None, **kwargs)
    return model, shape


def _loss(out):
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    if isinstance(out, dict):
        return sum(_loss(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return sum(_loss(v) for v in out if v is not None)
    raise TypeError(f"cannot make a loss of {type(out).__name__}")


def _detection_batch(name: str, shape):
    images = [torch.rand(shape[1:]) for _ in range(shape[0])]
    h, w = shape[2:]
    target = {
        "boxes": torch.tensor([[4.0, 6.0, w * 0.6, h * 0.7]]),
        "labels": torch.tensor([1]),
    }
    if "mask" in name:
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[:, 6 : int(h * 0.7), 4 : int(w * 0.6)] = 1
        target["masks"] = masks
    if "keypoint" in name:
        kp = torch.stack([torch.linspace(5, w * 0.5, 17), torch.linspace(7, h * 0.6, 17), torch.ones(17)], -1)
        target["keypoints"] = kp[None]
    return images, [target] * len(images)


def check_model(name: str, family: str | None = None, step: bool = True) -> dict:
    """Convert one model and run it; returns a report row (raises on the first failure)."""
    import pomfx

    family = family or family_of(name)
    t0 = time.perf_counter()
    model, shape = build(name, family)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = pomfx.plan(model)
        t1 = time.perf_counter()
        model = pomfx.convert(model, inplace=True)
    t2 = time.perf_counter()
    torch.manual_seed(1)
    if family == "detection":
        images, targets = _detection_batch(name, shape)
        out = model(images, targets)
    else:
        out = model(torch.randn(shape))
    loss = _loss(out)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    loss.backward()
    missing = [n for n, q in model.named_parameters() if q.requires_grad and q.grad is None]
    if step:
        opt = pomfx.FGSGD(model.parameters(), lr=0.01, momentum=0.9)
        opt.step()
    t3 = time.perf_counter()
    errors = pomfx.constraint_error(model)
    err = max(errors.values(), default=0.0)
    if not err <= TOLERANCE:
        worst = max(errors, key=errors.get)
        raise AssertionError(f"constraint_error {err:.2e} > {TOLERANCE:g} (layer {worst!r})")
    traces = {}
    for r in p.converted:
        traces[r.trace] = traces.get(r.trace, 0) + 1
    return {
        "model": name,
        "family": family,
        "status": "ok",
        "path": p.method,
        "traces": traces,
        "fx_failures": len(p.failures),
        "layers": len(p.rows),
        "converted": len(p.converted),
        "skipped": {r.name: r.reason for r in p.skipped},
        "params": sum(q.numel() for q in model.parameters()),
        "constraint_error": err,
        "no_grad": len(missing),
        "input": list(shape),
        "plan_s": round(t1 - t0, 2),
        "convert_s": round(t2 - t1, 2),
        "run_s": round(t3 - t2, 2),
        "reason": "",
    }


def _child(name: str, family: str, mem_gb: float) -> None:
    if mem_gb > 0:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_flush_denormal(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    try:
        row = check_model(name, family)
    except MemoryError:
        row = {
            "model": name,
            "family": family,
            "status": "FAIL",
            "reason": f"out of memory (cap {mem_gb:g} GB)",
        }
    except Exception as e:  # noqa: BLE001 - the report lists every failure with its reason
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "can't allocate memory" in msg or "DefaultCPUAllocator" in msg:
            msg = f"out of memory (cap {mem_gb:g} GB): {msg}"
        row = {
            "model": name,
            "family": family,
            "status": "FAIL",
            "reason": f"{type(e).__name__}: {msg}"[:300],
        }
    print("ZOO-ROW " + json.dumps(row), flush=True)


def run_isolated(name: str, family: str, mem_gb: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--family", family, "--mem-gb", str(mem_gb)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "family": family, "status": "FAIL", "reason": f"timeout after {timeout:g} s"}
    for line in r.stdout.splitlines():
        if line.startswith("ZOO-ROW "):
            row = json.loads(line[8:])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            return row
    tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    if r.returncode in (-9, 137):
        tail = "killed: out of memory"
    return {"model": name, "family": family, "status": "FAIL", "reason": tail[:300]}


def table(rows: list[dict]) -> str:
    head = (
        "family",
        "model",
        "status",
        "path",
        "layers",
        "converted",
        "params",
        "max err",
        "seconds",
        "reason",
    )
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append(
            (
                r["family"],
                r["model"],
                r["status"],
                r.get("path", "-"),
                str(r.get("layers", "-")),
                str(r.get("converted", "-")),
                f"{r['params'] / 1e6:.1f}M" if ok else "-",
                f"{r['constraint_error']:.1e}" if ok else "-",
                str(
                    r.get("wall_s", round(r.get("plan_s", 0) + r.get("convert_s", 0) + r.get("run_s", 0), 1))
                ),
                r.get("reason", ""),
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    lines += [fmt.format(*b).rstrip() for b in body]
    lines.append("")
    for fam in FAMILIES:
        fr = [r for r in rows if r["family"] == fam]
        if not fr:
            continue
        ok = [r for r in fr if r["status"] == "ok"]
        paths = {}
        for r in ok:
            paths[r["path"]] = paths.get(r["path"], 0) + 1
        by = ", ".join(f"{v} by {k}" for k, v in sorted(paths.items(), key=lambda kv: -kv[1]))
        lines.append(f"{fam}: {len(ok)} of {len(fr)} convert, run and keep their constraints ({by})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    ap.add_argument("--family", choices=FAMILIES, action="append", help="only these families")
    ap.add_argument("--json", help="write the rows to this file too")
    ap.add_argument("--mem-gb", type=float, default=MEM_GB, help="address-space cap per model (0: none)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per model")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    ap.add_argument("--jobs", type=int, default=1, help="models run at once (one thread each when > 1)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child, a.family[0], a.mem_gb)
        return 0
    todo = [(m, family_of(m)) for m in a.models] or [
        (m, f) for f in (a.family or FAMILIES) for m in models(f)
    ]
    rows = []
    if a.resume and a.json and os.path.exists(a.json):
        with open(a.json) as f:
            rows = [r for r in json.load(f) if r["status"] == "ok" or "memory" not in r.get("reason", "")]
        done = {r["model"] for r in rows}
        todo = [(m, f) for m, f in todo if m not in done]
    if a.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futures = [pool.submit(run_isolated, name, family, a.mem_gb, a.timeout) for name, family in todo]
        for (name, family), fut in zip(todo, futures):
            row = fut.result()
            rows.append(row)
            print(
                f"[{len(rows)}] {family} {name}: {row['status']} "
                f"{row.get('path', '')} {row.get('reason', '')} ({row.get('wall_s', '-')} s)",
                file=sys.stderr,
                flush=True,
            )
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(rows, f, indent=1)
    print(table(rows))
    return 0 if all(r["status"] == "ok" or r["family"] == "detection" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
