"""The ``pomfx`` command line: ``demo``, ``plan``, ``convert``, ``export``, ``report``, ``bench``.

Each subcommand has ``--help``. Bad input (an unknown model, scheme or manifold, a missing file)
ends with a one-line ``pomfx <command>: error: ...`` on stderr and a non-zero exit status, never a
traceback (``POMFX_DEBUG=1`` shows it). Long work draws a small progress bar on stderr.

Models are named ``torchvision:NAME`` (built with ``weights=None``: nothing is downloaded) or
given as the path of a ``torch.save``'d model (a whole ``nn.Module``, not a state_dict).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "Progress", "CLIError", "load_model"]

COMMANDS = {
    "demo": "the digits experiment: plain SGD vs pomfx, ablations, bounds, plot, ONNX",
    "plan": "what convert would do to a model, layer by layer (a dry run)",
    "convert": "convert a model and torch.save it",
    "export": "fold a (converted) model and export it to ONNX, verified with onnxruntime",
    "report": "layouts, manifolds, scales and residuals of a converted model, and its bounds",
    "bench": "time a training step, converted + FGSGD vs plain + SGD",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# -- progress bar ------------------------------------------------------------------------------
class Progress:
    """A tiny progress bar on stderr (no dependencies).

    On a terminal it is redrawn in place; otherwise (logs, CI) it prints one line at most every
    ``every`` seconds and at the end. ``enabled=False`` makes it silent.
    """

    def __init__(self, total: int, desc: str = "", *, stream=None, enabled: bool = True, every: float = 10.0):
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.every = every
        self.n = 0
        self.start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -1e9 if self._tty else self.start  # logs: the first line after `every` seconds
        self._closed = False

    def __enter__(self) -> Progress:
        self._draw(force=self._tty)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n = min(self.n + n, self.total)
        self._draw(force=self.n >= self.total)

    def _line(self) -> str:
        frac = self.n / self.total
        width = 24
        bar = "#" * int(round(frac * width)) + "-" * (width - int(round(frac * width)))
        elapsed = time.monotonic() - self.start
        eta = f", ~{elapsed / frac - elapsed:.0f} s left" if 0 < frac < 1 else ""
        return f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:.0f} s{eta}"

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if self._tty:
            if force or now - self._last >= 0.1:
                self.stream.write("\r" + self._line() + "\x1b[K")
                self.stream.flush()
                self._last = now
        elif force or now - self._last >= self.every:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        if self.enabled and not self._closed:
            if self._tty:
                self._draw(force=True)
                self.stream.write("\n")
            elif self.n < self.total:
                self._draw(force=True)
            self.stream.flush()
        self._closed = True


# -- models ------------------------------------------------------------------------------------
def load_model(spec: str):
    """``torchvision:NAME`` (weights=None) or the path of a ``torch.save``'d ``nn.Module``."""
    import torch
    from torch import nn

    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        try:
            import torchvision
        except ImportError as e:
            raise CLIError(
                f"torchvision is not installed ({e}); install it or pass a torch.save'd model"
            ) from None
        available = torchvision.models.list_models()
        if name not in available:
            close = [m for m in available if name.lower() in m.lower()][:6]
            hint = (
                f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
            )
            raise CLIError(f"unknown torchvision model {name!r}{hint}")
        return torchvision.models.get_model(name, weights=None)
    path = Path(spec)
    if not path.exists():
        raise CLIError(
            f"no such model file {spec!r}; give a torch.save'd model or torchvision:NAME "
            "(e.g. torchvision:resnet18)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise CLIError(f"cannot load {spec!r} with torch.load: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        raise CLIError(
            f"{spec!r} holds a state_dict, not a model: save the whole module with torch.save(model, path)"
        )
    if not isinstance(obj, nn.Module):
        raise CLIError(f"{spec!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _convert_options(args) -> dict[str, Any]:
    return {
        "scheme": args.scheme,
        "manifolds": args.manifolds,
        "group_size": args.group_size,
        "seed": args.seed,
        "renorm": not args.no_renorm,
    }


def _is_converted(model) -> bool:
    from .renorm import poms

    return next(poms(model), None) is not None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- subcommands -------------------------------------------------------------------------------
def _cmd_demo(args, rest: list[str]) -> int:
    from . import demo

    return demo.main(rest)


def _cmd_plan(args, rest) -> int:
    from . import plan

    model = load_model(args.model)
    t0 = time.perf_counter()
    p = plan(model, **_convert_options(args))
    if args.json:
        _print_json(p.to_dict())
    else:
        print(p)
        print(f"planned in {time.perf_counter() - t0:.2f} s")
    return 0


def _cmd_convert(args, rest) -> int:
    import torch

    from . import convert, plan

    model = load_model(args.model)
    if _is_converted(model):
        raise CLIError(f"{args.model!r} is already converted by pomfx; fold it first (pomfx.fold)")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CLIError(f"directory {str(out.parent)!r} does not exist")
    opts = _convert_options(args)
    p = plan(model, **opts)
    t0 = time.perf_counter()
    converted = convert(model, **opts)
    dt = time.perf_counter() - t0
    if not args.quiet:
        print(p)
    torch.save(converted, out)
    size = out.stat().st_size / 1e6
    print(f"converted {len(p.converted)} layers in {dt:.2f} s; saved to {out} ({size:.1f} MB)")
    return 0


def _cmd_export(args, rest) -> int:
    try:
        from .export_cli import export_main
    except ImportError as e:
        raise CLIError(f"the export command is not available in this installation ({e})") from None
    return int(export_main(rest) or 0)


def _cmd_report(args, rest) -> int:
    from . import convert
    from .bounds import bounds
    from .report import report

    model = load_model(args.model)
    note = None
    if not _is_converted(model):
        opts = _convert_options(args)
        model = convert(model, **opts)
        note = (
            f"({args.model} is not converted: converted now with scheme={opts['scheme']}, "
            f"manifolds={opts['manifolds']}, group_size={opts['group_size']}, seed={opts['seed']})"
        )
    rep = report(model)
    bnd = bounds(model, args.n_samples) if args.n_samples else None
    if args.json:
        d = {"report": rep.to_dict()}
        if bnd is not None:
            d["bounds"] = bnd.to_dict()
        _print_json(d)
        return 0
    if note:
        print(note)
    print(rep)
    if bnd is not None:
        print()
        print(bnd)
    return 0


def _find_bench_script() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for root in (Path.cwd(), here):
        p = root / "benchmarks" / "step_ratio.py"
        if p.is_file():
            return p
    return None


def _cmd_bench(args, rest) -> int:
    script = None if args.builtin else _find_bench_script()
    if script is not None:
        import subprocess

        print(f"running {script} {' '.join(rest)}".rstrip(), file=sys.stderr)
        return subprocess.call([sys.executable, str(script), *rest])
    if rest:
        raise CLIError(f"unrecognized arguments: {' '.join(rest)}")
    return _builtin_bench(args.steps, args.threads)


def _builtin_bench(steps: int, threads: int) -> int:
    """A small step-time comparison: a BN CNN on 32×32 inputs, batch 32."""
    import torch
    from torch import nn

    from . import FGSGD, convert

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    torch.manual_seed(0)
    base = nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    conv = convert(base)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    runs = {
        "plain + torch SGD": (base, torch.optim.SGD(base.parameters(), **kw)),
        "pomfx + FGSGD": (conv, FGSGD(conv.parameters(), **kw)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with Progress(2 * steps, "bench") as bar:
        for i in range(steps):
            for name, (model, opt) in runs.items():  # interleaved: the same machine load for both
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - t0)
                bar.update()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"train step, BN CNN, batch 32, 32×32, {threads} thread(s), median of {steps - 3} steps:")
    for k, v in med.items():
        print(f"  {k:<18} {v * 1e3:8.2f} ms")
    print(f"  ratio             {med['pomfx + FGSGD'] / med['plain + torch SGD']:8.2f}×")
    return 0


# -- parser ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise CLIError(f"{message} (see {self.prog} --help)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="torchvision:NAME (weights=None) or the path of a torch.save'd model",
    )
    p.add_argument(
        "--scheme", default="pio", choices=("pi", "po", "pio"), help="grouping scheme (default pio)"
    )
    p.add_argument(
        "--manifolds",
        default="sp+ob+st",
        help="manifold names joined by '+': sp, ob, st, euc (default sp+ob+st)",
    )
    p.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="cap on a group's size (default: the scheme's natural size)",
    )
    p.add_argument("--seed", type=int, default=0, help="layout seed (default 0)")
    p.add_argument("--no-renorm", action="store_true", help="fix R = 1 (no stage (ii) renormalization)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="pomfx",
        description="pomfx: weights on products of manifolds, trained with FG-SGD.",
        epilog="Run 'pomfx COMMAND --help' for a command's options.",
    )
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("demo", help=COMMANDS["demo"], add_help=False)  # options parsed by pomfx.demo

    p = sub.add_parser("plan", help=COMMANDS["plan"], description=COMMANDS["plan"])
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("convert", help=COMMANDS["convert"], description=COMMANDS["convert"])
    _add_model_options(p)
    p.add_argument("-o", "--output", required=True, help="where to torch.save the converted model")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the plan")

    sub.add_parser("export", help=COMMANDS["export"], add_help=False)  # options parsed by pomfx.export_cli

    p = sub.add_parser(
        "report",
        help=COMMANDS["report"],
        description=COMMANDS["report"] + ". A model that is "
        "not converted is converted first with the given options.",
    )
    _add_model_options(p)
    p.add_argument(
        "--n-samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training-set size: also print pomfx.bounds(model, N)",
    )
    p.add_argument("--json", action="store_true", help="print the report (and bounds) as JSON")

    p = sub.add_parser(
        "bench",
        help=COMMANDS["bench"],
        description=COMMANDS["bench"] + ". Runs "
        "benchmarks/step_ratio.py (with any further arguments) when it is there, a small built-in "
        "timing otherwise.",
    )
    p.add_argument(
        "--builtin", action="store_true", help="use the built-in timing even if benchmarks/ exists"
    )
    p.add_argument("--steps", type=_positive_int, default=30, help="built-in: timed steps (default 30)")
    p.add_argument("--threads", type=_positive_int, default=2, help="built-in: torch threads (default 2)")
    return ap


_HANDLERS = {
    "demo": _cmd_demo,
    "plan": _cmd_plan,
    "convert": _cmd_convert,
    "export": _cmd_export,
    "report": _cmd_report,
    "bench": _cmd_bench,
}
_PASSTHROUGH = ("demo", "export")  # their own parsers read the rest of the line
_REST_OK = ("bench",)  # further arguments go to benchmarks/step_ratio.py


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pomfx`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv else None
    try:
        if command in _PASSTHROUGH:
            return _HANDLERS[command](None, argv[1:])
        args, rest = parser.parse_known_args(argv)
        if args.version:
            from . import __version__

            print(f"pomfx {__version__}")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        if rest and args.command not in _REST_OK:
            raise CLIError(f"unrecognized arguments: {' '.join(rest)} (see pomfx {args.command} --help)")
        return _HANDLERS[args.command](args, rest)
    except CLIError as e:
        where = f"pomfx {command}" if command in _HANDLERS else "pomfx"
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or a delegated command's own parser
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("pomfx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the library's errors name the problem; show them in one line
        if os.environ.get("POMFX_DEBUG"):
            raise
        where = f"pomfx {command}" if command in _HANDLERS else "pomfx"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{where}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
