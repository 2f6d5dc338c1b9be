"""Fused CPU kernels (numba) for FG-SGD on kernel layers, one parallel loop per phase, and for
the parametrization's maps.

The torch implementation of a kernel layer's step (:class:`pomfx.kernel_job.KernelJob`) is about 80
elementwise ops per chunk of components; on a CPU their dispatch and their passes through memory
cost several plain SGD steps. Here each phase is one parallel loop over the components, written
for the layer's component shape (A, B): the source is generated with every small-matrix
operation unrolled into scalar statements, so a component's algebra runs in registers, the loop
body has no branches (the four manifolds' formulas are chosen by per-component masks, as in
``KernelJob``) and the compiler vectorises it across components. The formulas, in ``KernelJob``'s
order (see :mod:`pomfx.kernel_job`):

- phase A: ``d = cg·G − ω·C(ωᵀ cg·G)`` with C = sym on st, ddiag on ob, trace·I on sp, 0 on euc
  (plus ``wd·ω`` on euc); momentum ``v = μv + d`` (Nesterov ``u = d + μ(μv + d)``); ``q = ‖u‖²``;
  the heavy ball can write ``u = μv + d`` to U and leave V alone (mode 3: V is then only written by
  phase B, so a step found non-finite after phase A has changed nothing);
- phase B: ``ω ← (ω − h·u)·R⁻¹`` with R the Cholesky factor of the Gram matrix on st, the column
  norms on ob, the Frobenius norm on sp, I on euc; once, and on a Stiefel component whose step
  was large (h²‖u‖² > ``restep``) twice, chosen per component; then the momentum's transport
  ``V ← s − ω·C(ωᵀs)`` of ``s`` (V itself, or U after mode 3). Components whose group is not
  ``ok`` are left exactly as they were;
- between them, :func:`step_size`: the group sums of q and each component's step size h;
- usually neither: when a bound on ‖u_c‖ (:func:`within`, a pass over G, and over V unless
  the last one-pass step left its norms; group sums of it only where some component is over its
  share) shows that no group's step size is capped, every component steps by lr and both phases
  run as one pass (:func:`one_pass`), u kept in registers: half the memory traffic.

The same machinery serves the parametrization's maps on a CPU: :func:`project` (ω of a kernel
layer from its weight: divide by R, project every component, store the structure of arrays, in
one pass), :func:`scale_to_weight` (its forward) and :func:`scale_from_weight` (its backward, in
tiles of components), and for block layers the element map scaled
by R both ways (:func:`block_map`, row by row: 3-4× faster than the element permutation
through ``index_put_``/``index_select``); and for the λ statistics of
:mod:`pomfx.renorm`, :func:`fold_channel_var` (one read of the layer's input instead of four
passes of torch reductions); and FG-SGD's jobs of small blocks (1×1 convs, small Linears),
:func:`block_step`: the whole step of a job in one loop over its blocks, where ~80 torch ops
per job cost far more than the arithmetic; the same loop steps kernel layers whose components
are too large to unroll (5×5, 7×7: :func:`kernel_blocks`), each component a block, after
:func:`block_bound` has shown that no group's step is capped.

numba is a dependency of pomfx; the unrolled kernel-layer kernels serve components of at most
``MAX_ELEMENTS`` elements, :func:`block_step` larger kernel components and the blocks that
:func:`block_fusable` admits, and the torch ops run otherwise (and for a capped step of a
large-kernel layer whose groups hold several components), on CUDA, under torch.compile (the
maps) or with ``POMFX_FUSED=0``.
Each kernel is compiled on first use (seconds; ~15 s for block_step) and kept in numba's on-disk
cache, under ``~/.cache/pomfx`` (or ``$POMFX_CACHE``).

Vectorisation is checked in the assembly (``vsqrtps``/``vfmadd…ps``): a load from a bool array in
the loop body stopped it (phase B 5× slower), hence the int8 ``ok``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

__all__ = [
    "MAX_ELEMENTS",
    "available",
    "block_bound",
    "block_fusable",
    "block_gamma",
    "block_map",
    "block_step",
    "enabled",
    "fold_channel_var",
    "groups_within",
    "kernel_blocks",
    "one_pass",
    "phase_a",
    "phase_b",
    "project",
    "scale_from_weight",
    "scale_to_weight",
    "step_size",
    "within",
]

_VERSION = 14  # of the generated source: bump when the generators change
_TILE = 32  # components per tile of scale_from_weight's loop
MAX_ELEMENTS = 16  # A·B up to which the unrolled kernels are used (3×3, 1×3, 3×1, 2×2, 1×5, ...)
_CACHE: dict = {}


def enabled() -> bool:
    """Whether the fused kernels may run here (numba importable, not ``POMFX_FUSED=0``)."""
    return numba is not None and os.environ.get("POMFX_FUSED", "1") != "0"


def available(rows: int, cols: int) -> bool:
    """Whether the unrolled small-matrix kernels serve (rows × cols) components here."""
    return rows * cols <= MAX_ELEMENTS and enabled()


# -- source generation --------------------------------------------------------------------------
def _masks() -> list[str]:
    return [
        "t = types[c]",
        "msp = one if t == 0 else zero",
        "mob = one if t == 1 else zero",
        "mst = one if t == 2 else zero",
        "meuc = one if t == 3 else zero",
    ]


def _remove_normal(a: int, b: int, x: str, y: str) -> list[str]:
    """Statements: y ← y − x·C(xᵀy), C = mst·sym + mob·ddiag + msp·tr·I (scalars x{i}_{j})."""
    out = []
    for k in range(b):
        for j in range(b):
            terms = " + ".join(f"{x}{i}_{k} * {y}{i}_{j}" for i in range(a))
            out.append(f"m{k}_{j} = {terms}")
    out.append("tr = " + " + ".join(f"m{j}_{j}" for j in range(b)))
    for k in range(b):
        for j in range(b):
            c = f"mst * half * (m{k}_{j} + m{j}_{k})"
            if k == j:
                c += f" + mob * m{k}_{k} + msp * tr"
            out.append(f"C{k}_{j} = {c}")
    for i in range(a):
        for j in range(b):
            terms = " + ".join(f"{x}{i}_{k} * C{k}_{j}" for k in range(b))
            out.append(f"{y}{i}_{j} = {y}{i}_{j} - ({terms})")
    return out


def _direction(a: int, b: int, mode: int) -> list[str]:
    """Statements: the step direction ``u{i}_{j}`` and ``qq = ‖u‖²`` of component c from its
    loaded ``x{i}_{j}`` and G, V at c (V written in modes 1 and 2; see :func:`phase_a`)."""
    body = [f"d{i}_{j} = cg[c] * G[{i}, {j}, c]" for i in range(a) for j in range(b)]
    body += _remove_normal(a, b, "x", "d")
    body += ["w = meuc * wd[c]", "qq = zero"]
    for i in range(a):
        for j in range(b):
            u = f"u{i}_{j}"
            body.append(f"dd = d{i}_{j} + w * x{i}_{j}")
            if mode == 0:
                body.append(f"{u} = dd")
            elif mode in (1, 3):  # heavy ball (mode 1 keeps it in V)
                body.append(f"{u} = mu_eff[c] * V[{i}, {j}, c] + dd")
                body += [f"V[{i}, {j}, c] = {u}"] if mode == 1 else []
            else:  # Nesterov
                body += [f"v = mu_eff[c] * V[{i}, {j}, c] + dd", f"V[{i}, {j}, c] = v", f"{u} = dd + mu * v"]
            body.append(f"qq += {u} * {u}")
    return body


def _retraction(a: int, b: int, y: str = "y") -> list[str]:
    """Statements: ``{y}{i}_{j} ← y·R⁻¹`` with R the Cholesky factor of the Gram matrix on st, the
    column norms on ob, the Frobenius norm on sp, I on euc."""
    body = []
    for k in range(b):
        for j in range(k, b):
            body.append(f"P{k}_{j} = " + " + ".join(f"{y}{i}_{k} * {y}{i}_{j}" for i in range(a)))
    body.append("fro = np.sqrt(np.maximum(" + " + ".join(f"P{j}_{j}" for j in range(b)) + ", tiny))")
    for j in range(b):  # Cholesky of mst·P + (1 − mst)·I
        for k in range(j, b):
            s = f"mst * P{j}_{k}" + (" + (one - mst)" if k == j else "")
            s += "".join(f" - r{p}_{j} * r{p}_{k}" for p in range(j))
            if k == j:
                body.append(f"r{j}_{j} = np.sqrt(np.maximum({s}, tiny))")
            else:
                body.append(f"r{j}_{k} = ({s}) / r{j}_{j}")
    for j in range(b):  # the diagonal: Cholesky on st, the norms elsewhere
        col = f"np.sqrt(np.maximum(P{j}_{j}, tiny))"
        body.append(f"r{j}_{j} = mst * r{j}_{j} + mob * {col} + msp * fro + meuc")
    for j in range(b):  # y ← y·R⁻¹
        for i in range(a):
            s = f"{y}{i}_{j}" + "".join(f" - {y}{i}_{k} * r{k}_{j}" for k in range(j))
            body.append(f"{y}{i}_{j} = ({s}) / r{j}_{j}")
    return body


def _retract(a: int, b: int, twice: bool, hq: str) -> list[str]:
    """Statements: the retraction of ``y`` (:func:`_retraction`); with ``twice``, done again on a
    Stiefel component whose squared step ``hq`` = h²‖u‖² is above ``restep`` (Cholesky-QR loses
    orthogonality as the Gram matrix I + ξᵀξ grows), chosen per component between values in
    registers (no branch: the loop still vectorises)."""
    body = _retraction(a, b)
    if twice:
        body += [f"z{i}_{j} = y{i}_{j}" for i in range(a) for j in range(b)]
        body += _retraction(a, b, "z")
        body.append(f"again = mst * ({hq}) > restep")  # (no 'and': a branch stops vectorising)
        body += [f"y{i}_{j} = z{i}_{j} if again else y{i}_{j}" for i in range(a) for j in range(b)]
    return body


def _loop(signature: str, body: list[str], head: tuple[str, ...] = (), tail: tuple[str, ...] = ()) -> str:
    """``def kernel(signature)``: one parallel loop over the components c with ``body``."""
    ind = " " * 8
    lines = [f"def kernel({signature}):", "    zero, one, half = F(0), F(1), F(0.5)"]
    lines += ["    " + t for t in head] + ["    for c in prange(X.shape[2]):"]
    return "\n".join(lines + [ind + t for t in body] + ["    " + t for t in tail]) + "\n"


def _source_a(a: int, b: int, mode: int) -> str:
    body = _masks() + [f"x{i}_{j} = X[{i}, {j}, c]" for i in range(a) for j in range(b)]
    body += _direction(a, b, mode)
    if mode != 1:  # the heavy ball's u is V itself
        body += [f"U[{i}, {j}, c] = u{i}_{j}" for i in range(a) for j in range(b)]
    body.append("q[c] = qq")
    return _loop("X, G, V, U, cg, mu_eff, wd, types, mu, q", body, ("mu = F(mu)",))


def _source_b(a: int, b: int, twice: bool, transport: bool) -> str:
    body = _masks()
    body.append("okc = ok[c] != 0")  # ok as int8: a bool array's loads stop LLVM vectorising
    body += [f"x{i}_{j} = X[{i}, {j}, c]" for i in range(a) for j in range(b)]
    body += [f"y{i}_{j} = x{i}_{j} - h[c] * U[{i}, {j}, c]" for i in range(a) for j in range(b)]
    body += _retract(a, b, twice, "h[c] * h[c] * q[c]")
    # selects between values already loaded: no conditional memory access (the loop vectorises)
    body += [f"X[{i}, {j}, c] = y{i}_{j} if okc else x{i}_{j}" for i in range(a) for j in range(b)]
    if transport:
        body += [f"p{i}_{j} = S[{i}, {j}, c]" for i in range(a) for j in range(b)]
        body += [f"v{i}_{j} = p{i}_{j}" for i in range(a) for j in range(b)]
        body += _remove_normal(a, b, "y", "v")
        body += [f"V[{i}, {j}, c] = v{i}_{j} if okc else p{i}_{j}" for i in range(a) for j in range(b)]
    return _loop("X, U, V, S, h, types, ok, tiny, q, restep", body, ("tiny, restep = F(tiny), F(restep)",))


def _source_one(a: int, b: int, momentum: bool, twice: bool) -> str:
    """Phases A and B in one pass, u kept in registers: the step of :func:`one_pass`."""
    body = _masks() + [f"x{i}_{j} = X[{i}, {j}, c]" for i in range(a) for j in range(b)]
    body += _direction(a, b, 3 if momentum else 0)
    body += [f"y{i}_{j} = x{i}_{j} - h * u{i}_{j}" for i in range(a) for j in range(b)]
    body += _retract(a, b, twice, "h * h * qq")
    body += [f"X[{i}, {j}, c] = y{i}_{j}" for i in range(a) for j in range(b)]
    if momentum:  # V ← u transported to the new point
        body += [f"v{i}_{j} = u{i}_{j}" for i in range(a) for j in range(b)]
        body += _remove_normal(a, b, "y", "v")
        body += [f"V[{i}, {j}, c] = v{i}_{j}" for i in range(a) for j in range(b)]
        body.append(
            "vn[c] = np.sqrt(" + " + ".join(f"v{i}_{j} * v{i}_{j}" for i in range(a) for j in range(b)) + ")"
        )
    head = ("h, tiny, restep = F(h), F(tiny), F(restep)",)
    return _loop("X, G, V, cg, mu_eff, wd, types, h, tiny, vn, restep", body, head)


def _source_bound(a: int, b: int, momentum: bool, cached: bool) -> str:
    """The bound e_c of :func:`within` into ``e2`` (e_c²); counts the components over their limit
    (``over``), not finite (``bad``), and on st over ``lim[4]`` (``twice``); ``cached``: ‖V_c‖
    read from ``vn`` instead of V."""
    sq = lambda t: " + ".join(f"{t}[{i}, {j}, c] * {t}[{i}, {j}, c]" for i in range(a) for j in range(b))  # noqa: E731
    e = "np.abs(cg[c]) * np.sqrt(" + sq("G") + ")"
    if momentum:
        e += " + mu_eff[c] * " + ("vn[c]" if cached else "np.sqrt(" + sq("V") + ")")
    body = [
        "t = types[c]",
        f"e = {e}",
        "ee = e * e",
        "e2[c] = ee",
        "bad += 0 if np.isfinite(e) else 1",
        "over += 0 if ee <= lim[t] else 1",
        "twice += 1 if (t == 2 and ee > lim[4]) else 0",
    ]
    head, tail = ("over = 0", "bad = 0", "twice = 0"), ("return over, bad, twice",)
    return _loop("X, G, V, cg, mu_eff, types, lim, vn, e2", body, head, tail)


_GROUPS_WITHIN = """
def kernel(e2, gid, lim_g, qg, g0, g1):
    for k in range(g0, g1):
        qg[k] = 0
    for c in range(e2.shape[0]):
        qg[gid[c]] += e2[c]
    for k in range(g0, g1):
        if not qg[k] <= lim_g[k]:
            return False
    return True
