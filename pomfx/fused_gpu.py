"""Fused GPU kernels (Triton) for FG-SGD on kernel layers: a layer's step in three launches.

On a GPU the torch ops of a kernel layer's step (:class:`pomfx.optim._KernelJob`, about 80
elementwise ops per job) cost their launches, not their arithmetic: the step is bound by the
host issuing them (benchmarks/RESULTS.md, "GPU"). Here, as :mod:`pomfx.fused` does on a CPU,
each phase is one kernel over the components, its small-matrix algebra unrolled into scalar
statements (the same generators as the CPU kernels, so the formulas are the same), a lane per
component, a component's entries in registers:

- :func:`norms`: the step direction u (momentum, dampening, Nesterov, euc weight decay; see
  :mod:`pomfx.fused`) and q_c = ‖u_c‖², written to q; nothing else is written;
- :func:`group_sums`: q_g = Σ_{c∈g} q_c, in a fixed order (the components sorted by group,
  a tree sum per block): the same bits on every run, where an atomic scatter would not be;
- :func:`step`: u again (the same statements: no scratch buffer for it, and the traffic of a
  stored u), the group's step size h = lr·min(1, δ‖ω_g‖/(lr√q_g)) (lr on euc), the retraction
  ``ω ← (ω − h·u)·R⁻¹`` (twice on a Stiefel component whose h²q_c > restep) and the momentum's
  transport. A group whose q_g is not finite (a NaN or inf in its gradient) stores nothing:
  its ω and momentum are left exactly as they were, decided on the device (no host sync).

Divisions and square roots round as IEEE's (``div_rn``/``sqrt_rn`` in float32). Layers whose
components have more than :data:`pomfx.fused.MAX_ELEMENTS` entries, other dtypes, a machine
without Triton and ``POMFX_TRITON=0`` keep the torch ops. Under Triton's interpreter the kernels
run on CPU tensors (:func:`usable`): how the tests check them without a GPU.
The generated source is written to ``~/.cache/pomfx`` (or ``$POMFX_CACHE``): Triton reads a
kernel's source from its file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from . import fused

__all__ = ["group_sums", "norms", "step", "usable"]

_VERSION = 1  # of the generated source
_BLOCK = 128  # components per program (a lane each)
_GROUP_BLOCK = 128  # members of a group summed side by side
_DTYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64"}
_TINY = 1.1754943508222875e-38  # float32's smallest normal: the floor under a norm², as on the CPU
_CACHE: dict = {}


def _triton():
    try:
        import triton

        return triton
    except ImportError:  # pragma: no cover - exercised where triton is absent
        return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(t: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether these kernels step (rows × cols) components stored like ``t``: a CUDA tensor of
    float32/64, components of at most :data:`pomfx.fused.MAX_ELEMENTS` entries, Triton
    importable and not ``POMFX_TRITON=0``. A CPU tensor only under Triton's interpreter
    (``TRITON_INTERPRET=1``, set before triton is imported) with ``POMFX_TRITON=1``: the tests'
    way to run the kernels without a GPU."""
    flag = os.environ.get("POMFX_TRITON", "")
    if flag == "0" or rows * cols > fused.MAX_ELEMENTS or t.dtype not in _DTYPES:
        return False
    return (t.is_cuda or (flag == "1" and _interpreting())) and _triton() is not None


# -- source generation: the CPU kernels' statements, in Triton's dialect ----------------------------
def _dialect(lines: list[str], dt: torch.dtype) -> list[str]:
    """:mod:`pomfx.fused`'s statements for a lane of components: array reads become the values
    loaded first (``G[i, j, c]`` → ``g{i}_{j}``, ``cg[c]`` → ``cg_c``), a write of V the momentum
    buffer ``b{i}_{j}`` (stored after the transport), selects ``tl.where``, and division and
    square root IEEE's."""
    sqrt = "tl.sqrt_rn" if dt == torch.float32 else "tl.sqrt"
    out = []
    for line in lines:
        line = re.sub(r"^V\[(\d+), (\d+), c\] = (\w+)$", r"b\1_\2 = \3", line)
        line = re.sub(r"\bG\[(\d+), (\d+), c\]", r"g\1_\2", line)
        line = re.sub(r"\bV\[(\d+), (\d+), c\]", r"vo\1_\2", line)
        line = re.sub(r"\b(\w+)\[c\]", r"\1_c", line)
        line = re.sub(r"^(\w+) = (\w+) if (\w+) else (\w+)$", r"\1 = tl.where(\3, \2, \4)", line)
        line = line.replace("np.sqrt(", f"{sqrt}(").replace("np.maximum(", "tl.maximum(")
        hit = re.match(r"^(\w+) = \((.*)\) / (\w+)$", line)
        out.append(f"{hit[1]} = {_quotient(dt, hit[2], hit[3])}" if hit else line)
    return out


