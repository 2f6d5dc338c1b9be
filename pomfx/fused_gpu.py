"""Fused GPU kernels (Triton): FG-SGD's step of kernel layers and of block jobs, the block maps,
and the λ hook's variance fold.

On a GPU the torch ops of a kernel layer's step (:class:`pomfx.kernel_job.KernelJob`, about 80
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

A job of blocks (:func:`block_step`: (n, A, B) components of 1×1 convs and linears, large, of
every manifold) keeps the Stiefel blocks' products XᵀY and X·C, Cholesky factors and triangular
solves in cuBLAS/cuSOLVER, and does all the rest in Triton kernels (:data:`_BLOCKS`): ``prep``
(s⊙g, the non-finite check per group), ``coldots`` and ``project`` (the sphere's and the
oblique's normal parts from column products: no B×B product for them), ``compose`` (sym(XᵀY),
or the Gram matrix, I where a group is skipped), ``direction`` (momentum, u, partial ‖u‖²),
``move`` and ``normalize``; ~26 launches a job where the torch ops take ~75.

A block layer's map (:func:`block_map`), ``W[inverse] = ω ⊙ R`` and its backward gather, is one
launch each way, where the torch ops are two (``index_put_`` then ``mul_``; ``mul`` then
``index_select``) and a second pass over W.

The λ hook's statistics (:func:`fold_channel_var`) are two launches per layer, where the torch
ops (``var_mean``, then the count, its reciprocal, the clamp and the ``lerp_``) are five: shifted
sums of a chunk of each channel per program, then the fold of the chunks' sums in a fixed order
(the same bits on every run) into ``running_var``, and the count.

Divisions and square roots round as IEEE's (``div_rn``/``sqrt_rn`` in float32). Layers whose
components have more than :data:`pomfx.fused.MAX_ELEMENTS` entries, other dtypes, a machine
without Triton and ``POMFX_TRITON=0`` keep the torch ops. Under Triton's interpreter the kernels
run on CPU tensors (:func:`usable`): how the tests check them without a GPU.
The generated source is written to ``~/.cache/pomfx`` (or ``$POMFX_CACHE``): Triton reads a
kernel's source from its file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from . import fused

__all__ = [
    "block_map", "block_step", "block_tiles", "fold_channel_var", "fold_usable", "group_sums", "map_usable",
    "norms", "step", "usable",
]  # fmt: skip

_VERSION = 1  # of the generated source
_BLOCK = 128  # components per program (a lane each)
_GROUP_BLOCK = 128  # members of a group summed side by side
_DTYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64"}
_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # λ: x's dtypes
_TILE = 2048  # elements of x a λ program reads per iteration
_BLOCK_TILE = 1024  # elements of a block job's tile
_BLOCK_COLS = 64  # columns of a block job's tile at most
_GRID_Y = 65535  # a CUDA grid's second axis at most (the block kernels' tiles of a block)
_MAP_BLOCK = 1024  # elements per program of a block layer's map
_CHANNELS = 128  # channels a λ fold program folds
_PROGRAMS = 1024  # about as many λ programs per layer (their chunks split a channel's elements)
_TINY = 1.1754943508222875e-38  # float32's smallest normal: the floor under a norm², as on the CPU
_CACHE: dict = {}
_NO_GUARD = contextlib.nullcontext()  # (reusable: it holds nothing)


def _triton():
    try:
        import triton

        return triton
    except ImportError:  # pragma: no cover - exercised where triton is absent
        return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ready(t: torch.Tensor) -> bool:
    """Whether Triton may run on ``t``'s device here: a CUDA tensor, or a CPU one under Triton's
    interpreter (``TRITON_INTERPRET=1``, set before triton is imported) with ``POMFX_TRITON=1``
    (the tests' way to run the kernels without a GPU); Triton importable, not
    ``POMFX_TRITON=0``, not under torch.compile (which traces the torch ops instead)."""
    flag = os.environ.get("POMFX_TRITON", "")
    return (
        flag != "0"
        and (t.is_cuda or (flag == "1" and _interpreting()))
        and not torch.compiler.is_compiling()
        and _triton() is not None
    )


def usable(t: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether these kernels step (rows × cols) components stored like ``t``: float32/64,
    components of at most :data:`pomfx.fused.MAX_ELEMENTS` entries, where Triton may run."""
    return rows * cols <= fused.MAX_ELEMENTS and t.dtype in _DTYPES and _ready(t)


def fold_usable(x: torch.Tensor, running_var: torch.Tensor) -> bool:
    """Whether :func:`fold_channel_var` folds ``x`` (P, C, Q), a view in memory order, into
    ``running_var`` (float32/64, on x's device)."""
    return (
        x.dtype in _INPUTS
        and running_var.dtype in _DTYPES
        and running_var.is_contiguous()
        and x.device == running_var.device
        and x.is_contiguous()
        and _ready(x)
    )


def map_usable(t: torch.Tensor) -> bool:
    """Whether :func:`block_map` maps ``t`` (floating point, where Triton may run)."""
    return t.dtype in _INPUTS and _ready(t)


def _on(t: torch.Tensor):
    """The device guard for a launch on ``t``: Triton launches on the current CUDA device (a
    guard only where ``t`` is on another one: entering it costs microseconds a launch)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


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


_MOMENTS = """import triton
import triton.language as tl


@triton.jit
def moments(x, part, nbt, P, C, Q, CHUNK, S, momentum,
            ROWS: tl.constexpr, BP: tl.constexpr, BI: tl.constexpr):
    \"\"\"part (2, S, C) ← Σd, Σd² over the rows p of chunk s, d = x − x[0, c, 0], x (P, C, Q)
    contiguous. ROWS (Q = 1, channels last): a program sums BI channels, (BP, BI) tiles of rows
    × channels; else one channel, (BP, BI) tiles of rows × q. Program (0, 0) also writes the
    fold's weight max(1/(nbt + 1), momentum) at part[2·S·C].\"\"\"
    s = tl.program_id(1)
    p0 = s.to(tl.int64) * CHUNK
    p1 = tl.minimum(p0 + CHUNK, P)
    if ROWS:
        c = tl.program_id(0) * BI + tl.arange(0, BI)
        cm = c < C
        shift = tl.load(x + c, mask=cm, other=0.0).to({acc})
        s1 = tl.zeros([BP, BI], dtype={acc})
        s2 = tl.zeros([BP, BI], dtype={acc})
        for pb in range(p0, p1, BP):
            p = pb + tl.arange(0, BP)
            m = (p < p1)[:, None] & cm[None, :]
            v = tl.load(x + p[:, None] * C + c[None, :], mask=m, other=0.0).to({acc})
            d = tl.where(m, v - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
        tl.store(part + s * C + c, tl.sum(s1, 0), mask=cm)
        tl.store(part + (S + s) * C + c, tl.sum(s2, 0), mask=cm)
    else:
        c = tl.program_id(0)
        shift = tl.load(x + c.to(tl.int64) * Q).to({acc})
        s1 = tl.zeros([BP, BI], dtype={acc})
        s2 = tl.zeros([BP, BI], dtype={acc})
        for pb in range(p0, p1, BP):
            p = pb + tl.arange(0, BP)
            row = (p * C + c) * Q
            for qb in range(0, Q, BI):
                q = qb + tl.arange(0, BI)
                m = (p < p1)[:, None] & (q < Q)[None, :]
                v = tl.load(x + row[:, None] + q[None, :], mask=m, other=0.0).to({acc})
                d = tl.where(m, v - shift, 0.0)
                s1 += d
                s2 += d * d
        tl.store(part + s * C + c, tl.sum(tl.sum(s1, 1), 0))
        tl.store(part + (S + s) * C + c, tl.sum(tl.sum(s2, 1), 0))
    if (tl.program_id(0) == 0) & (s == 0):
        seen = (tl.load(nbt) + 1).to(tl.float32)
        tl.store(part + 2 * S * C, tl.maximum(tl.div_rn(seen * 0.0 + 1.0, seen), momentum))


@triton.jit
def fold(part, rv, nbt, C, S, n, BLOCK: tl.constexpr):
    \"\"\"rv ← lerp(rv, var, w) per channel, var = (Σd² − (Σd)²/n)/n ≥ 0 from the chunks' sums
    added in order, w from part[2·S·C]; then nbt ← nbt + 1 (read by moments only: no race).\"\"\"
    pid = tl.program_id(0)
    c = pid * BLOCK + tl.arange(0, BLOCK)
    cm = c < C
    s1 = tl.zeros([BLOCK], dtype={acc})
    s2 = tl.zeros([BLOCK], dtype={acc})
    for s in range(0, S):
        s1 += tl.load(part + s * C + c, mask=cm, other=0.0)
        s2 += tl.load(part + (S + s) * C + c, mask=cm, other=0.0)
    cnt = s1 * 0.0 + n
    var = tl.maximum({quot_var}, 0.0).to({rv})
    w = tl.load(part + 2 * S * C).to({rv})
    r = tl.load(rv + c, mask=cm, other=0.0)
    new = tl.where(w < 0.5, r + w * (var - r), var - (var - r) * (1.0 - w))
    tl.store(rv + c, new, mask=cm)
    if pid == 0:
        tl.store(nbt, tl.load(nbt) + 1)
"""


_BLOCK_MAP = """import triton
import triton.language as tl


@triton.jit
def block_map(src, index, scale, out, N, TO_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    \"\"\"TO_WEIGHT: out[index[i]] = src[i]·scale[index[i]] (ω's storage order to the weight's);
    else out[i] = src[index[i]]·scale[index[i]] (∇W to ∇ω); the product in {acc}.\"\"\"
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    j = tl.load(index + i, mask=m, other=0)
    s = tl.load(scale + j, mask=m, other=0.0).to({acc})
    if TO_WEIGHT:
        tl.store(out + j, tl.load(src + i, mask=m, other=0.0).to({acc}) * s, mask=m)
    else:
        tl.store(out + i, tl.load(src + j, mask=m, other=0.0).to({acc}) * s, mask=m)
"""


_BLOCKS = """import triton
import triton.language as tl


@triton.jit
def _tile(c, t, A, B, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"Rows i, columns j and the element offsets of tile t of component c of an (n, A, B) array.\"\"\"
    nb = tl.cdiv(B, TB)
    i = (t // nb) * TA + tl.arange(0, TA)
    j = (t % nb) * TB + tl.arange(0, TB)
    m = (i < A)[:, None] & (j < B)[None, :]
    off = c.to(tl.int64) * A * B + (i * B)[:, None] + j[None, :]
    return i, j, m, off


@triton.jit
def _ok(BADG, GID, c):
    \"\"\"Whether component c's group has a finite gradient.\"\"\"
    return tl.load(BADG + tl.load(GID + c)) == 0


@triton.jit
def _trace(P, c, B, TB: tl.constexpr):
    \"\"\"Σ_j P[c, j] of an (n, B) array.\"\"\"
    acc = tl.zeros([TB], dtype=P.dtype.element_ty)
    for j0 in range(0, B, TB):
        j = j0 + tl.arange(0, TB)
        acc += tl.load(P + c * B + j, mask=j < B, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def prep(G, SROW, SCOL, OUT, GID, BADG, A, B, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"OUT ← s⊙G with its non-finite entries 0, s = SROW[c, i]·SCOL[c, j]; BADG[group] ← 1
    where a component of the group has a non-finite entry (an atomic max: any order, same bits).\"\"\"
    c = tl.program_id(0)
    i, j, m, off = _tile(c, tl.program_id(1), A, B, TA, TB)
    sr = tl.load(SROW + c * A + i, mask=i < A, other=1.0)
    sc = tl.load(SCOL + c * B + j, mask=j < B, other=1.0)
    y = tl.load(G + off, mask=m, other=0.0) * sr[:, None] * sc[None, :]
    fin = (y - y) == 0
    tl.store(OUT + off, tl.where(fin, y, 0.0), mask=m)
    bad = tl.max(tl.max(tl.where(m & (~fin), 1, 0), 1), 0)
    tl.atomic_max(BADG + tl.load(GID + c), bad)


@triton.jit
def coldots(X, Y, OUT, A, B, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"OUT[c, j] ← Σ_i X[c, i, j]·Y[c, i, j]: the column inner products of (n, A, B) arrays.\"\"\"
    c = tl.program_id(0)
    j = tl.program_id(1) * TB + tl.arange(0, TB)
    acc = tl.zeros([TA, TB], dtype=OUT.dtype.element_ty)
    base = c.to(tl.int64) * A * B
    for i0 in range(0, A, TA):
        i = i0 + tl.arange(0, TA)
        m = (i < A)[:, None] & (j < B)[None, :]
        off = base + (i * B)[:, None] + j[None, :]
        acc += tl.load(X + off, mask=m, other=0.0) * tl.load(Y + off, mask=m, other=0.0)
    tl.store(OUT + c * B + j, tl.sum(acc, 0), mask=j < B)


@triton.jit
def project(Y, X, P, TYPES, GID, BADG, A, B, SKIP: tl.constexpr, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"Y ← Y − (its normal part at X) on sp and ob, P = the column products XᵀY's diagonal
    (n, B): ob Y − X·diag(P), sp Y − tr(P)·X; st and euc untouched. SKIP: components of a
    skipped group untouched too.\"\"\"
    c = tl.program_id(0)
    i, j, m, off = _tile(c, tl.program_id(1), A, B, TA, TB)
    t = tl.load(TYPES + c)
    if (t == 0) | (t == 1):
        if t == 0:
            coef = tl.zeros([TB], dtype=P.dtype.element_ty) + _trace(P, c, B, TB)
        else:
            coef = tl.load(P + c * B + j, mask=j < B, other=0.0)
        if SKIP:
            coef = tl.where(_ok(BADG, GID, c), coef, 0.0)
        y = tl.load(Y + off, mask=m, other=0.0) - tl.load(X + off, mask=m, other=0.0) * coef[None, :]
        tl.store(Y + off, y, mask=m)


@triton.jit
def compose(M, OUT, GID, BADG, B, MODE: tl.constexpr, TR: tl.constexpr, TB: tl.constexpr):
    \"\"\"OUT (n, B, B) from M = XᵀY of Stiefel components: MODE 0 sym(M) (Y − X·sym(XᵀY) is Y's
    tangent part), 1 the same, 0 where the group is skipped (the transport), 2 M itself, I
    where the group is skipped (the Gram matrix whose Cholesky factor retracts).\"\"\"
    c = tl.program_id(0)
    base = c.to(tl.int64) * B * B
    ok = _ok(BADG, GID, c)
    r = tl.program_id(1) * TR + tl.arange(0, TR)
    for j0 in range(0, B, TB):
        j = j0 + tl.arange(0, TB)
        m = (r < B)[:, None] & (j < B)[None, :]
        a = tl.load(M + base + (r * B)[:, None] + j[None, :], mask=m, other=0.0)
        if MODE == 2:
            out = tl.where(ok, a, tl.where(r[:, None] == j[None, :], 1.0, 0.0))
        else:
            out = 0.5 * (a + tl.load(M + base + r[:, None] + (j * B)[None, :], mask=m, other=0.0))
            if MODE == 1:
                out = tl.where(ok, out, 0.0)
        tl.store(OUT + base + (r * B)[:, None] + j[None, :], out, mask=m)


@triton.jit
def direction(D, X, V, TYPES, GID, BADG, KC, QP, HYP, A, B, T,
              MODE: tl.constexpr, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"u from D = the tangent part of s⊙g: d = ±k·okf·D (+ wd·k·okf·X on euc), the
    momentum V ← μ_eff·V + d (μ_eff = μ, 1 where the group is skipped) and u = V (MODE 3) or
    d + μV (2, Nesterov), or u = d (0); u into D, and QP[c, t] ← Σ u² over the tile.
    HYP: (lr, radius, restep, μ, wd, ±1).\"\"\"
    c = tl.program_id(0)
    tt = tl.program_id(1)
    i, j, m, off = _tile(c, tt, A, B, TA, TB)
    okf = tl.where(_ok(BADG, GID, c), 1.0, 0.0)
    k = tl.load(KC + c)
    euc = tl.load(TYPES + c) == 3
    mu = tl.load(HYP + 3)
    d = tl.load(D + off, mask=m, other=0.0) * (tl.load(HYP + 5) * k * okf)
    d += tl.load(X + off, mask=m, other=0.0) * tl.where(euc, tl.load(HYP + 4) * k * okf, 0.0)
    if MODE == 0:
        u = d
    else:
        v = tl.load(V + off, mask=m, other=0.0) * tl.where(okf != 0, mu, 1.0) + d
        tl.store(V + off, v, mask=m)
        if MODE == 3:
            u = v
        else:
            u = d + mu * v
    tl.store(D + off, u, mask=m)
    tl.store(QP + c * T + tt, tl.sum(tl.sum(u * u, 1), 0))


@triton.jit
def move(X, U, TYPES, GID, BADG, QG, NORMG, HYP, A, B, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"X ← X − h·U, h = lr·okf·min(1, δ‖ω_g‖/(lr√q_g)) (lr·okf on euc).\"\"\"
    c = tl.program_id(0)
    i, j, m, off = _tile(c, tl.program_id(1), A, B, TA, TB)
    lr = tl.load(HYP + 0)
    g = tl.load(GID + c)
    qg = tl.load(QG + g)
    cap = {quot}
    f = tl.where(tl.load(TYPES + c) == 3, 1.0, tl.minimum(cap, 1.0))
    h = lr * f * tl.where(tl.load(BADG + g) == 0, 1.0, 0.0)
    x = tl.load(X + off, mask=m, other=0.0) - h * tl.load(U + off, mask=m, other=0.0)
    tl.store(X + off, x, mask=m)


@triton.jit
def normalize(X, P, TYPES, GID, BADG, A, B, TA: tl.constexpr, TB: tl.constexpr):
    \"\"\"The retraction of sp and ob components (skipped groups untouched), P the squared column
    norms (n, B): ob X·diag(P)^(-1/2), sp X/√tr(P).\"\"\"
    c = tl.program_id(0)
    i, j, m, off = _tile(c, tl.program_id(1), A, B, TA, TB)
    t = tl.load(TYPES + c)
    if ((t == 0) | (t == 1)) & _ok(BADG, GID, c):
        if t == 0:
            nrm = tl.zeros([TB], dtype=P.dtype.element_ty) + _trace(P, c, B, TB)
        else:
            nrm = tl.load(P + c * B + j, mask=j < B, other=1.0)
        xv = tl.load(X + off, mask=m, other=0.0)
        den = tl.zeros([TA, TB], dtype=P.dtype.element_ty) + {sqrt}(tl.maximum(nrm, {tiny}))[None, :]
        tl.store(X + off, {div_x}, mask=m)
"""


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


def _blocks_module(dt: torch.dtype):
    def source() -> str:
        sqrt = "tl.sqrt_rn" if dt == torch.float32 else "tl.sqrt"
        cap = _quotient(dt, "tl.load(HYP + 1) * tl.load(NORMG + g)", f"tl.maximum(lr * {sqrt}(qg), 1e-30)")
        div = _quotient(dt, "xv", "den")
        return _BLOCKS.format(quot=cap, div_x=div, sqrt=sqrt, tiny=repr(_TINY))

    return _module(("blk", dt, 2), source)


def _block_map_module(acc: torch.dtype):
    return _module(("bm", acc), lambda: _BLOCK_MAP.format(acc=_DTYPES[acc]))


def _moments_source(acc: torch.dtype, rv: torch.dtype) -> str:
    inner = _quotient(acc, "s1 * s1", "cnt")
    quot = _quotient(acc, f"s2 - {inner}", "cnt")
    return _MOMENTS.format(acc=_DTYPES[acc], rv=_DTYPES[rv], quot_var=quot)


def _moments_module(acc: torch.dtype, rv: torch.dtype):
    return _module(("m", acc, rv), lambda: _moments_source(acc, rv))


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _pow2(n: int) -> int:
    """The least power of two ≥ n (Triton's block sizes)."""
    return 1 << max(0, (n - 1).bit_length())


def _grid(n: int) -> tuple[int]:
    return (_cdiv(n, _BLOCK),)


def norms(X, G, V, cg, mu_eff, wd, types, q, hyp, mode: int) -> None:
    """q (N,) ← ‖u_c‖² of every component of X (A, B, N): u as :func:`step` takes it. ``hyp``:
    (lr, radius, restep, μ) in X's dtype; ``mode``: 0 no momentum, 3 heavy ball, 2 Nesterov."""
    n = X.shape[2]
    mod = _kernels(X.shape[0], X.shape[1], mode, False, X.dtype)
    with _on(X):
        mod.norms[_grid(n)](X, G, X if V is None else V, cg, mu_eff, wd, types, q, hyp, n, BLOCK=_BLOCK)


def group_sums(q, order, start, qg) -> None:
    """qg (G,) ← Σ_{c∈g} q_c, ``order`` the components sorted by group (stable), ``start`` (G+1,)
    where each group's run begins: a fixed order, so the sums are the same bits on every run."""
    mod = _group_module()
    with _on(q):
        mod.group_sums[(qg.numel(),)](q, order, start, qg, BLOCK=_GROUP_BLOCK)


def step(X, G, V, cg, mu_eff, wd, types, gid, qg, norm_g, hyp, mode: int, twice: bool) -> None:
    """The step of X (and the momentum V) in place, given the group sums ``qg`` of :func:`norms`'
    q: ``gid`` (N,) each component's group, ``norm_g`` (G,) ‖ω_g‖. ``twice``: the second
    Cholesky-QR where a Stiefel component's h²‖u_c‖² > restep. A group with a non-finite q_g
    keeps its ω and momentum."""
    n = X.shape[2]
    mod = _kernels(X.shape[0], X.shape[1], mode, twice, X.dtype)
    V = X if V is None else V
    with _on(X):
        mod.step[_grid(n)](X, G, V, cg, mu_eff, wd, types, gid, qg, norm_g, hyp, n, BLOCK=_BLOCK)


def fold_channel_var(x: torch.Tensor, running_var: torch.Tensor, seen: torch.Tensor, momentum: float) -> None:
    """``running_var ← running_var + w·(var − running_var)``, w = max(1/(seen + 1), momentum),
    then ``seen += 1``: var the variance of each channel of ``x`` (P, C, Q) over P and Q, from
    sums of d = x − x[0, c, 0] (no cancellation when the mean is large against the spread) in
    float32 (float64 for a float64 x). Two launches; chunks and their order fixed by the shape."""
    p, c, q = x.shape
    rows, bp, bi, ncb, s, chunk = _fold_plan(p, c, q, _TILE, _PROGRAMS)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty(2 * s * c + 1, dtype=acc, device=x.device)
    mod = _moments_module(acc, running_var.dtype)
    with _on(x):
        mod.moments[(ncb, s)](x, part, seen, p, c, q, chunk, s, momentum, ROWS=rows, BP=bp, BI=bi)
        mod.fold[(_cdiv(c, _CHANNELS),)](part, running_var, seen, c, s, p * q, BLOCK=_CHANNELS)


@functools.lru_cache(maxsize=1024)
def _fold_plan(p: int, c: int, q: int, tile: int, programs: int) -> tuple[bool, int, int, int, int, int]:
    """(rows mode, BP, BI, channel blocks, chunks, chunk length) of :func:`fold_channel_var` for
    an x of (P, C, Q), with tiles of ``tile`` elements, about ``programs`` programs (a layer's
    shapes repeat from step to step: planned once each)."""
    rows = q == 1
    if rows:  # a block of channels per program, the rows cut into chunks
        bi = min(64, _pow2(c))
        bp, ncb = tile // bi, _cdiv(c, bi)
        s = max(1, min(_cdiv(programs, ncb), _cdiv(p, 4 * bp)))
        chunk = _cdiv(_cdiv(p, s), bp) * bp
    else:  # a channel per program, its P planes cut into chunks
        bi, ncb = min(1024, _pow2(q)), c
        chunk = _cdiv(p, max(1, min(_cdiv(programs, c), p)))
        bp = min(_pow2(chunk), tile // bi)
    return rows, bp, bi, ncb, _cdiv(p, chunk), chunk


def block_map(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, to: str) -> torch.Tensor:
    """A block layer's elements moved and scaled in one launch, into a new flat tensor: ``to``
    ``"weight"``: ``W[index] = src ⊙ R[index]`` (ω to W); ``"storage"``: ``src[index] ⊙
    R[index]`` (∇W to ∇ω). ``index`` the layout's inverse permutation, ``scale`` R flat in the
    weight's order; the product in float32 (float64 if either is), as torch's ``mul``."""
    n = src.numel()
    out = src.new_empty(n)
    acc = torch.float64 if torch.float64 in (src.dtype, scale.dtype) else torch.float32
    with _on(src):
        _block_map_module(acc).block_map[(_cdiv(n, _MAP_BLOCK),)](
            src, index, scale, out, n, TO_WEIGHT=to == "weight", BLOCK=_MAP_BLOCK
        )
    return out


def block_tiles(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(TA, TB, T, TR): the elementwise kernels' tile of an (A × B) block, the tiles per block,
    and the rows of C per ``compose`` program (tiles of at most :data:`_BLOCK_TILE` elements;
    taller where a block would have more tiles than a CUDA grid's second axis takes)."""
    tb = min(_pow2(cols), _BLOCK_COLS)
    ta = max(1, min(_pow2(rows), _BLOCK_TILE // tb))
    tr = max(1, min(_pow2(cols), _BLOCK_TILE // tb))
    while _cdiv(rows, ta) * _cdiv(cols, tb) > _GRID_Y:  # a huge block: taller tiles, fewer of them
        ta *= 2
    return ta, tb, _cdiv(rows, ta) * _cdiv(cols, tb), tr


def block_step(
    X, G, V, srow, scol, types, gid, kc, norm_g, hyp, order, start, ng: int, mode: int, st: tuple[int, int]
) -> None:
    """FG-SGD's step of a job of (n, A, B) blocks of any manifolds (``types``, codes as
    :data:`pomfx.parametrization._TYPE_CODE`), X and V in place: Stiefel components (those in
    ``st`` = (i0, i1), contiguous) by batched products, Cholesky factors and triangular solves,
    the others' normal parts and retractions from their column products, and all the
    elementwise work in Triton kernels (~26 launches a job where the torch ops take ~75).
    G raw (not written); s = srow ⊗ scol, (n, A) and (n, B); ``gid`` (n,) the groups (int32),
    ``kc`` (n,) the damping factors k, ``norm_g`` (ng,) ‖ω_g‖, ``hyp`` (lr, radius, restep, μ,
    wd, ±1) in X's dtype; ``order``/``start``: the (component, tile) partial sums of ‖u‖²
    sorted by group (:func:`group_sums`). ``mode`` 0, 3 heavy ball, 2 Nesterov. A group with
    a non-finite gradient keeps its ω and momentum (decided on the device: no host sync);
    Stiefel blocks are orthonormalized by Cholesky-QR twice."""
    n, a, b = X.shape
    ta, tb, t, tr = block_tiles(a, b)
    i0, i1 = st
    mod = _blocks_module(X.dtype)
    grid, cols = (n, t), (n, _cdiv(b, tb))
    sgrid = (i1 - i0, _cdiv(b, tr))
    D = torch.empty_like(X)
    bad = torch.zeros(ng, dtype=torch.int32, device=X.device)
    P = X.new_empty(n, b)
    C = X.new_empty(i1 - i0, b, b)
    qp = X.new_empty(n * t)
    qg = X.new_empty(ng)
    gs = gid[i0:i1]

    def tangent(Y, skip: bool) -> None:  # Y ← its tangent part at X (skip: skipped groups kept)
        mod.coldots[cols](X, Y, P, a, b, TA=ta, TB=tb)
        mod.project[grid](Y, X, P, types, gid, bad, a, b, SKIP=skip, TA=ta, TB=tb)
        if i1 > i0:
            xs, ys = X[i0:i1], Y[i0:i1]
            mod.compose[sgrid](torch.bmm(xs.transpose(1, 2), ys), C, gs, bad, b, MODE=int(skip), TR=tr, TB=tb)
            ys.baddbmm_(xs, C, alpha=-1.0)

    with _on(X):
        mod.prep[grid](G, srow, scol, D, gid, bad, a, b, TA=ta, TB=tb)
        tangent(D, False)
        Vk = X if V is None else V
        mod.direction[grid](D, X, Vk, types, gid, bad, kc, qp, hyp, a, b, t, MODE=mode, TA=ta, TB=tb)
        group_sums(qp, order, start, qg)
        mod.move[grid](X, D, types, gid, bad, qg, norm_g, hyp, a, b, TA=ta, TB=tb)
        mod.coldots[cols](X, X, P, a, b, TA=ta, TB=tb)  # sp, ob: back on the manifold
        mod.normalize[grid](X, P, types, gid, bad, a, b, TA=ta, TB=tb)
        if i1 > i0:  # st: Y·R⁻¹, R the Cholesky factor of YᵀY (I where skipped), twice
            Y = X[i0:i1]
            for _ in range(2):
                mod.compose[sgrid](torch.bmm(Y.transpose(1, 2), Y), C, gs, bad, b, MODE=2, TR=tr, TB=tb)
                Y = torch.linalg.solve_triangular(
                    torch.linalg.cholesky_ex(C, upper=True)[0], Y, upper=True, left=False
                )
            X[i0:i1].copy_(Y)
        if V is not None:  # the momentum's transport: its tangent part at the new point
            tangent(V, True)
