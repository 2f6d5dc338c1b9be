"""``pomfx demo``: the paper's kind of experiment on real handwritten digits, in a few minutes on a CPU.

scikit-learn's bundled ``load_digits`` (1797 8×8 images, no download), split 80/20 by seed; a
small BN CNN (three 3×3 convs, 32-64-64 channels, and a linear classifier) trained from the same
initialisation, with the same hyperparameters (SGD lr 0.05, momentum 0.9, weight decay 5e-4,
batch 32, 12 epochs, cosine schedule), by

- ``plain``: ``torch.optim.SGD`` on the plain model;
- ``pomfx``: ``pomfx.convert(scheme="pio")`` (sp+ob+st, renorm) and ``pomfx.FGSGD``: the default;
- ``renorm_off``: the same with ``renorm=False`` (no stage (ii) of the renormalization: R = 1);
- ``sp`` / ``st``: a single manifold for every group;

over 3 seeds. It prints a table like the paper's (test error, mean ± std over seeds, with the
three Table 2 bounds of the final models from :func:`pomfx.bounds`), the per-layer norms of the
plain and the converted model side by side, writes a PNG (training loss, test error and the
bounds per epoch), exports seed 0's converted model (and the plain one, to compare) to ONNX with
:func:`pomfx.export_onnx` (verified with onnxruntime), and saves every number as JSON. Runs are
spread over worker processes (one torch thread each). ``--quick``: 1 seed, 5 epochs.

Outputs go to ``./out/`` (``--out``); ``--docs DIR`` also writes ``DIR/demo.md`` and ``DIR/demo.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "Config",
    "METHODS",
    "load_digits_split",
    "make_model",
    "evaluate",
    "train",
    "run_one",
    "run_pair",
    "run_demo",
    "format_table",
    "plot",
    "main",
]


@dataclass
class Config:
    epochs: int = 12
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32


#: key -> (label, convert() options; None: plain model with torch.optim.SGD)
METHODS: dict[str, tuple[str, dict | None]] = {
    "plain": ("plain SGD (torch.optim.SGD)", None),
    "pomfx": ("pomfx pio sp+ob+st + FGSGD (default)", {}),
    "renorm_off": ("  ablation: renorm=False (R = 1)", {"renorm": False}),
    "sp": ("  ablation: single manifold sp", {"manifolds": "sp"}),
    "st": ("  ablation: single manifold st", {"manifolds": "st"}),
}
BOUND_KEYS = ("frobenius", "spectral", "pac_bayes")
BOUND_TITLES = {
    "frobenius": "Neyshabur et al. 2015 (Frobenius)",
    "spectral": "Bartlett et al. 2017 (spectral)",
    "pac_bayes": "Neyshabur et al. 2018 (PAC-Bayes)",
}


# -- data, model, training ----------------------------------------------------------------------
def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """Digits as standardized (N, 1, 8, 8) float tensors, split by a seeded permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def make_model() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def evaluate(model: nn.Module, data) -> float:
    """Test error in percent."""
    x, y = data
    was = model.training
    model.eval()
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).sum().item()
    model.train(was)
    return 100.0 * wrong / len(y)