def _quotient(dt: torch.dtype, x: str, y: str) -> str:
    """x / y rounded as IEEE's (float32's ``/`` is approximate in Triton; float64's is not)."""
    return f"tl.div_rn({x}, {y})" if dt == torch.float32 else f"({x}) / {y}"


def _prelude(a: int, b: int, dt: torch.dtype, momentum: bool) -> list[str]:
    """Statements: the lane's components ``c``, constants, manifold masks and loads."""
    ty = _DTYPES[dt]
    body = [
        "c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
        "inb = c < N",
        f"zero = tl.zeros([BLOCK], dtype={ty})",
        "one = zero + 1.0",
        "half = 0.5",
        f"tiny = {_TINY!r}",
        "mu = tl.load(hyp + 3)",
        "t = tl.load(types + c, mask=inb, other=3)",
        "msp = tl.where(t == 0, one, zero)",
        "mob = tl.where(t == 1, one, zero)",
        "mst = tl.where(t == 2, one, zero)",
        "meuc = tl.where(t == 3, one, zero)",
    ]
    body += [f"{n}_c = tl.load({n} + c, mask=inb, other=0.0)" for n in ("cg", "mu_eff", "wd")]
    arrays = (("x", "X"), ("g", "G")) + ((("vo", "V"),) if momentum else ())
    for name, src in arrays:
        body += [
            f"{name}{i}_{j} = tl.load({src} + {i * b + j} * N + c, mask=inb, other=0.0)"
            for i in range(a)
            for j in range(b)
        ]
    return body


def _direction(a: int, b: int, mode: int) -> list[str]:
    """u, its buffer ``b`` (momentum: what is transported) and ``qq`` = ‖u‖²: ``mode`` 0 no
    momentum, 3 heavy ball (the buffer is u), 2 Nesterov (the buffer μv + d, u = d + μ·buffer)."""
    body = fused._direction(a, b, mode)
    if mode == 3:
        body += [f"b{i}_{j} = u{i}_{j}" for i in range(a) for j in range(b)]
    return body


def _kernel(name: str, signature: str, body: list[str]) -> str:
    ind = " " * 4
    return f"@triton.jit\ndef {name}({signature}, BLOCK: tl.constexpr):\n" + "".join(
        ind + line + "\n" for line in body
    )


_ARGS = "X, G, V, cg, mu_eff, wd, types"


def _source(a: int, b: int, mode: int, twice: bool, dt: torch.dtype) -> str:
    """The module of a shape: ``norms`` (q) and ``step`` (the retraction and the transport)."""
    momentum = mode != 0
    head = _prelude(a, b, dt, momentum) + _dialect(_direction(a, b, mode), dt)
    norms_body = head + ["tl.store(q + c, qq, mask=inb)"]
    sqrt = "tl.sqrt_rn" if dt == torch.float32 else "tl.sqrt"
    cap = _quotient(dt, "radius * ngc", f"tl.maximum(lr * {sqrt}(qgc), 1e-30)")
    step_body = head + [
        "lr = tl.load(hyp + 0)",
        "radius = tl.load(hyp + 1)",
        "restep = tl.load(hyp + 2)",
        "gi = tl.load(gid + c, mask=inb, other=0)",
        "qgc = tl.load(qg + gi, mask=inb, other=0.0)",
        "ngc = tl.load(norm_g + gi, mask=inb, other=1.0)",
        "ok = inb & (qgc - qgc == 0)",  # a NaN or inf anywhere in the group: nothing is stored
        f"f = tl.minimum({cap}, 1.0)",
        "h = lr * tl.where(t == 3, one, f)",
    ]
    step_body += [f"y{i}_{j} = x{i}_{j} - h * u{i}_{j}" for i in range(a) for j in range(b)]
    step_body += _dialect(fused._retract(a, b, twice, "h * h * qq"), dt)
    step_body += [f"tl.store(X + {i * b + j} * N + c, y{i}_{j}, mask=ok)" for i in range(a) for j in range(b)]
    if momentum:  # the buffer transported to the new point
        step_body += [f"v{i}_{j} = b{i}_{j}" for i in range(a) for j in range(b)]
        step_body += _dialect(fused._remove_normal(a, b, "y", "v"), dt)
        step_body += [
            f"tl.store(V + {i * b + j} * N + c, v{i}_{j}, mask=ok)" for i in range(a) for j in range(b)
        ]
    return (
        "import triton\nimport triton.language as tl\n\n\n"
        + _kernel("norms", f"{_ARGS}, q, hyp, N", norms_body)
        + "\n\n"
        + _kernel("step", f"{_ARGS}, gid, qg, norm_g, hyp, N", step_body)
    )