"""


# IEEE arithmetic, no fast-math flags: LLVM contracts products into FMAs (and turns divisions
# into reciprocals) differently in a loop's vectorised body, its scalar remainder and another
# kernel's loop, so with "contract" or "arcp" a component's result depended on where its
# thread's range ended (on the thread count) and ‖v_c‖ computed by two kernels differed in the
# last bit; without them every kernel gives each component the same bits. The kernels are
# memory bound: no slower (RESULTS.md, session 12).
_FASTMATH = False
# ... except in the λ moments, sums whose order and split into vectorised body and remainder are
# fixed by the shape alone (a thread per channel, or per block of rows), never by the thread
# count: there FMAs change no guarantee and make the kernel 1.3× faster
_SERIAL_FASTMATH = {"contract"}


def _cache_dir() -> Path:
    root = os.environ.get("POMFX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pomfx"
    )
    return Path(root) / f"fused-{_VERSION}-numba{numba.__version__}"


def _source_w(a: int, b: int, transpose: bool) -> str:
    """W[n] = s[n]·ω[:, :, n] (transposed for wide kernels) into W (N, A·B): ω's structure-of-arrays
    storage to the weight in one pass (its backward: :func:`_source_g`; the forward in tiles of
    16 components, as there, was no faster over whole training steps)."""
    ind = " " * 8
    body = ["sc = s[c]"]
    for i in range(a):
        for j in range(b):
            k = j * a + i if transpose else i * b + j
            body.append(f"W[c, {k}] = sc * X[{i}, {j}, c]")
    head = "def kernel(X, W, s):\n    for c in prange(X.shape[2]):\n"
    return head + "\n".join(ind + t for t in body) + "\n"


def _source_g(a: int, b: int, transpose: bool) -> str:
    """ω's gradient from W's: ``O[r, t, l] = s[t, l]·G[t, l, k(r)]`` for tiles of ``_TILE``
    components (G (T, _TILE, A·B), the weight's gradient; O (A·B, T, _TILE), storage rows
    r = i·B + j; k the weight column of (i, j)). Each tile reads whole weight rows and writes
    runs of contiguous values per storage row, which vectorises; torch's strided multiply (one
    output row at a time over all of G) or a loop over single components run 2-3× slower;
    tiles of 16 components (a cache line per storage row) ran 5-13 % slower than tiles of 32
    in training steps, and tiles of 64 no faster."""
    ind = " " * 8
    body = []
    for i in range(a):
        for j in range(b):
            k = j * a + i if transpose else i * b + j
            body += [f"for l in range({_TILE}):", f"    O[{i * b + j}, t, l] = s[t, l] * G[t, l, {k}]"]
    head = "def kernel(G, O, s):\n    for t in prange(G.shape[0]):\n"
    return head + "\n".join(ind + line for line in body) + "\n"


def _compiled(key: tuple, source, dtype: np.dtype, parallel: bool = True, fastmath=None):
    """The kernel for ``key``: compiled from ``source()`` on first use in a process. The source is
    written to a module in the user's cache folder (atomically: ranks may race) so that numba's
    own on-disk cache can keep the machine code from one process to the next. ``fastmath``:
    numba's flags, ``_FASTMATH`` unless given."""
    fn = _CACHE.get(key)
    if fn is None:
        name = "k_" + "_".join(str(k).replace("<", "").replace(">", "") for k in key)
        folder = _cache_dir()
        path = folder / f"{name}.py"
        text = f"import numpy as np\nfrom numba import njit, prange\nF = np.{dtype.name}\n\n{source()}"
        try:
            if not path.exists() or path.read_text() != text:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{name}.{os.getpid()}.tmp"
                tmp.write_text(text)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(f"pomfx_fused_{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # numba's cache re-imports it by name
            spec.loader.exec_module(module)
            kernel, cache = module.kernel, True
        except OSError:  # no writable cache folder: compile in memory
            scope: dict = {}
            exec(compile(text, f"<pomfx.fused {name}>", "exec"), scope)
            kernel, cache = scope["kernel"], False
        flags = _FASTMATH if fastmath is None else fastmath
        jit = numba.njit(parallel=parallel, nogil=True, error_model="numpy", fastmath=flags, cache=cache)
        fn = _CACHE[key] = jit(kernel)
    return fn


# -- entry points -------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _run(fn, *args):
    """``fn(*args)`` on as many numba threads as torch uses, torch's thread count unchanged.

    numba's OpenMP threading layer (its default where available) shares torch's OpenMP runtime:
    it is fast here (no second pool spinning against torch's), but starting it resets the OpenMP
    thread count, so a model trained with ``torch.set_num_threads(1)`` would run its convolutions
    on every core after the first step (and round differently from a run that never stepped).
    The count is put back after each call."""
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    out = fn(*args)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return out


def phase_a(X, G, V, U, cg, mu_eff, wd, types, mode: int, mu: float, q) -> None:
    """Phase A in place on V (modes 1, 2), U (modes 0, 2) and ``q`` (N,); X, G, V, U are (A, B, N).
    ``mode``: 0 no momentum, 1 heavy ball, 2 Nesterov; ``cg``, ``mu_eff``, ``wd``: (N,)."""
    a, b, _ = X.shape
    x = _np(X)
    fn = _compiled(("a", a, b, mode, x.dtype.str), lambda: _source_a(a, b, mode), x.dtype)
    v, u = _np(X if V is None else V), _np(X if U is None else U)
    _run(fn, x, _np(G), v, u, _np(cg), _np(mu_eff), _np(wd), _np(types), mu, _np(q))


def phase_b(X, U, V, h, types, ok, twice: bool, transport: bool, S=None, q=None, restep: float = 0.0) -> None:
    """Phase B in place on X (and V when ``transport``): retraction with step ``h`` (N,) along U,
    with ``twice`` a second one on Stiefel components whose h²·``q`` (q: phase A's ‖u_c‖², N)
    is above ``restep``; transport into V of ``S`` (default V itself); components with ``ok``
    False untouched."""
    a, b, _ = X.shape
    x = _np(X)
    key = ("b", a, b, twice, transport, x.dtype.str)
    fn = _compiled(key, lambda: _source_b(a, b, twice, transport), x.dtype)
    v = _np(X if V is None else V)
    src = v if S is None else _np(S)
    ok8 = _np(ok.view(torch.int8))
    qc = _np(h if q is None else q)
    _run(fn, x, _np(U), v, src, _np(h), _np(types), ok8, float(torch.finfo(X.dtype).tiny), qc, float(restep))


def within(X, G, V, cg, mu_eff, types, lim, e2, vnorm=None, groups=None) -> int:
    """How the one pass (:func:`one_pass`) can take a layer's step: 0 not (some group's step size
    may be capped, or a gradient is not finite), 1 with one retraction, 2 with the second
    Cholesky-QR where a Stiefel component's step is large. By the bound

        e_c = |cg_c|·‖G_c‖ + μ_c·‖V_c‖ ≥ ‖u_c‖

    of phase A's step direction u = μv + P_ω(cg·g) on constrained components (the tangent
    projection P_ω is orthogonal, so it does not lengthen cg·g): every e_c must be finite, and
    each group g must have Σ_{c∈g} e_c² ≤ ``lim_g[g]``; 2 where e_c² > ``lim[4]`` on some st
    component. The groups are shown per component first, by e_c² ≤ ``lim[type_c]`` (its share
    of its group's limit; euc: no limit), in one parallel pass reading G (and V) that also
    writes e_c² into ``e2`` (N,); where some component is over its share, by the group sums
    (``groups = (gid, lim_g, qg, (g0, g1))``: each component's group, the (G,) limits, a (G,)
    workspace, the range of the groups here: :func:`groups_within`; None: not tried). V None:
    no momentum; ``vnorm`` (N,): ‖V_c‖ as :func:`one_pass` left it, read instead of V."""
    a, b, _ = X.shape
    x = _np(X)
    momentum, cached = V is not None, vnorm is not None
    key = ("c", a, b, momentum, cached, x.dtype.str)
    fn = _compiled(key, lambda: _source_bound(a, b, momentum, cached), x.dtype)
    vn = _np(vnorm) if cached else x.reshape(-1)
    v = _np(X if V is None else V)
    over, bad, twice = _run(fn, x, _np(G), v, _np(cg), _np(mu_eff), _np(types), _np(lim), vn, _np(e2))
    if bad or (over and (groups is None or not groups_within(e2, *groups))):
        return 0
    return 2 if twice else 1


def groups_within(e2, gid, lim_g, qg, groups: tuple[int, int]) -> bool:
    """Whether Σ_{c∈g} e2_c ≤ ``lim_g[g]`` for every group g in ``groups = (g0, g1)``, the range
    that holds the groups ``gid[c]`` of the components here (``qg``: a workspace over the groups).
    Serial: the groups are scattered over the components; one loop over them, two over the
    groups."""
    x = _np(e2)
    fn = _compiled(("gw", x.dtype.str), lambda: _GROUPS_WITHIN, x.dtype, parallel=False)
    return bool(fn(x, _np(gid), _np(lim_g), _np(qg), int(groups[0]), int(groups[1])))


def one_pass(
    X, G, V, cg, mu_eff, wd, types, h: float, vnorm=None, twice: bool = False, restep: float = 0.0
) -> None:
    """Phases A and B in one pass with one step size ``h`` for every component: u = μ_c·V + d
    (d as in phase A; V None: u = d), ω ← (ω − h·u)·R⁻¹ (with ``twice``, again on Stiefel
    components with h²‖u_c‖² > ``restep``), V ← u transported, and ``vnorm`` (N,) ← ‖V_c‖ with
    momentum. Reads X, G and V once and writes X and V: the cost of a plain SGD step's passes.
    The caller knows that no group's step size is capped (:func:`within`), so this is the
    two-phase step, bit for bit (IEEE arithmetic in every kernel: ``_FASTMATH``)."""
    a, b, _ = X.shape
    x = _np(X)
    momentum = V is not None
    key = ("o", a, b, momentum, twice, x.dtype.str)
    fn = _compiled(key, lambda: _source_one(a, b, momentum, twice), x.dtype)
    v = _np(X if V is None else V)
    vn = x.reshape(-1) if vnorm is None else _np(vnorm)
    tiny = float(torch.finfo(X.dtype).tiny)
    _run(fn, x, _np(G), v, _np(cg), _np(mu_eff), _np(wd), _np(types), float(h), tiny, vn, float(restep))


_STEP_SIZE = """
def kernel(q, gid, norm_g, types, lr, radius, qg, h):
    lr = F(lr)
    radius = F(radius)
    for k in range(qg.shape[0]):
        qg[k] = 0
    for c in range(q.shape[0]):
        if not np.isfinite(q[c]):
            return F(-1)
        qg[gid[c]] += q[c]
    for k in range(qg.shape[0]):
        t = F(1) / max(np.sqrt(qg[k]) * lr, F(1e-30))
        qg[k] = min(t * norm_g[k] * radius, F(1))
    big = F(0)
    for c in range(q.shape[0]):
        f = F(1) if types[c] == 3 else qg[gid[c]]
        hc = f * lr
        h[c] = hc
        big = max(big, hc * hc * q[c])
    return big
"""


def step_size(q, gid, norm_g, types, lr: float, radius: float, qg, h) -> float:
    """FG-SGD's step size of every component into ``h`` (N,), from ``q = ‖u_c‖²`` (N,)::

        h_c = lr · min(1, δ‖ω_g‖ / (lr·‖u_g‖)),  ‖u_g‖² = Σ_{c∈g} q_c   (lr on euc components)

    for group ``gid[c]``, ``norm_g = ‖ω_g‖`` (G,), δ = ``radius``; ``qg`` is a (G,) workspace.
    Returns max_c h_c²·q_c (the largest squared step), or -1 if some q_c is not finite (a
    non-finite gradient: ``h`` is then not written). One serial loop each way: a few hundred
    thousand components cost less than the dozen torch ops it replaces."""
    x = _np(q)
    fn = _compiled(("h", x.dtype.str), lambda: _STEP_SIZE, x.dtype, parallel=False)
    return float(fn(x, _np(gid), _np(norm_g), _np(types), float(lr), float(radius), _np(qg), _np(h)))


def scale_to_weight(X, s, transpose: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W (N, A·B)`` with ``W[n] = s[n]·X[:, :, n]`` (flattened; its transpose when ``transpose``),
    into ``out`` (contiguous (N, A·B)) when given."""
    a, b, n = X.shape
    x = _np(X)
    fn = _compiled(("w", a, b, transpose, x.dtype.str), lambda: _source_w(a, b, transpose), x.dtype)
    out = X.new_empty(n, a * b) if out is None else out
    _run(fn, x, _np(out), _np(s))
    return out


def scale_from_weight(
    G: torch.Tensor, s: torch.Tensor, a: int, b: int, transpose: bool, out: torch.Tensor
) -> None:
    """``out (A, B, N)[i, j, n] = s[n]·G[n, k]``: the backward of :func:`scale_to_weight`, from
    ``G (N, A·B)`` contiguous; ``_TILE`` components at a time, the last ``N mod _TILE`` by
    torch. (The tiles are numpy views: numpy splits an axis of unit stride without a copy, at
    a fraction of the cost of torch's views.)"""
    n, k = G.shape[0], a * b
    whole = n - n % _TILE
    o = out.view(k, n)
    if whole:
        g = _np(G)
        key = ("g", a, b, transpose, _TILE, g.dtype.str)
        fn = _compiled(key, lambda: _source_g(a, b, transpose), g.dtype)
        tiles = whole // _TILE
        _run(
            fn,
            g[:whole].reshape(tiles, _TILE, k),
            _np(o)[:, :whole].reshape(k, tiles, _TILE),
            _np(s)[:whole].reshape(tiles, _TILE),
        )
    if whole < n:
        rest = G[whole:].view(-1, b, a).transpose(1, 2) if transpose else G[whole:].view(-1, a, b)
        torch.mul(rest.reshape(-1, k).t(), s[whole:], out=o[:, whole:])


_PROJECT = """
def kernel(W, s, types, X, transpose, eps, todo):
    a, b, _ = X.shape
    n, block = todo.shape[0], 64
    for blk in prange((n + block - 1) // block):
        y = np.empty((a, b), np.float64)
        v = np.empty(a, np.float64)
        coef = np.empty(b, np.float64)
        for e in range(blk * block, min(n, blk * block + block)):
            c = todo[e]
            sc = 1.0 / np.float64(s[c])
            for i in range(a):
                for j in range(b):
                    y[i, j] = np.float64(W[c, j * a + i if transpose else i * b + j]) * sc
            t = types[c]
            if t == 0:  # sphere: y / ||y||_F; entry (0, 0) if the norm is not positive
                nn = 0.0
                for i in range(a):
                    for j in range(b):
                        nn += y[i, j] * y[i, j]
                nn = np.sqrt(nn)
                r = 1.0 / nn
                for i in range(a):
                    for j in range(b):
                        y[i, j] = y[i, j] * r if nn > 0 else (1.0 if i == 0 and j == 0 else 0.0)
            elif t == 1:  # oblique: every column over its norm; e_0 for a column without one
                for j in range(b):
                    nn = 0.0
                    for i in range(a):
                        nn += y[i, j] * y[i, j]
                    nn = np.sqrt(nn)
                    r = 1.0 / nn
                    for i in range(a):
                        y[i, j] = y[i, j] * r if nn > 0 else (1.0 if i == 0 else 0.0)
            elif t == 2:  # Stiefel: CGS2, vanishing columns completed
                big = 0.0
                for j in range(b):
                    nn = 0.0
                    for i in range(a):
                        nn += y[i, j] * y[i, j]
                    big = max(big, nn)
                tol = np.sqrt(big) * (eps * 4 * a)
                for j in range(b):
                    for i in range(a):
                        v[i] = y[i, j]
                    _orthogonalize(y, v, j, coef)
                    nn = _norm(v)
                    if nn <= tol:  # the basis vector least covered by the columns so far
                        best, at = np.inf, 0
                        for i in range(a):
                            cover = 0.0
                            for k in range(j):
                                cover += y[i, k] * y[i, k]
                            if cover < best:
                                best, at = cover, i
                        for i in range(a):
                            v[i] = 1.0 if i == at else 0.0
                        _orthogonalize(y, v, j, coef)
                        nn = _norm(v)
                    r = 1.0 / nn
                    for i in range(a):
                        y[i, j] = v[i] * r
            for i in range(a):
                for j in range(b):
                    X[i, j, c] = y[i, j]


@njit(inline="always")
def _orthogonalize(y, v, j, coef):
    # v minus its projection on the first j columns of y, twice (classical Gram-Schmidt)
    a = v.shape[0]
    for _ in range(2 if j else 0):
        for k in range(j):
            d = 0.0
            for i in range(a):
                d += y[i, k] * v[i]
            coef[k] = d
        for k in range(j):
            for i in range(a):
                v[i] -= coef[k] * y[i, k]


@njit(inline="always")
def _norm(v):
    nn = 0.0
    for i in range(v.shape[0]):
        nn += v[i] * v[i]
    return np.sqrt(nn)
"""


def _source_p(a: int, b: int, transpose: bool) -> str:
    """The projection of every component, unrolled for (A, B): sphere, oblique, and Stiefel by
    CGS2; a component whose norm (or a column's, after orthogonalisation) is not above the
    tolerance is flagged in ``redo`` for the general kernel (:data:`_PROJECT`)."""
    ind = " " * 8
    body = ["sc = one / np.float64(s[c])", "t = types[c]", "bad = 0"]
    for i in range(a):
        for j in range(b):
            k = j * a + i if transpose else i * b + j
            body.append(f"y{i}_{j} = np.float64(W[c, {k}]) * sc")
    cols = [[f"y{i}_{j}" for i in range(a)] for j in range(b)]

    def sq(names):
        return " + ".join(f"{n} * {n}" for n in names)

    def normalize(c, tol):  # the column over its norm; flagged unless the norm is above tol
        return [f"    nn = np.sqrt({sq(c)})", "    r = one / nn", *(f"    {n} *= r" for n in c),
                f"    bad = bad if nn > {tol} else 1"]  # fmt: skip

    body.append("if t == 0:")
    body += normalize([n for c in cols for n in c], "zero")
    body.append("elif t == 1:")
    for c in cols:
        body += normalize(c, "zero")
    body += ["elif t == 2:", "    big = zero"]
    body += [f"    big = max(big, {sq(c)})" for c in cols]
    body.append("    tol = np.sqrt(big) * tol4a")
    for j, c in enumerate(cols):
        for _ in range(2 if j else 0):  # CGS: every coefficient against the same v, twice
            for k in range(j):
                body.append(f"    f{k} = " + " + ".join(f"{x} * {v}" for x, v in zip(cols[k], c)))
            for k in range(j):
                body += [f"    {v} -= f{k} * {x}" for x, v in zip(cols[k], c)]
        body += normalize(c, "tol")
    body += [f"X[{i}, {j}, c] = y{i}_{j}" for i in range(a) for j in range(b)]
    body.append("redo[c] = bad")
    return (
        "def kernel(W, s, types, X, eps, redo):\n"
        "    zero, one = 0.0, 1.0\n"
        f"    tol4a = eps * {4 * a}\n"
        "    for c in prange(X.shape[2]):\n" + "\n".join(ind + t for t in body) + "\n"
    )


def project(
    W: torch.Tensor, s: torch.Tensor, types: torch.Tensor, a: int, b: int, transpose: bool
) -> torch.Tensor:
    """The kernels ``W (N, A·B)`` (weight order; each component transposed when ``transpose``)
    divided by ``s`` (N,) and projected onto their manifolds (``types``), as the structure of
    arrays ``(A, B, N)`` that :class:`pomfx.parametrization.POM` stores. In float64, with the
    formulas of the torch projections: the sphere and oblique normalisations (a zero norm gives
    the first basis vector) and on Stiefel the Q factor of :func:`pomfx.manifolds._gram_schmidt`
    (CGS2; a vanishing column is replaced by the basis vector least covered by the previous
    ones). One unrolled parallel pass; the rare components that need a repair (or are not
    finite) are redone by the general kernel, :data:`_PROJECT`."""
    w = _np(W)
    eps = float(torch.finfo(W.dtype).eps)
    fast = _compiled(("p", a, b, transpose, w.dtype.str), lambda: _source_p(a, b, transpose), w.dtype)
    out = W.new_empty(a, b, W.shape[0])
    redo = torch.empty(W.shape[0], dtype=torch.int8)
    _run(fast, w, _np(s), _np(types), _np(out), eps, _np(redo))
    todo = redo.nonzero().view(-1)
    if len(todo):
        general = _compiled(("p", w.dtype.str), lambda: _PROJECT, w.dtype)
        _run(general, w, _np(s), _np(types), _np(out), transpose, eps, _np(todo))
    return out


# -- the element maps of block layouts ----------------------------------------------------------
# Row by row (:class:`pomfx.layout.BlockMap`), tiles of 8 rows at a time: every weight row is
# read or written once, whole and in order, through a small buffer in the row's storage order;
# storage is copied in runs (blocks stored with the weight's rows as rows) or as 8-row tiles of
# contiguous columns (blocks stored transposed). The element permutation ``inverse`` put nearly
# every access on another cache line: 3-4× slower (benchmarks/map_cost.py).
_BLOCK_MAP = """
T = 8


@njit(inline="always")
def _tiled(base, stride, t0, j, rows):
    # rows t0.. of this chunk are the adjacent rows of one transposed block: storage tiles
    st = stride[t0, j]
    if st == 1 or rows < T:
        return False
    for r in range(1, T):
        if base[t0 + r, j] != base[t0, j] + r or stride[t0 + r, j] != st:
            return False
    return True


@njit(inline="always")
def _move(store, buf, base, stride, t0, j, r0, r1, k0, k1, load):
    # chunk j (positions k0..k1) of tile rows r0..r1 from storage into buf (load), or back
    if r0 == 0 and _tiled(base, stride, t0, j, r1):
        st = stride[t0, j]
        for k in range(k0, k1):
            q = base[t0, j] + (k - k0) * st
            for r in range(T):
                if load:
                    buf[r, k] = store[q + r]
                else:
                    store[q + r] = buf[r, k]
        return
    for r in range(r0, r1):
        st = stride[t0 + r, j]
        q = base[t0 + r, j] - k0 * st
        if st == 1 and load:
            buf[r, k0:k1] = store[q + k0 : q + k1]
        elif st == 1:
            store[q + k0 : q + k1] = buf[r, k0:k1]
        else:
            for k in range(k0, k1):
                if load:
                    buf[r, k] = store[q + k * st]
                else:
                    store[q + k * st] = buf[r, k]


def kernel(src, dst, scale, row_term, col_pos, bounds, base, stride, parts):
    n_rows = row_term.shape[0] // col_pos.shape[0]
    nc = col_pos.shape[1]
    nt = row_term.shape[0]
    chunks = bounds.shape[0] - 1
    tiles = (nt + T - 1) // T
    parts = max(1, min(tiles, parts))
    for part in prange(parts):
        buf = np.empty((T, nc), dtype=src.dtype)
        for tile in range(part * tiles // parts, (part + 1) * tiles // parts):
            t0 = tile * T
            rows = min(T, nt - t0)
            tiled = False
            for j in range(chunks):
                tiled = tiled or _tiled(base, stride, t0, j, rows)
                {load}
            for r in range(rows):
                t = t0 + r
                cp = col_pos[t // n_rows]
                w = {weight}[row_term[t] : row_term[t] + nc]
                s = scale[row_term[t] : row_term[t] + nc]
                br = buf[r]
                for c in range(nc):
                    {element}
                for j in range(0 if tiled else {chunks_out}):  # runs: out while the row is in L1
                    _move(dst, buf, base, stride, t0, j, r, r + 1, bounds[j], bounds[j + 1], False)
            for j in range({chunks_out} if tiled else 0):
                _move(dst, buf, base, stride, t0, j, 0, rows, bounds[j], bounds[j + 1], False)
"""
_LOAD = "_move(src, buf, base, stride, t0, j, 0, rows, bounds[j], bounds[j + 1], True)"
_STORE = {"load": "pass", "weight": "src", "chunks_out": "chunks"}
_BLOCK_BODY = {  # storage -> weight: load the tile, write the rows; weight -> storage: the reverse
    "weight": {"load": _LOAD, "weight": "dst", "element": "w[c] = br[cp[c]] * s[c]", "chunks_out": "0"},
    "storage": {**_STORE, "element": "br[cp[c]] = w[c] * s[c]"},
    "storage_div": {**_STORE, "element": "br[cp[c]] = w[c] / s[c]"},
}


def block_map(
    src: torch.Tensor, bmap, scale: torch.Tensor, to: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A block layout's element map with R, flat, one parallel pass over the weight's rows:
    ``to="weight"``: ``W = R ⊙ ω`` (ω in storage order, the forward); ``"storage"``: ``R ⊙ ∇W``
    in storage order (its backward); ``"storage_div"``: ``W / R`` in storage order (ω from W).
    Into ``out`` (flat, contiguous) when given."""
    x = _np(src)
    fn = _compiled(("bm", to, x.dtype.str), lambda: _BLOCK_MAP.format_map(_BLOCK_BODY[to]), x.dtype)
    out = src.new_empty(src.shape[0]) if out is None else out
    parts = 4 * max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # a few per thread
    _run(fn, x, _np(out), _np(scale), bmap.row_term, bmap.col_pos, bmap.bounds, bmap.base, bmap.stride, parts)
    return out


# -- the scales of block layouts --------------------------------------------------------------
_GAMMA = """
def kernel(gtab, oid, iid, kappa, transposed, out):
    groups, d_per = oid.shape
    c_per = iid.shape[1]
    k = F(kappa)
    for t in prange(groups * d_per):
        g = t // d_per
        d = t % d_per
        row = gtab[g, oid[g, d]]
        for c in range(c_per):
            v = row[iid[g, c]] * k
            if transposed:
                out[g, c, d] = v
            else:
                out[g, d, c] = v
"""


def block_gamma(
    gtab: np.ndarray, oid: np.ndarray, iid: np.ndarray, kappa: float, transposed: bool
) -> torch.Tensor:
    """``κ·γ`` of every weight element of a block layout from its tables (γ per block
    (G, n_out, n_in), the chunk of each output (G, D_g) and input channel (G, C)), float32,
    shaped (G, D_g, C), or (G, C, D_g) for a ConvTranspose weight: one parallel pass, where numpy's
    gather and the multiply by κ were two single-threaded ones."""
    groups, d_per = oid.shape
    c_per = iid.shape[1]
    out = torch.empty((groups, c_per, d_per) if transposed else (groups, d_per, c_per), dtype=torch.float32)
    fn = _compiled(("gamma", gtab.dtype.str), lambda: _GAMMA, gtab.dtype)
    _run(fn, gtab, oid, iid, float(kappa), bool(transposed), _np(out))
    return out


# -- the λ statistics of the input channels --------------------------------------------------
# Both kernels sum d = x − x[0, c, 0] and d² per channel in float64 (no cancellation when the mean
# is large against the spread), then fold var = (Σd² − (Σd)²/n)/n into the running value:
# rv ← rv + w·(var − rv).
_FOLD = """
    for c in prange(channels):
        var = max((s2[c] - s1[c] * s1[c] / n) / n, 0.0)
        rv[c] = rv[c] + w * (var - rv[c])
"""

_MOMENTS = (
    """
def kernel(x, rv, w):
    outer, channels, inner = x.shape
    n = outer * inner
    s1 = np.empty(channels)
    s2 = np.empty(channels)
    for c in prange(channels):
        ref = np.float64(x[0, c, 0])
        a0 = a1 = a2 = a3 = 0.0
        b0 = b1 = b2 = b3 = 0.0
        for o in range(outer):
            i = 0
            while i + 4 <= inner:
                d0 = np.float64(x[o, c, i]) - ref
                d1 = np.float64(x[o, c, i + 1]) - ref
                d2 = np.float64(x[o, c, i + 2]) - ref
                d3 = np.float64(x[o, c, i + 3]) - ref
                a0 += d0
                a1 += d1
                a2 += d2
                a3 += d3
                b0 += d0 * d0
                b1 += d1 * d1
                b2 += d2 * d2
                b3 += d3 * d3
                i += 4
            while i < inner:
                d0 = np.float64(x[o, c, i]) - ref
                a0 += d0
                b0 += d0 * d0
                i += 1
        s1[c] = (a0 + a1) + (a2 + a3)
        s2[c] = (b0 + b1) + (b2 + b3)
"""
    + _FOLD
)

_MOMENTS_ROWS = (
    """
def kernel(x, rv, w, rows):
    n, channels = x.shape
    parts = (n + rows - 1) // rows
    p1 = np.zeros((parts, channels))
    p2 = np.zeros((parts, channels))
    ref = x[0].astype(np.float64)
    for k in prange(parts):
        for o in range(k * rows, min(n, k * rows + rows)):
            for c in range(channels):
                d = np.float64(x[o, c]) - ref[c]
                p1[k, c] += d
                p2[k, c] += d * d
    s1 = np.empty(channels)
    s2 = np.empty(channels)
    for c in prange(channels):
        a = 0.0
        b = 0.0
        for k in range(parts):
            a += p1[k, c]
            b += p2[k, c]
        s1[c] = a
        s2[c] = b
"""
    + _FOLD
)


def fold_channel_var(x: torch.Tensor, running_var: torch.Tensor, weight: float) -> None:
    """``running_var ← running_var + weight·(var − running_var)``, var the variance of each
    channel of ``x`` (outer, C, inner) over the other two dims. One read of ``x``, in float64,
    in an order fixed by the shape alone (deterministic for any thread count): a thread per
    channel, or, for channels-last ``(M, C, 1)`` (a Linear's input), per block of rows with
    partial sums. 5-20× faster than the torch reductions it replaces."""
    a = _np(x)
    rv = _np(running_var)
    if x.shape[2] == 1:
        fn = _compiled(("mr", a.dtype.str), lambda: _MOMENTS_ROWS, a.dtype, fastmath=_SERIAL_FASTMATH)
        _run(fn, a[:, :, 0], rv, float(weight), max(16, -(-x.shape[0] // 256)))
    else:
        fn = _compiled(("m", a.dtype.str), lambda: _MOMENTS, a.dtype, fastmath=_SERIAL_FASTMATH)
        _run(fn, a, rv, float(weight))


# -- FG-SGD on small blocks ---------------------------------------------------------------------
# One job of block components (n, A, B), each of its own manifold (``types`` as in _TYPE_CODE),
# the whole step of pomfx.block_job.update per block, in float64 scratch: a block is its own group,
# so its step size needs no reduction across blocks. A block whose normal part (or, on euc,
# gradient) is not finite is left exactly as it was.
_BLOCK_STEP = """
@njit(inline="always")
def _sub_sym(x, y, out, c):
    # out ← c·(y − x·sym(xᵀy)) (out may be y); whether xᵀy is finite
    A, B = x.shape
    m = np.zeros((B, B))
    for i in range(A):
        for p in range(B):
            xp = x[i, p]
            for q in range(B):
                m[p, q] += xp * y[i, q]
    ok = True
    for p in range(B):
        for q in range(B):
            ok = ok and np.isfinite(m[p, q])
    for i in range(A):
        for q in range(B):
            s = 0.0
            for p in range(B):
                s += x[i, p] * 0.5 * (m[p, q] + m[q, p])
            out[i, q] = c * (y[i, q] - s)
    return ok


def kernel(X, G, V, S, srow, types, cg, wdk, norm_g, mu, nesterov, lr, radius, restep):
    n, A, B = X.shape
    tiny = 1e-300
    for k in prange(n):
        typ = types[k]
        x = np.empty((A, B))
        g = np.empty((A, B))
        for i in range(A):
            for j in range(B):
                x[i, j] = X[k, i, j]
                g[i, j] = np.float64(G[k, i, j]) * np.float64(S[k, i] if srow else S[k, j])
        c = cg[k]
        d = np.empty((A, B))
        ok = True
        if typ == 0:  # sphere: d = c·(g − ⟨x, g⟩x)
            a = 0.0
            for i in range(A):
                for j in range(B):
                    a += x[i, j] * g[i, j]
            ok = np.isfinite(a)
            for i in range(A):
                for j in range(B):
                    d[i, j] = c * (g[i, j] - a * x[i, j])
        elif typ == 1:  # oblique: per column
            for j in range(B):
                a = 0.0
                for i in range(A):
                    a += x[i, j] * g[i, j]
                ok = ok and np.isfinite(a)
                for i in range(A):
                    d[i, j] = c * (g[i, j] - a * x[i, j])
        elif typ == 2:  # Stiefel: d = c·(g − x·sym(xᵀg))
            ok = _sub_sym(x, g, d, c)
        else:  # euc: d = c·g + wd·k·x
            for i in range(A):
                for j in range(B):
                    ok = ok and np.isfinite(g[i, j])
                    d[i, j] = c * g[i, j] + wdk[k] * x[i, j]
        if not ok:
            continue
        # momentum (heavy ball: u = v = μv + d; Nesterov: v = μv + d, u = d + μv)
        u = d
        v = np.empty((A, B))
        if mu != 0.0:
            for i in range(A):
                for j in range(B):
                    v[i, j] = mu * V[k, i, j] + d[i, j]
            if nesterov:
                u = np.empty((A, B))
                for i in range(A):
                    for j in range(B):
                        u[i, j] = d[i, j] + mu * v[i, j]
            else:
                u = v
        if typ == 3:
            for i in range(A):
                for j in range(B):
                    X[k, i, j] = x[i, j] - lr * u[i, j]
                    if mu != 0.0:
                        V[k, i, j] = v[i, j]
            continue
        # step size: the geodesic radius cap of the block (its own group)
        qc = np.zeros(B)
        for i in range(A):
            for j in range(B):
                qc[j] += u[i, j] * u[i, j]
        q = qc.sum()
        f = min(1.0, radius * norm_g[k] / max(np.sqrt(q) * lr, 1e-30))
        h = f * lr
        y = np.empty((A, B))
        for i in range(A):
            for j in range(B):
                y[i, j] = x[i, j] - h * u[i, j]
        if typ == 0:
            nn = 0.0
            for i in range(A):
                for j in range(B):
                    nn += y[i, j] * y[i, j]
            inv = 1.0 / np.sqrt(nn)
            for i in range(A):
                for j in range(B):
                    y[i, j] *= inv
            if mu != 0.0:  # transport: v − ⟨y, v⟩y (for u = v: ⟨y, v⟩ = −h‖v‖²/‖x + ξ‖)
                t = 0.0
                if nesterov:
                    for i in range(A):
                        for j in range(B):
                            t -= y[i, j] * v[i, j]
                else:
                    t = h * q * inv
                for i in range(A):
                    for j in range(B):
                        v[i, j] += t * y[i, j]
        elif typ == 1:
            for j in range(B):
                nn = 0.0
                for i in range(A):
                    nn += y[i, j] * y[i, j]
                inv = 1.0 / np.sqrt(nn)
                t = 0.0
                for i in range(A):
                    y[i, j] *= inv
                    t -= y[i, j] * v[i, j] if mu != 0.0 and nesterov else 0.0
                if mu != 0.0:
                    if not nesterov:
                        t = h * qc[j] * inv
                    for i in range(A):
                        v[i, j] += t * y[i, j]
        else:  # Stiefel: Cholesky-QR, again unless Gershgorin's discs bound κ(yᵀy) by 1 + restep
            r = np.zeros((B, B))
            for rep in range(2):
                m = np.zeros((B, B))
                for i in range(A):
                    for p in range(B):
                        yp = y[i, p]
                        for q2 in range(p, B):
                            m[p, q2] += yp * y[i, q2]
                lo = np.inf
                hi = 0.0
                for p in range(B):
                    rs = 0.0
                    for q2 in range(B):
                        rs += abs(m[min(p, q2), max(p, q2)])
                    hi = max(hi, rs)
                    lo = min(lo, 2.0 * m[p, p] - rs)
                for j in range(B):  # upper Cholesky factor, positive diagonal
                    for q2 in range(j, B):
                        s = m[j, q2]
                        for p in range(j):
                            s -= r[p, j] * r[p, q2]
                        if q2 == j:
                            r[j, j] = np.sqrt(max(s, tiny))
                        else:
                            r[j, q2] = s / r[j, j]
                for i in range(A):  # y ← y·R⁻¹
                    for j in range(B):
                        s = y[i, j]
                        for p in range(j):
                            s -= y[i, p] * r[p, j]
                        y[i, j] = s / r[j, j]
                if rep == 0 and hi <= (1.0 + restep) * lo:
                    break
            if mu != 0.0:  # transport: v − y·sym(yᵀv)
                _sub_sym(y, v, v, 1.0)
        for i in range(A):
            for j in range(B):
                X[k, i, j] = y[i, j]
                if mu != 0.0:
                    V[k, i, j] = v[i, j]
"""

# the largest jobs whose step runs here (above them torch's batched BLAS and vectorised ops win;
# measured per job on the 1×1 convs of ResNet-18, ResNet-50 and MobileNetV2): Stiefel by A·B²
# per block and n·A·B² per job, the others by A·B and n·A·B (a block is one thread's work)
BLOCK_WORK, BLOCK_ELEMENTS = 1 << 16, 1 << 14


_BLOCK_BOUND = """
def kernel(G, V, coef, beta, lim, types):
    n, A, B = G.shape
    bad = 0
    for k in prange(n):
        g2 = 0.0
        v2 = 0.0
        for i in range(A):
            for j in range(B):
                g2 += np.float64(G[k, i, j]) * np.float64(G[k, i, j])
                v2 += np.float64(V[k, i, j]) * np.float64(V[k, i, j])
        e = coef[k] * np.sqrt(g2) + beta * np.sqrt(v2)
        bad += 0 if (np.isfinite(e) and e * e <= lim[types[k]]) else 1
    return bad
"""


def block_bound(G, V, coef, beta: float, lim, types) -> bool:
    """Whether every block k of ``G`` (n, A, B) has ``e_k² ≤ lim[types[k]]`` for
    ``e_k = coef_k·‖G_k‖ + β·‖V_k‖`` (float64, ``coef`` (n,)), and all is finite: the bound on
    a step direction's norm that shows no group's step size capped (``pomfx.kernel_job.KernelJob.
    _blocks``). One parallel pass over G and V."""
    g = _np(G)
    fn = _compiled(("bb", g.dtype.str), lambda: _BLOCK_BOUND, g.dtype)
    return _run(fn, g, _np(V), _np(coef), float(beta), _np(lim), _np(types)) == 0


def kernel_blocks(rows: int, cols: int) -> bool:
    """Whether :func:`block_step` serves kernel components of (rows × cols), one block each:
    those too large for the unrolled kernels (5×5, 7×7, ...), where the torch ops' ~80 passes
    over a layer cost 5-10× more."""
    return enabled() and not available(rows, cols) and rows * cols * cols <= BLOCK_WORK


def block_fusable(manifold: str, count: int, rows: int, cols: int) -> bool:
    """Whether :func:`block_step` serves a job of ``count`` (rows × cols) blocks of ``manifold``."""
    work = rows * cols * (cols if manifold == "st" else 1)
    limit = BLOCK_WORK if manifold == "st" else BLOCK_ELEMENTS
    return work <= limit and count * work <= 4 * limit


def block_step(
    X,
    G,
    V,
    S,
    srow: bool,
    types,
    cg,
    wdk,
    norm_g,
    mu: float,
    nesterov: bool,
    lr: float,
    radius: float,
    restep: float,
) -> None:
    """One FG-SGD step of the blocks ``X`` (n, A, B) in place (and of their momentum ``V``),
    the formulas of :func:`pomfx.block_job.update`: ``G`` the raw gradient, ``S`` (n, A) or (n, B)
    its scale 1/R² along the rows (``srow``) or columns, ``types`` (n,) int8 each block's
    manifold, ``cg`` (n,) the gradient's coefficient (sign × damping), ``wdk`` (n,) euc's weight
    decay × damping, ``norm_g`` (n,) ‖ω‖_F of each block. For jobs of small blocks, whose ~80
    torch ops per step cost far more than their arithmetic, and for kernel components too large
    for the unrolled kernels (5×5, 7×7: X, G, V are then (N, A, B) copies of the structure of
    arrays, contiguous like the blocks, so that the kernel compiles once)."""
    x = _np(X)
    fn = _compiled(("bs", x.dtype.str), lambda: _BLOCK_STEP, x.dtype)
    _run(
        fn,
        x,
        _np(G),
        _np(V),
        _np(S),
        srow,
        _np(types),
        _np(cg),
        _np(wdk),
        _np(norm_g),
        float(mu),
        bool(nesterov),
        float(lr),
        float(radius),
        float(restep),
    )