def train(model: nn.Module, optimizer_cls, data, cfg: Config, seed: int, on_epoch=None) -> nn.Module:
    """Train with a cosine schedule; ``pomfx.update_scales`` at the end of each epoch.

    ``on_epoch(epoch, model, mean training loss)`` is called after each epoch (epochs from 1).
    """
    from . import update_scales

    (x, y), _ = data
    opt = optimizer_cls(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        update_scales(model)
        if on_epoch is not None:
            on_epoch(epoch, model, total / len(x))
    return model


def _build(method: str, seed: int) -> tuple[nn.Module, Any]:
    """The seed's initial model (the same for every method), converted as ``method`` says."""
    import pomfx

    torch.manual_seed(seed)
    model = make_model()
    opts = METHODS[method][1]
    if opts is None:
        return model, torch.optim.SGD
    return pomfx.convert(model, **{"scheme": "pio", "seed": seed, **opts}), pomfx.FGSGD


def run_one(
    method: str, seed: int, cfg: Config | None = None, *, export_dir: str | None = None, tick=None
) -> dict:
    """One training run; returns its test error, its per-epoch history and its final bounds.

    History index 0 is the model before training (no loss). With ``export_dir``, the trained
    model is exported to ``export_dir/digits_{method}.onnx`` and checked with onnxruntime.
    ``tick()`` is called after each epoch (progress).
    """
    import pomfx

    from .bounds import bounds

    cfg = cfg or Config()
    t0 = time.perf_counter()
    data = load_digits_split(seed)
    n_train = len(data[0][0])
    model, opt_cls = _build(method, seed)
    hist: dict[str, list] = {"loss": [math.nan], "test_error": [evaluate(model, data[1])]}
    b0 = bounds(model, n_train).log10
    for k in BOUND_KEYS:
        hist[k] = [b0[k]]

    def on_epoch(epoch, m, loss):
        hist["loss"].append(loss)
        hist["test_error"].append(evaluate(m, data[1]))
        b = bounds(m, n_train).log10
        for k in BOUND_KEYS:
            hist[k].append(b[k])
        if tick is not None:
            tick()

    train(model, opt_cls, data, cfg, seed, on_epoch)
    final = bounds(model, n_train)
    residual = pomfx.constraint_error(model)
    out = {
        "method": method,
        "seed": seed,
        "n_train": n_train,
        "n_test": len(data[1][0]),
        "test_error": hist["test_error"][-1],
        "history": hist,
        "bounds_log10": final.log10,
        "standard_log10": final.standard_log10,
        "layers": [
            {
                k: r.to_dict()[k]
                for k in ("name", "type", "shape", "frobenius", "spectral", "two_one", "two_one_grouped")
            }
            for r in final.layers
        ],
        "residual": max(residual.values(), default=0.0),
        "export": None,
    }
    if export_dir is not None:
        try:
            rep = pomfx.export_onnx(model, Path(export_dir) / f"digits_{method}.onnx", (data[1][0][:16],))
            out["export"] = {"ok": True, "text": str(rep), **rep.to_dict()}
        except Exception as e:  # noqa: BLE001 - reported in the demo's output and exit status
            out["export"] = {"ok": False, "text": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.perf_counter() - t0
    return out


def run_pair(seed: int, cfg: Config, data=None, **convert_kwargs) -> tuple[float, float, nn.Module]:
    """(plain SGD test error, pomfx FGSGD test error, trained converted model) for one seed."""
    import copy

    import pomfx

    data = data or load_digits_split(seed)
    torch.manual_seed(seed)
    base = make_model()
    plain = train(copy.deepcopy(base), torch.optim.SGD, data, cfg, seed)
    converted = pomfx.convert(base, **{"scheme": "pio", "seed": seed, **convert_kwargs})
    converted = train(converted, pomfx.FGSGD, data, cfg, seed)
    return evaluate(plain, data[1]), evaluate(converted, data[1]), converted


# -- running many: worker processes -----------------------------------------------------------
_QUEUE = None


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _worker(job: dict) -> dict:
    return run_one(**job, tick=lambda: _QUEUE.put(1))


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def run_demo(
    seeds: int = 3,
    cfg: Config | None = None,
    methods: list[str] | tuple[str, ...] = tuple(METHODS),
    *,
    workers: int | None = None,
    export_dir: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every (method, seed) run, in worker processes when ``workers`` > 1; results in job order."""
    from .cli import Progress

    cfg = cfg or Config()
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    jobs = []
    for seed in range(seeds):
        for m in methods:
            export = export_dir if seed == 0 and m in ("plain", "pomfx") else None
            jobs.append({"method": m, "seed": seed, "cfg": cfg, "export_dir": export})
    workers = min(workers or default_workers(), len(jobs))
    results: list[dict | None] = [None] * len(jobs)
    with Progress(len(jobs) * cfg.epochs, f"training {len(jobs)} runs", enabled=progress) as bar:
        if workers <= 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for i, job in enumerate(jobs):
                    results[i] = run_one(**job, tick=bar.update)
            finally:
                torch.set_num_threads(threads)
        else:
            _run_parallel(jobs, results, workers, bar)
    return results  # type: ignore[return-value]


def _run_parallel(jobs, results, workers, bar) -> None:
    import multiprocessing as mp
    import queue as _queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # no fork of a process that has run torch's thread pools
    q = ctx.Queue()
    # the pomfx runs take ~4x longer than the plain ones: start them first
    order = sorted(range(len(jobs)), key=lambda i: jobs[i]["method"] == "plain")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as ex:
        futures = {ex.submit(_worker, jobs[i]): i for i in order}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in done:
                results[futures[f]] = f.result()
            while True:
                try:
                    bar.update(q.get_nowait())
                except _queue.Empty:
                    break


# -- summary -----------------------------------------------------------------------------------
def _mean_sd(v: list[float]) -> tuple[float, float]:
    v = [x for x in v if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per method: test error mean/std over seeds, mean log10 bounds, max residual."""
    out: dict[str, dict] = {}
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        mean, sd = _mean_sd([r["test_error"] for r in rs])
        out[m] = {
            "label": METHODS[m][0].strip(),
            "seeds": len(rs),
            "test_error_mean": mean,
            "test_error_std": sd,
            "test_errors": [r["test_error"] for r in rs],
            "bounds_log10": {k: _mean_sd([r["bounds_log10"][k] for r in rs])[0] for k in BOUND_KEYS},
            "standard_log10": {k: _mean_sd([r["standard_log10"][k] for r in rs])[0] for k in BOUND_KEYS},
            "residual": max(r["residual"] for r in rs) if m != "plain" else None,
        }
    return out


def verdicts(summary: dict[str, dict]) -> list[str]:
    """Plain statements comparing pomfx's default with plain SGD, and each ablation with the default."""
    lines = []
    p, d = summary.get("plain"), summary.get("pomfx")
    if min((s["seeds"] for s in summary.values()), default=0) < 2:
        return ["(one seed: no standard deviation to compare within; run 3 seeds for the comparison)"]
    if p and d:
        diff = d["test_error_mean"] - p["test_error_mean"]
        tol = p["test_error_std"]
        both = f"{d['test_error_mean']:.2f} % vs {p['test_error_mean']:.2f} ± {tol:.2f} %"
        if diff < 0:
            lines.append(f"pomfx's default is better than plain SGD ({both}).")
        elif diff == 0:
            lines.append(f"pomfx's default equals plain SGD ({both}).")
        elif diff <= tol:
            lines.append(f"pomfx's default is within one standard deviation of plain SGD ({both}).")
        else:
            lines.append(
                f"pomfx's default is WORSE than plain SGD by {diff:.2f} points ({both}): "
                "more than one standard deviation."
            )
    for m in ("renorm_off", "sp", "st"):
        a = summary.get(m)
        if not (a and d):
            continue
        diff = a["test_error_mean"] - d["test_error_mean"]
        tol = max(a["test_error_std"], d["test_error_std"])
        name = a["label"].replace("ablation: ", "")
        if diff > tol:
            lines.append(
                f"{name} is worse than the default by {diff:.2f} points ({a['test_error_mean']:.2f} %)."
            )
        elif diff < -tol:
            lines.append(
                f"{name} is better than the default by {-diff:.2f} points ({a['test_error_mean']:.2f} %)."
            )
        else:
            lines.append(
                f"{name} is within one standard deviation of the default ({a['test_error_mean']:.2f} %)."
            )
    return lines


def format_table(summary: dict[str, dict], results: list[dict], cfg: Config) -> str:
    """The paper-style table: test error (mean ± std over seeds) and log10 of the three bounds."""
    any_r = results[0]
    seeds = max(s["seeds"] for s in summary.values())
    lines = [
        f"digits ({any_r['n_train']} train / {any_r['n_test']} test), BN CNN, {cfg.epochs} epochs, "
        f"lr {cfg.lr} (cosine), momentum {cfg.momentum}, weight decay {cfg.weight_decay}, "
        f"batch {cfg.batch_size}, "
        f"{seeds} seed{'s' if seeds > 1 else ''}",
        "",
    ]
    head = ("method", "test error (%)", "N15 (F)", "B17 (σ)", "B17 per unit", "N18 (PB)", "residual")
    body = []
    for m, s in summary.items():
        b, std = s["bounds_log10"], s["standard_log10"]
        body.append(
            (
                METHODS[m][0],
                f"{s['test_error_mean']:.2f} ± {s['test_error_std']:.2f}",
                f"{b['frobenius']:.2f}",
                f"{b['spectral']:.2f}",
                f"{std['spectral']:.2f}",
                f"{b['pac_bayes']:.2f}",
                "-" if s["residual"] is None else f"{s['residual']:.1e}",
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines += [" " * (widths[0] + widths[1] + 4) + "log10 of the Table 2 bounds (pomfx.bounds, n = n_train)"]
    lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    lines += [
        "N15 = Neyshabur et al. 2015 (Frobenius), B17 = Bartlett et al. 2017 (spectral),",
        "N18 = Neyshabur et al. 2018 (PAC-Bayes), of the final models: margin 1, constants dropped,",
        "mean over seeds. B17: (2,1) norm over the POM groups (the grouped form); per unit: over the",
        "output units (Bartlett's own). N15 and N18 are the same in both forms.",
        "residual: the largest distance of a component from its manifold.",
    ]
    lines += ["", *verdicts(summary)]
    layers = _layer_comparison(results)
    if layers:
        lines += ["", layers]
    return "\n".join(lines)


def _layer_comparison(results: list[dict]) -> str:
    by = {(r["method"], r["seed"]): r for r in results}
    p, d = by.get(("plain", 0)), by.get(("pomfx", 0))
    if not (p and d):
        return ""
    head = ("layer", "matrix", "‖W‖_F plain | pomfx", "‖W‖_σ plain | pomfx", "(2,1) plain | pomfx (grouped)")
    body = []
    for a, b in zip(p["layers"], d["layers"]):
        body.append(
            (
                f"{a['name']} {a['type']}",
                "×".join(map(str, a["shape"])),
                f"{a['frobenius']:.3f} | {b['frobenius']:.3f}",
                f"{a['spectral']:.3f} | {b['spectral']:.3f}",
                f"{a['two_one_grouped']:.2f} | {b['two_one_grouped']:.2f}",
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = ["per-layer norms of the effective weights after training (seed 0), plain | pomfx default:"]
    out += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row).rstrip() for row in body]
    return "\n".join(out)


# -- the picture -------------------------------------------------------------------------------
_COLORS = {"plain": "#222222", "pomfx": "#d62728", "renorm_off": "#1f77b4", "sp": "#2ca02c", "st": "#9467bd"}


def plot(results: list[dict], path: str | os.PathLike, cfg: Config, *, dpi: int = 100) -> None:
    """Training loss, test error and the three bounds per epoch (mean over seeds, ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig = plt.figure(figsize=(14, 8.5), dpi=dpi)
    gs = fig.add_gridspec(2, 6, hspace=0.38, wspace=0.9, top=0.86, bottom=0.08)
    axes = {
        "loss": fig.add_subplot(gs[0, 0:3]),
        "test_error": fig.add_subplot(gs[0, 3:6]),
        **{k: fig.add_subplot(gs[1, 2 * i : 2 * i + 2]) for i, k in enumerate(BOUND_KEYS)},
    }
    ylabels = {
        "loss": "training loss (cross-entropy)",
        "test_error": "test error (%)",
        **{k: "log10 bound" for k in BOUND_KEYS},
    }
    titles = {"loss": "training loss per epoch", "test_error": "test error per epoch", **BOUND_TITLES}
    seeds = {}
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        seeds[m] = len(rs)
        for key, ax in axes.items():
            v = np.array([r["history"][key] for r in rs], dtype=float)
            epochs = np.arange(v.shape[1])
            if key == "loss":
                v, epochs = v[:, 1:], epochs[1:]
            mean = v.mean(0)
            ax.plot(
                epochs,
                mean,
                color=_COLORS[m],
                lw=2.2 if m in ("plain", "pomfx") else 1.4,
                ls="-" if m in ("plain", "pomfx") else "--",
                label=METHODS[m][0].strip(),
            )
            if len(rs) > 1:
                sd = v.std(0, ddof=1)
                low = np.maximum(mean - sd, 0.0 if key == "test_error" else mean / 3)  # errors are >= 0
                ax.fill_between(epochs, low, mean + sd, color=_COLORS[m], alpha=0.12, lw=0)
    for key, ax in axes.items():
        ax.set_title(titles[key], fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabels[key])
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if key in ("loss", "test_error"):
            if key == "loss":
                ax.set_yscale("log")
            else:  # linear below 1 %, where the seeds' spread reaches 0; logarithmic above
                ax.set_yscale("symlog", linthresh=1.0, linscale=1.0)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles, labels = axes["loss"].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=3, frameon=False, fontsize=10, bbox_to_anchor=(0.5, 0.965)
    )
    n = max(seeds.values(), default=1)
    fig.suptitle(
        f"pomfx on scikit-learn digits: plain SGD vs FG-SGD on products of manifolds "
        f"({cfg.epochs} epochs, mean{' ± std over ' + str(n) + ' seeds' if n > 1 else ', 1 seed'})",
        fontsize=13,
        y=0.995,
    )
    fig.text(
        0.5,
        0.005,
        "bounds: pomfx.bounds(model, n_train), grouped form, margin 1, constants dropped; "
        "epoch 0 = the initial model",
        ha="center",
        fontsize=9,
        color="#555555",
    )
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser

    ap = _Parser(
        prog="pomfx demo",
        description="The digits experiment: plain SGD vs pomfx (pio, sp+ob+st) + FGSGD, the ablations "
        "renorm=False and single manifolds (sp, st), the Table 2 bounds, a PNG, the ONNX export.",
    )
    ap.add_argument("--quick", action="store_true", help="a ~1 minute run: 1 seed, 5 epochs")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 12; --quick: 5)")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes, one torch thread each (default: the CPU count, here {default_workers()})",
    )
    ap.add_argument("--out", type=Path, default=Path("out"), help="output directory (default ./out)")
    ap.add_argument(
        "--docs",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write DIR/demo.md (the table) and DIR/demo.png",
    )
    ap.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (non-zero when the ONNX export or its check fails)."""
    from .cli import CLIError

    try:
        args = _parser().parse_args(argv)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise CLIError(f"unknown method {(bad or [''])[0]!r}; valid: {', '.join(METHODS)}")
        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        epochs = args.epochs if args.epochs is not None else (5 if args.quick else Config.epochs)
        if seeds < 1 or epochs < 1 or (args.workers is not None and args.workers < 1):
            raise CLIError("--seeds, --epochs and --workers must be >= 1")
        missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
        if missing:
            raise CLIError(
                f"the demo needs scikit-learn and matplotlib ({', '.join(missing)} missing): "
                "pip install scikit-learn matplotlib (or pomfx[examples])"
            )
    except CLIError as e:
        print(f"pomfx demo: error: {e}", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    cfg = Config(epochs=epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workers = min(args.workers or default_workers(), seeds * len(methods))
    print(
        f"pomfx demo: {len(methods)} methods × {seeds} seed(s) × {epochs} epochs on {workers} worker(s)",
        flush=True,
    )
    results = run_demo(
        seeds,
        cfg,
        methods,
        workers=workers,
        export_dir=None if args.no_export else str(args.out),
        progress=not args.no_progress,
    )
    summary = summarize(results)
    table = format_table(summary, results, cfg)
    print()
    print(table)
    status = 0
    exports = [r for r in results if r["export"] is not None]
    if exports:
        print()
        for r in exports:
            e = r["export"]
            mark = "verified" if e["ok"] else "FAILED"
            print(f"ONNX export ({METHODS[r['method']][0].strip()}), {mark}: {e['text']}")
            status |= 0 if e["ok"] else 1
        ok = {r["method"]: r["export"] for r in exports if r["export"]["ok"]}
        if "plain" in ok and "pomfx" in ok:
            same = ok["plain"]["nodes"] == ok["pomfx"]["nodes"]
            print(
                f"ONNX nodes: plain {ok['plain']['nodes']}, pomfx {ok['pomfx']['nodes']} "
                f"({'the same graph size: the constraints are folded away' if same else 'different'})"
            )
    png = args.out / "digits_demo.png"
    if not args.no_plot:
        plot(results, png, cfg)
        print(f"plot: {png}")
    record = {"config": asdict(cfg), "summary": summary, "runs": results}
    (args.out / "digits_demo.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"numbers: {args.out / 'digits_demo.json'}")
    seconds = time.perf_counter() - t0
    if args.docs is not None:
        _write_docs(args.docs, table, results, cfg, seeds, epochs)
        print(f"docs: {args.docs / 'demo.md'}, {args.docs / 'demo.png'}")
    print(f"done in {seconds:.0f} s")
    return status


def _write_docs(folder: Path, table: str, results, cfg, seeds, epochs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plot(results, folder / "demo.png", cfg, dpi=80)
    exports = [r["export"] for r in results if r["export"] is not None and r["export"]["ok"]]
    onnx = "\n".join(f"    {e['text']}" for e in exports)
    cmd = (
        "make demo"
        if (seeds, epochs) == (3, Config.epochs)
        else f"pomfx demo --seeds {seeds} --epochs {epochs}"
    )
    text = f"""# The digits demo

`{cmd}` (or `python examples/digits.py`, or `pomfx demo`) trains a small BN CNN on scikit-learn's
bundled handwritten digits, from the same initialisation and with the same hyperparameters, with
plain `torch.optim.SGD` and with pomfx (`pomfx.convert(model, scheme="pio")` + `pomfx.FGSGD`), and
the ablations `renorm=False` and single manifolds (`sp`, `st`). Every run uses one CPU thread, so
the numbers do not depend on how many worker processes share the runs (the full run took 75 s on
2 idle CPU cores, `taskset -c 0,1`; `--quick` runs 1 seed of 5 epochs). It printed:

```
{table}
```

The bounds are `pomfx.bounds(model, n_train)` of the final models: the three bounds of the paper's
Table 2 (Neyshabur et al. 2015, Bartlett et al. 2017, Neyshabur et al. 2018) in their grouped form,
with margin 1 and constants dropped, as log10 (see `pomfx/bounds.py` for the formulas). They are
capacity terms of the weights only: the batch-norm layers are not part of them.

![training loss, test error and the bounds per epoch](demo.png)

The ONNX exports of seed 0's plain and converted models (`pomfx.export_onnx` folds the converted
one first: plain weights, no pomfx operators, the same graph), checked with onnxruntime:

{onnx or "    (not run)"}
"""
    (folder / "demo.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
