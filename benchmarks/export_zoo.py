"""The torchvision classification zoo through pomfx's way out: convert, fold, export, verify.

For every model: convert it (default options), export the converted model with
``pomfx.export_onnx`` (fold + export + onnxruntime check) and the same architecture unconverted,
then compare the two graphs (operator counts) and time both files side by side in onnxruntime
(CPU provider, batch 1, runs interleaved; the ratio converted / plain is the median of the
ratios of neighbouring runs).

    python benchmarks/export_zoo.py                       # the whole zoo (one process per model)
    python benchmarks/export_zoo.py --models resnet18,mobilenet_v3_small
    python benchmarks/export_zoo.py --max-params 300      # skip models above 300 M parameters
    python benchmarks/export_zoo.py --jobs 7              # 7 models at once (2 threads each)

rel error: per output, max|onnxruntime - torch| / max|torch| (see pomfx.export). Each model runs
in its own process (memory is returned between models; a crash costs one row).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

SIZES = {"inception_v3": 299}  # input side; 224 for every other model


def one(name: str, folder: Path, repeats: int, threads: int) -> dict:
    import onnxruntime as ort
    import torch
    import torchvision

    import pomfx

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    row: dict = {"model": name}
    t0 = time.perf_counter()
    plain = torchvision.models.get_model(name, weights=None).eval()
    for m in plain.modules():  # ViT's zero-initialised head would make the check compare zeros
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.01)
    row["params_M"] = sum(p.numel() for p in plain.parameters()) / 1e6
    try:
        converted = pomfx.convert(plain).eval()
    except Exception as e:  # noqa: BLE001
        return {**row, "note": f"does not convert: {type(e).__name__}: {e}"}
    row["layers"] = len(pomfx.constraint_error(converted))
    if not row["layers"]:
        return {**row, "note": "nothing to convert"}
    side = SIZES.get(name, 224)
    x = torch.randn(1, 3, side, side)
    t = time.perf_counter()
    conv = pomfx.export_onnx(converted, folder / f"{name}.onnx", x)
    row["export_s"] = time.perf_counter() - t
    del converted
    ref = pomfx.export_onnx(plain, folder / f"{name}_plain.onnx", x)
    row.update(
        exporter=conv.exporter,
        rel_error=conv.max_rel_error,
        plain_rel_error=ref.max_rel_error,
        nodes=conv.nodes,
        plain_nodes=ref.nodes,
        same_ops=conv.op_counts == ref.op_counts,
        external_data=conv.external_data is not None,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = [
        ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in (conv.path, ref.path)
    ]
    feeds = [{s.get_inputs()[0].name: x.numpy()} for s in sessions]
    for s, f in zip(sessions, feeds):  # warm-up
        for _ in range(2):
            s.run(None, f)
    times: list[list[float]] = [[], []]
    deadline = time.perf_counter() + 20.0
    for r in range(repeats):
        for i in (0, 1) if r % 2 == 0 else (1, 0):  # interleaved, alternating order
            t = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - t)
        if r >= 4 and time.perf_counter() > deadline:
            break
    row["latency_ms"] = statistics.median(times[0]) * 1e3
    row["plain_latency_ms"] = statistics.median(times[1]) * 1e3
    # the median of the ratios of neighbouring runs: robust to a machine whose load drifts
    row["latency_ratio"] = statistics.median(a / b for a, b in zip(*times))
    row["total_s"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    head = (
        "model",
        "params M",
        "export path",
        "rel error",
        "nodes",
        "= plain",
        "ort ms",
        "latency ratio",
        "s",
    )
    body = []
    for r in rows:
        if "note" in r:
            body.append(
                (r["model"], f"{r.get('params_M', 0):.1f}", "-", "-", "-", "-", "-", "-", r["note"][:90])
            )
            continue
        body.append(
            (
                r["model"],
                f"{r['params_M']:.1f}",
                r["exporter"] + (" +data" if r.get("external_data") else ""),
                f"{r['rel_error']:.1e}",
                f"{r['nodes']}/{r['plain_nodes']}",
                "yes" if r["same_ops"] else "NO",
                f"{r['latency_ms']:.1f}",
                f"{r['latency_ratio']:.3f}",
                f"{r['total_s']:.0f}",
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    return "\n".join([*lines, *(fmt.format(*b) for b in body)])


def summary(rows: list[dict], seconds: float) -> str:
    done = [r for r in rows if "note" not in r]
    if not done:
        return f"{len(rows)} models, none exported ({seconds:.0f} s)"
    worst = max(r["rel_error"] for r in done)
    ratios = [r["latency_ratio"] for r in done]
    return (
        f"{len(done)} of {len(rows)} models exported and verified in {seconds:.0f} s; "
        f"max rel error {worst:.1e}; graphs equal to the plain export: "
        f"{sum(r['same_ops'] for r in done)}/{len(done)}; latency ratio median "
        f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="all", help="comma-separated names, or 'all' (the classification zoo)")
    p.add_argument("--max-params", type=float, default=None, help="skip models above this many M parameters")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per file (at most ~20 s per model)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per model")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--jobs", type=int, default=1, help="models run at once (each with --threads threads)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print its row
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(one(args.one, Path(args.dir), args.repeats, args.threads)), flush=True)
        return 0
    zoo = torchvision.models.list_models(module=torchvision.models)
    names = zoo if args.models == "all" else args.models.split(",")
    if unknown := sorted(set(names) - set(zoo)):
        p.error(f"not torchvision classification models: {', '.join(unknown)}")
    rows, start = [], time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    def run(name: str) -> dict:
        if args.max_params is not None:
            n = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters()) / 1e6
            if n > args.max_params:
                note = f"skipped: over --max-params {args.max_params:g}"
                return {"model": name, "params_M": n, "note": note}
        with tempfile.TemporaryDirectory() as folder:
            cmd = [sys.executable, __file__, "--one", name, "--dir", folder]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                return {"model": name, "note": f"timed out after {args.timeout:g} s"}
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"model": name, "note": f"failed (exit {proc.returncode}): {tail}"}
        return json.loads(line[4:])

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run, name): name for name in names}
        for fut in as_completed(futures):
            name, row = futures[fut], fut.result()
            rows.append(row)
            stamp = f"[{time.perf_counter() - start:7.0f} s] {name}: "
            print(stamp + json.dumps(row), file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: names.index(r["model"]))
    print(table(rows))
    print(summary(rows, seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