_GROUP_SUMS = '''import triton
import triton.language as tl


@triton.jit
def group_sums(q, order, start, qg, BLOCK: tl.constexpr):
    """qg[g] = the sum of q over the members order[start[g]:start[g + 1]], a block at a time."""
    g = tl.program_id(0)
    s0 = tl.load(start + g)
    s1 = tl.load(start + g + 1)
    acc = tl.zeros([BLOCK], dtype=q.dtype.element_ty)
    for k0 in range(s0, s1, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < s1
        acc += tl.load(q + tl.load(order + k, mask=m, other=0), mask=m, other=0.0)
    tl.store(qg + g, tl.sum(acc, 0))
'''


def _module(key: tuple, source) -> object:
    """The generated module for ``key``, imported from its file (written atomically: ranks may
    race) under the cache folder, or a temporary one where that is not writable."""
    key = (*key, _interpreting())
    mod = _CACHE.get(key)
    if mod is None:
        name = "t_" + "_".join(str(k).replace("torch.", "") for k in key)
        text = source()
        root = os.environ.get("POMFX_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pomfx"
        )
        for folder in (
            Path(root) / f"triton-{_VERSION}",
            Path(tempfile.gettempdir()) / f"pomfx-triton-{os.getuid()}",
        ):
            try:
                path = folder / f"{name}.py"
                if not path.exists() or path.read_text() != text:
                    folder.mkdir(parents=True, exist_ok=True)
                    tmp = folder / f".{name}.{os.getpid()}.tmp"
                    tmp.write_text(text)
                    os.replace(tmp, path)
                break
            except OSError:
                continue
        spec = importlib.util.spec_from_file_location(f"pomfx_triton_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _CACHE[key] = mod
    return mod


def _kernels(a: int, b: int, mode: int, twice: bool, dt: torch.dtype):
    """The module of ``norms`` and ``step`` for (a × b) components."""
    return _module(("k", a, b, mode, twice, dt), lambda: _source(a, b, mode, twice, dt))


def _group_module():
    return _module(("gs",), lambda: _GROUP_SUMS)


def _grid(n: int) -> tuple[int]:
    return ((n + _BLOCK - 1) // _BLOCK,)


def norms(X, G, V, cg, mu_eff, wd, types, q, hyp, mode: int) -> None:
    """q (N,) ← ‖u_c‖² of every component of X (A, B, N): u as :func:`step` takes it. ``hyp``:
    (lr, radius, restep, μ) in X's dtype; ``mode``: 0 no momentum, 3 heavy ball, 2 Nesterov."""
    n = X.shape[2]
    mod = _kernels(X.shape[0], X.shape[1], mode, False, X.dtype)
    mod.norms[_grid(n)](X, G, X if V is None else V, cg, mu_eff, wd, types, q, hyp, n, BLOCK=_BLOCK)


def group_sums(q, order, start, qg) -> None:
    """qg (G,) ← Σ_{c∈g} q_c, ``order`` the components sorted by group (stable), ``start`` (G+1,)
    where each group's run begins: a fixed order, so the sums are the same bits on every run."""
    mod = _group_module()
    mod.group_sums[(qg.numel(),)](q, order, start, qg, BLOCK=_GROUP_BLOCK)


def step(X, G, V, cg, mu_eff, wd, types, gid, qg, norm_g, hyp, mode: int, twice: bool) -> None:
    """The step of X (and the momentum V) in place, given the group sums ``qg`` of :func:`norms`'
    q: ``gid`` (N,) each component's group, ``norm_g`` (G,) ‖ω_g‖. ``twice``: the second
    Cholesky-QR where a Stiefel component's h²‖u_c‖² > restep. A group with a non-finite q_g
    keeps its ω and momentum."""
    n = X.shape[2]
    mod = _kernels(X.shape[0], X.shape[1], mode, twice, X.dtype)
    V = X if V is None else V
    mod.step[_grid(n)](X, G, V, cg, mu_eff, wd, types, gid, qg, norm_g, hyp, n, BLOCK=_BLOCK)
