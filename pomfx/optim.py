"""FG-SGD: Riemannian SGD over the products of manifolds of converted layers (Algorithm 1).

For every constrained group of every converted layer, each step does (paper's lines 4-6):

1. Riemannian gradient: ``d = Π_ω(s ⊙ ∇_ω L)`` with ``s = 1/R²`` (tangent projection of the
   scaled gradient; ``maximize`` flips its sign);
2. momentum in the tangent space, ``v ← μ·v + (1−τ)·d`` (Nesterov: ``u = d + μ·v``, else
   ``u = v``); the buffer was carried to the current point by vector transport (projection) at
   the end of the previous step; the first step sets ``v = d``, as torch's SGD does;
3. step ``ξ = −r(t, Θ)·u``, retraction ``ω ← Retr_ω(ξ)``, transport ``v ← Π_ω_new(v)``.

**Step size r(t, Θ), pomfx's reading.** A user who switches from ``torch.optim.SGD(lr)`` expects
the same training. The layer computes ``W = R ⊙ ω``; a step ``ΔW = −lr·∇_W L`` is, in ω,
``Δω = −(lr/R²)·∇_ω L`` (since ``∇_ω L = R·∇_W L``). FG-SGD therefore scales each component's
gradient by ``s = 1/R²`` (R carries κ, the layer's initial scale, see
:mod:`pomfx.parametrization`): the effective weight moves as SGD would move it, restricted to the
manifold's tangent directions. On top, one step never moves a group further than the geodesic
radius δ (``radius``, in radians, relative to the group's norm ‖ω_g‖_F)::

    r(t, Θ)_g = lr(t) · min(1, δ·‖ω_g‖_F / (lr(t)·‖u_g‖_F))        ‖ω_g‖²_F = Σ_c ‖ω_c‖²_F

(‖ω_c‖²_F is 1 on sp and B on ob and st.) With small gradients the cap is inactive and FG-SGD is
plain Riemannian SGD; a huge gradient moves its group by exactly δ·‖ω_g‖_F. Plain SGD stabilises
itself on scale-invariant weights (a large step inflates ‖w‖ and slows the next ones); the cap is
that safeguard on a manifold, where the norm cannot grow.

Euclidean parameters (biases, norm layers, unconverted layers) get exactly ``torch.optim.SGD``
(the same function, with weight decay). ``euc`` components of a converted layer take the same
SGD update in ω (with ``s``, with weight decay); constrained components get no weight decay.

**Retractions** (all exact to rounding, so the constraint error stays at rounding level and no
periodic re-projection is needed): sphere and oblique normalise ``ω + ξ`` (the norms are
recomputed, not predicted); Stiefel takes the Q factor with positive diagonal R, by Cholesky-QR
of ``ω + ξ`` (whose Gram matrix is ``I + ξᵀξ``: well conditioned), done in elementwise tensor
ops for small components (kernels: B ≤ 8) and repeated when a step is large (h²‖u_c‖² > 0.25:
on a CPU per component, in torch ops for the whole layer); big blocks
by batched Cholesky and triangular solves, repeated on CUDA (no host sync) and on a CPU only
where Gershgorin's discs do not bound the condition number of the Gram matrix by 1.25.
Transport is the projection onto the new tangent space; on sp and ob its inner products follow
in closed form from the step's own norms.

**Non-finite gradients** (``nonfinite="skip"``): a group whose gradient holds a NaN or inf is not
moved and its momentum is kept, bit for bit; the other groups step normally. The test is folded
into the step's own reductions (no extra pass when all gradients are finite); on CPU the
gradient is cleaned only when a non-finite value is present, on CUDA always (no host sync).
``nonfinite="raise"`` checks every constrained gradient first and raises FloatingPointError
before anything changes. Plain parameters follow torch's SGD in both modes.

**Low precision.** A bf16/fp16 ComponentParameter keeps an fp32 master copy of ω
(``state["master"]``) and an fp32 momentum buffer: the step and the retraction run in fp32 on
the master, which is then rounded into the parameter. If the parameter is changed outside the
optimizer (loading a model checkpoint, say), the master is re-read from it. Both live in the
optimizer's state_dict, and loading keeps them in fp32, so a resumed run continues bit for bit.

**Speed.** Nothing loops in Python over components. Kernel layers (K > 1) store ω structure of
arrays in weight order (:class:`pomfx.parametrization.POM`), their components of all manifolds
interleaved: one :class:`_KernelJob` applies the four manifolds' formulas side by side with
per-component masks, as elementwise ops over the contiguous component axis (a B×B product of 3×3
kernels is 3 fused multiply-adds over N, where a batched matmul or LAPACK call per component
would be 10-40× slower on CPU); on a CPU that job is numba's (:mod:`pomfx.fused`): two phases
with the group step sizes between them, or, when a bound on each component's step (summed
over its group where needed) shows that no group's step can be capped (the usual case), the
whole step in one pass over ω, g and v. Block layers
(K = 1) are bucketed: same manifold and shape, across layers, one :class:`_Job`; on a CPU a job of
small blocks runs as one numba loop (:func:`pomfx.fused.block_step`, the same formulas per
block, in float64), and so does a kernel layer whose components are too large for the unrolled
kernels (5×5, 7×7), each component a block, where no group's step is capped. On CPU, work
is cut into chunks of about ``chunk`` elements so that its passes run in cache, temporaries
live in persistent workspaces (fresh large allocations page-fault on every step), and a
non-finite check costs one reduction; on CUDA ("batched" mode)
all kernel layers of a shape form one job: with Triton (:mod:`pomfx.fused_gpu`), components of
up to 16 entries take three kernels, u's norms and the step per layer and the group sums per job;
larger ones (5×5, 7×7) go as blocks; without Triton (``POMFX_TRITON=0``) the job runs in one
chunk with the same elementwise ops (batched matmuls and cuSOLVER's batched Cholesky on 3×3
matrices measured 20× slower on an H100). All blocks of a shape form another job: with Triton
(:func:`pomfx.fused_gpu.block_step`) every manifold at once, Triton kernels around the Stiefel
blocks' batched products, Cholesky factors and triangular solves (~26 launches); otherwise the
manifolds' own pieces range by range (~75). Nothing syncs with the host: the step is bound by
the launches it issues there (``benchmarks/launch_count.py`` counts them on any machine). The
step's matmuls are IEEE float32 whatever the user's TF32 setting
(:func:`pomfx.manifolds.ieee_matmuls`): a TF32 Gram matrix would retract ω off Stiefel.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from . import fused, fused_gpu
from .manifolds import BIG_COMPONENT, ieee_matmuls, right_solve_upper
from .parametrization import ComponentParameter

__all__ = ["FGSGD"]

_NONFINITE = ("skip", "raise")
_TYPE_CODE = {"sp": 0, "ob": 1, "st": 2, "euc": 3}  # as in pomfx.parametrization
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CHUNK = 1 << 18  # elements per CPU job: x, grad, momentum and temporaries stay in cache
_BATCH = 1 << 26  # elements per batched (CUDA) job at most: its copies and temporaries, ~8 × 256 MB
_SMALL_ROWS, _SMALL_COLS = 16, 8  # components up to this size use elementwise small-matrix ops
_RESTEP = 0.25  # ‖ξ_c‖² above which a Stiefel component's Cholesky-QR is done twice
# kernel components with more columns: their B×B products and Cholesky-QR by batched BLAS,
# LAPACK or cuSOLVER calls, whose launches do not grow with B, instead of elementwise ops
_SOA_COLS = 4


class FGSGD(Optimizer):
    """Riemannian SGD for pomfx-converted models; torch's SGD for every other parameter.

    Takes ``model.parameters()`` or param groups, like ``torch.optim.SGD``, with the same
    arguments; works with LR schedulers, ``torch.amp.GradScaler``, closures and ``state_dict``.
    ``radius`` is δ of the step-size rule (module docstring); ``nonfinite`` chooses what a
    non-finite gradient of a constrained group does: ``"skip"`` its step or ``"raise"``;
    ``chunk`` is the CPU job size in elements (a tuning knob: results do not depend on it
    beyond rounding).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        radius: float = 0.2,
        nonfinite: str = "skip",
        chunk: int = _CHUNK,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if not radius > 0:
            raise ValueError(f"radius must be > 0 (radians), got {radius}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if not (isinstance(chunk, int) and chunk > 0):
            raise ValueError(f"chunk must be a positive int (elements), got {chunk!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            radius=radius,
            nonfinite=nonfinite,
            foreach=None,
            differentiable=False,
            fused=None,
        )
        super().__init__(params, defaults)
        _refuse_sharded(p for g in self.param_groups for p in g["params"])
        self._chunk = chunk
        self._batched: bool | None = None  # None: batched on CUDA, chunked on CPU
        self._plans: dict = {}  # (group index, params with grads) -> list of _Job
        self._written: dict = {}  # id(param) -> its _version after our last write (masters)
        self._fp32_state: dict = {}
        self.register_load_state_dict_pre_hook(_keep_fp32_pre)
        self.register_load_state_dict_post_hook(_keep_fp32_post)

    def __setstate__(self, state):  # unpickling, and the end of load_state_dict
        super().__setstate__(state)
        self.__dict__.setdefault("_chunk", _CHUNK)
        self.__dict__.setdefault("_batched", None)
        self.__dict__.setdefault("_fp32_state", {})  # read by the load post hook, just after
        self._plans, self._written = {}, {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"], state["_written"], state["_fp32_state"] = {}, {}, {}
        return state

    # -- the step ---------------------------------------------------------------------------
    @torch.compiler.disable  # traced, the constrained weights would be stepped as plain tensors
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            plain, manifold = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if isinstance(p, ComponentParameter) and p.pom is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("FGSGD does not support sparse gradients on constrained weights")
                    manifold.append(p)
                else:
                    plain.append(p)
            work.append((gi, group, plain, manifold))
        for _, group, _, manifold in work:  # raise before anything changes
            if group["nonfinite"] == "raise" and manifold:
                _check_finite(manifold)
        for gi, group, plain, manifold in work:
            if plain:
                self._plain_step(group, plain)
            if manifold:
                with ieee_matmuls():  # TF32 Gram matrices would retract off the manifold
                    self._manifold_step(gi, group, manifold)
        return loss

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        _torch_sgd(
            params,
            grads,
            bufs,
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=group["foreach"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _manifold_step(self, gi: int, group: dict, params: list[ComponentParameter]) -> None:
        mu = group["momentum"]
        first = {}
        flat = {}  # id(p) -> (x storage, grad, momentum or None)
        for p in params:
            state = self.state[p]
            low = p.dtype in _LOW_PRECISION
            if low:
                master = state.get("master")
                if master is None or self._written.get(id(p), p._version) != p._version:
                    master = state["master"] = p.detach().float().clone()
                x = master
            else:
                x = p.data
            buf = state.get("momentum_buffer")
            first[id(p)] = buf is None
            if mu != 0 and buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(x, memory_format=torch.contiguous_format)
            g = p.grad.reshape(-1)
            if g.dtype != x.dtype:
                g = g.to(x.dtype)
            flat[id(p)] = (x, g, buf if mu != 0 else None)
        key = (gi, tuple(id(p) for p in params))
        jobs = self._plans.get(key)
        if jobs is None:
            jobs = self._plans[key] = _plan(params, self._chunk, self._batched)
        hyper = _Hyper(group)
        for job in jobs:
            job.run(flat, first, hyper)
        for p in params:
            if p.dtype in _LOW_PRECISION:
                p.copy_(self.state[p]["master"])
                self._written[id(p)] = p._version


def _refuse_sharded(params: Iterable[Tensor]) -> None:
    """FSDP (``fully_shard`` DTensors, FSDP1 flat parameters and their views) is refused.

    A sphere, oblique or Stiefel component needs its whole block for the tangent projection and
    the retraction; a shard of the flat ω stepped on its own would leave the manifold.
    """
    for p in params:
        dtensor = type(p).__name__ == "DTensor" or "DTensor" in (c.__name__ for c in type(p).__mro__)
        if dtensor or getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter":
            raise TypeError(
                "FGSGD does not support FSDP-sharded parameters (FSDP, fully_shard): a Stiefel, "
                "sphere or oblique component needs its whole block for its retraction, and a shard "
                "stepped alone leaves the manifold. Use DistributedDataParallel (every rank holds "
                "whole layers); see docs/scaling.md."
            )


def _check_finite(params: list[ComponentParameter]) -> None:
    flags = torch.stack([torch.isfinite(p.grad).all() for p in params])
    if not bool(flags.all()):
        bad = [p.pom.layout.options.get("name", "?") for p, f in zip(params, flags.tolist()) if not f]
        raise FloatingPointError(f"FGSGD: non-finite gradient in converted layer(s) {bad}")


# -- keeping fp32 masters in fp32 through load_state_dict --------------------------------------
def _keep_fp32_pre(opt: FGSGD, state_dict: dict):
    """torch casts every floating state tensor to its parameter's dtype on load; remember the
    fp32 masters and momenta of low-precision parameters so that the post hook restores them."""
    keep = {}
    for pid, st in state_dict.get("state", {}).items():
        if isinstance(st, dict) and "master" in st:
            keep[pid] = {k: st[k] for k in ("master", "momentum_buffer") if isinstance(st.get(k), Tensor)}
    ids = [pid for g in state_dict.get("param_groups", []) for pid in g["params"]]
    opt._fp32_state = {"keep": keep, "ids": ids} if keep else {}


def _keep_fp32_post(opt: FGSGD):
    saved, opt._fp32_state = opt._fp32_state, {}
    opt._written, opt._plans = {}, {}
    if not saved:
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(saved["ids"], params):  # torch maps saved ids to params in this order
        for k, v in saved["keep"].get(pid, {}).items():
            opt.state[p][k] = v.detach().to(device=p.device, dtype=torch.float32, copy=True)


# -- plans: buckets of all layers cut and merged into jobs ------------------------------------
class _Hyper:
    __slots__ = ("lr", "mu", "damp", "nesterov", "maximize", "wd", "radius")

    def __init__(self, group: dict):
        self.lr = group["lr"]
        self.mu = group["momentum"]
        self.damp = group["dampening"]
        self.nesterov = group["nesterov"]
        self.maximize = group["maximize"]
        self.wd = group["weight_decay"]
        self.radius = group["radius"]


def _plan(params: list[ComponentParameter], chunk: int, batched: bool | None) -> list:
    """The jobs of one step. Chunked (CPU): one :class:`_KernelJob` per kernel layer, cut into
    chunks of ~``chunk`` elements; block buckets cut at group boundaries into such chunks, small
    ones merged by kind (manifold, shape, dtype, device) into :class:`_Job` s. Batched (CUDA):
    fewest kernel launches: one job for all kernel layers of a shape, one for all blocks of a
    shape (every manifold, both broadcasts of R; segments ordered by manifold)."""
    kinds: dict = {}
    kernels: dict = {}
    jobs: list = []
    for p in params:
        pom = p.pom
        cuda = p.device.type != "cpu" if batched is None else batched
        if pom.layout.kernel:
            key = (pom._shape, p.dtype, p.device) if cuda else id(p)
            kernels.setdefault(key, []).append(p)
            continue
        for bi, b in enumerate(pom.layout.buckets):
            if b.count == 0:
                continue
            per = b.rows * b.cols
            ends = np.cumsum(b.group_sizes)
            if cuda or b.numel <= chunk:
                cuts = [0, b.count]
            else:  # group boundaries closest to multiples of the chunk
                want = np.arange(chunk // per, b.count, max(1, chunk // per))
                at = np.unique(np.clip(np.searchsorted(ends, want), 0, len(ends) - 1))
                cuts = sorted({0, b.count, *(int(ends[i]) for i in at)})
            # batched: every manifold and both broadcasts of R, (A, 1) and (1, B), of a block
            # shape in one job (fewer launches)
            man, along = (None, None) if cuda else (b.manifold, pom.layout.scale_probes[bi].shape[1:])
            for c0, c1 in zip(cuts[:-1], cuts[1:]):
                if c1 > c0:
                    kind = (man, b.rows, b.cols, cuda, p.dtype, p.device, along)
                    kinds.setdefault(kind, []).append(_Segment(p, b, bi, c0, c1))
    shared = _Workspace()
    for ps in kernels.values():
        cuda = ps[0].device.type != "cpu" if batched is None else batched
        for layers in _packs(ps, [p.numel() for p in ps], _BATCH):
            jobs.append(_KernelJob(layers, chunk, cuda, shared))
    for kind, segs in kinds.items():
        cuda = kind[3]
        segs.sort(key=lambda seg: _TYPE_CODE[seg.b.manifold])  # each manifold's components together
        for pack in _packs(segs, [seg.numel for seg in segs], _BATCH if cuda else chunk):
            jobs.append(_Job(kind, pack))
    return jobs


def _packs(items: list, sizes: list[int], limit: int) -> list[list]:
    """``items`` cut, in order, into runs of at most ``limit`` elements (an item larger than
    that alone)."""
    packs, cur, total = [], [], 0
    for item, size in zip(items, sizes):
        if cur and total + size > limit:
            packs.append(cur)
            cur, total = [], 0
        cur.append(item)
        total += size
    return packs + [cur] if cur else packs


class _Segment:
    """Components ``[c0, c1)`` of bucket ``b`` (the ``bi``-th) of a block layer's parameter ``p``."""

    __slots__ = ("p", "b", "bi", "c0", "c1", "start", "stop", "gid", "ng", "sizes")

    def __init__(self, p: ComponentParameter, b, bi: int, c0: int, c1: int):
        self.p, self.b, self.bi, self.c0, self.c1 = p, b, bi, c0, c1
        per = b.rows * b.cols
        self.start, self.stop = b.offset + c0 * per, b.offset + c1 * per
        ends = np.cumsum(b.group_sizes)
        g0 = int(np.searchsorted(ends, c0, side="right"))
        g1 = int(np.searchsorted(ends, c1 - 1, side="right")) + 1
        starts = np.concatenate([[0], ends[:-1]])
        sizes = np.minimum(ends[g0:g1], c1) - np.maximum(starts[g0:g1], c0)
        self.sizes = sizes
        self.ng = g1 - g0
        self.gid = None if self.ng == c1 - c0 else np.repeat(np.arange(self.ng), sizes)

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def count(self) -> int:
        return self.c1 - self.c0


class _GroupNorms:
    """What both kinds of job share: ``norm_g`` (float64), ‖ω_g‖ of every group of the job."""

    norm_g: Tensor

    def _norms(self, dt: torch.dtype) -> Tensor:
        """‖ω_g‖ of every group, in ``dt`` (cast once)."""
        cache = self.__dict__.setdefault("_norm_g", {})
        norm_g = cache.get(dt)
        if norm_g is None:
            norm_g = cache[dt] = self.norm_g.to(dt)
        return norm_g

    def _cache(self, name: str, key, make):
        """``make()``, kept under ``name`` while ``key`` stays the same (``key`` None: not kept)."""
        kept = self.__dict__.setdefault("_kept", {})
        hit = kept.get(name)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        value = make()
        if key is not None:
            kept[name] = (key, value)
        return value

    def _hyper(self, hy: _Hyper, dt: torch.dtype, dev: torch.device) -> Tensor:
        """(lr, radius, restep, μ, wd, ±1) for the Triton kernels, in ``dt`` on the device (a
        Triton kernel's float arguments are float32). Kept until lr changes; a device tensor lr
        is copied in every step."""
        lr = hy.lr
        rest = (hy.radius, _RESTEP, hy.mu, hy.wd, -1.0 if hy.maximize else 1.0)
        if isinstance(lr, Tensor) and lr.device.type != "cpu":
            hyp = self._cache(
                "hyp_rest", (*rest, dt, dev), lambda: _device_values((0.0, *rest), dt, dev)
            ).clone()
            hyp[0].copy_(lr.reshape(()))
            return hyp
        values = (float(lr), *rest)
        return self._cache("hyp", (*values, dt, dev), lambda: _device_values(values, dt, dev))

    def _block_step(self, X, G, V, srow, scol, types, gid, order, start, k, hy: _Hyper, st) -> None:
        """:func:`pomfx.fused_gpu.block_step` of (n, A, B) components with the job's tables and
        hyperparameters; ``k`` the damping factor (a float, or (n,)); ``st`` the Stiefel
        components' range."""
        n, dt, dev = X.shape[0], X.dtype, X.device
        if not isinstance(k, Tensor):
            k = self._cache("k", (k, dt, dev), lambda: torch.full((n,), k, dtype=dt, device=dev))
        norm_g, hyp = self._norms(dt), self._hyper(hy, dt, dev)
        fused_gpu.block_step(
            X, G, V, srow, scol, types, gid, k, norm_g, hyp, order, start, self.ng, _mode(hy), st
        )


class _Job(_GroupNorms):
    """Block segments of one kind, stepped together (concatenated when there are several)."""

    def __init__(self, kind: tuple, segs: list[_Segment]):
        self.manifold, self.rows, self.cols, self.cuda, _, device, _ = kind  # manifold None: several
        self.segs = segs
        self.n = sum(s.count for s in segs)
        self.small = self.rows <= _SMALL_ROWS and self.cols <= _SMALL_COLS and not self.cuda
        # the components of each manifold: one range each (the plan orders segments by manifold)
        self.parts, start = [], 0
        for seg in segs:
            if self.parts and self.parts[-1][0] == seg.b.manifold:
                self.parts[-1] = (seg.b.manifold, self.parts[-1][1], start + seg.count)
            else:
                self.parts.append((seg.b.manifold, start, start + seg.count))
            start += seg.count
        # groups: ids local to the job, and Σ_c ‖ω_c‖²_F of each group
        sizes = np.concatenate([s.sizes for s in segs])
        per_comp = np.concatenate(
            [np.full(len(s.sizes), 1.0 if s.b.manifold == "sp" else float(self.cols)) for s in segs]
        )
        self.ng = len(sizes)
        self.gid = None
        if self.ng != self.n:
            self.gid = torch.as_tensor(np.repeat(np.arange(self.ng), sizes), device=device)
        self.norm_g = torch.as_tensor(np.sqrt(sizes * per_comp), dtype=torch.float64, device=device)
        self._scale_key = None
        self._scale = None
        # R broadcast differently in different segments (batched mode): g scaled segment by segment
        self.prescale = len({s.p.pom.layout.scale_probes[s.bi].shape[1:] for s in segs}) > 1
        # small blocks on a CPU: the whole step in one numba loop (pomfx.fused.block_step)
        self._types = None  # (n,) int8 manifold codes, for block_step
        self.fusable = (
            not self.cuda
            and self.gid is None
            and device.type == "cpu"
            and fused.block_fusable(self.manifold, self.n, self.rows, self.cols)
        )

    def _fused_update(self, x: Tensor, g: Tensor, v: Tensor | None, s: Tensor, first, hy: _Hyper) -> None:
        """:func:`_update` by :func:`pomfx.fused.block_step`: the same formulas, per block."""
        n = x.shape[0]
        k = 1.0 if hy.mu == 0 or hy.nesterov else _damp_factor(first, hy.damp, x)
        if self._types is None:
            self._types = torch.full((n,), _TYPE_CODE[self.manifold], dtype=torch.int8)
        cg, wdk = _block_coefs(k, n, self.manifold == "euc", hy)
        S = s.reshape(n, -1).contiguous()
        _block_step(
            x, g.contiguous(), v, S, s.shape[2] == 1, self._types, cg, wdk, self.norm_g, hy, hy.radius
        )

    def _triton_step(self, x: Tensor, g: Tensor, v: Tensor | None, first, hy: _Hyper) -> None:
        """The step by :func:`pomfx.fused_gpu.block_step`, every manifold of the job at once;
        its per-component tables built once (the scales' when they change)."""
        a, b, dt, dev = self.rows, self.cols, x.dtype, x.device
        t = fused_gpu.block_tiles(a, b)[2]
        types, gid, order, start = self._cache("blk", dev, lambda: self._tables(t, dev))
        self.scales()  # (the scale key brought up to date)
        srow, scol = self._cache("s", (self._scale_key, dt), lambda: self._row_col_scales(dt))
        k = 1.0 if hy.mu == 0 or hy.nesterov else _damp_factor(first, hy.damp, x)
        st = next(((i, j) for man, i, j in self.parts if man == "st"), (0, 0))  # (contiguous: by manifold)
        self._block_step(x, g, v, srow, scol, types, gid, order, start, k, hy, st)

    def _tables(self, t: int, dev: torch.device) -> tuple[Tensor, ...]:
        """Manifold codes (n,) int8, groups (n,) int32, and the (component, tile) partial sums of
        ‖u‖² ordered by group, for :func:`pomfx.fused_gpu.group_sums`."""
        codes = [torch.full((j - i,), _TYPE_CODE[man], dtype=torch.int8) for man, i, j in self.parts]
        ids = torch.arange(self.n, device=dev) if self.gid is None else self.gid.to(dev)
        order, start, _ = _group_order(ids.repeat_interleave(t), self.ng)
        return torch.cat(codes).to(dev), ids.to(torch.int32), order, start

    def _row_col_scales(self, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        """s = 1/R² as (n, A) and (n, B) factors (one of them ones, unless ``prescale``)."""
        n, a, b = self.n, self.rows, self.cols
        s = self.scales()
        if self.prescale:
            rows, cols = s
        elif s.shape[2] == 1:
            rows, cols = s, s.new_ones(n, 1, b)
        else:
            rows, cols = s.new_ones(n, a, 1), s
        return rows.reshape(n, a).to(dt).contiguous(), cols.reshape(n, b).to(dt).contiguous()

    def _cat(self, tensors: list[Tensor]) -> Tensor:
        a, b = self.rows, self.cols
        if len(tensors) == 1:
            return tensors[0].view(-1, a, b)
        return torch.cat(tensors).view(-1, a, b)

    def scales(self) -> Tensor | tuple[Tensor, Tensor]:
        """s = 1/R²: (n, A, 1) or (n, 1, B), broadcasting over the blocks' output channels; with
        ``prescale``, the pair of factors (n, A, 1) and (n, 1, B) whose product is every
        segment's own (each segment's s in one of them, 1 in the other: exact). Cached until a
        layer's scales change."""
        key = tuple(s.p.pom._scale_key() for s in self.segs)
        if key != self._scale_key:
            own = [s.p.pom.lr_scale()[s.bi][s.c0 : s.c1] for s in self.segs]
            if self.prescale:
                a, b = self.rows, self.cols
                along_rows = [t.shape[2] == 1 for t in own]
                rows = [t if r else t.new_ones(t.shape[0], a, 1) for t, r in zip(own, along_rows)]
                cols = [t.new_ones(t.shape[0], 1, b) if r else t for t, r in zip(own, along_rows)]
                self._scale = (torch.cat(rows), torch.cat(cols))
            else:
                self._scale = own[0] if len(own) == 1 else torch.cat(own)
            self._scale_key = key
        return self._scale

    def _scaled_grad(self, gs: list[Tensor]) -> Tensor:
        """``s ⊙ g`` of the job as one new (n, A, B) tensor (``prescale``: several segments, R
        broadcast differently among them): three launches, whatever the number of segments."""
        rows, cols = self.scales()
        return torch.cat(gs).view(-1, self.rows, self.cols).mul_(rows).mul_(cols)

    def run(self, flat: dict, first: dict, hy: _Hyper) -> None:
        segs = self.segs
        xs = [flat[id(s.p)][0][s.start : s.stop] for s in segs]
        gs = [flat[id(s.p)][1][s.start : s.stop] for s in segs]
        momentum = hy.mu != 0
        vs = [flat[id(s.p)][2][s.start : s.stop] for s in segs] if momentum else None
        x = self._cat(xs)
        v = self._cat(vs) if momentum else None
        firsts = [first[id(s.p)] for s in segs]
        if all(firsts) or not any(firsts):
            k_first = firsts[0]
        else:
            k_first = torch.cat([torch.full((s.count,), f, device=x.device) for s, f in zip(segs, firsts)])
        if self.cuda and fused_gpu.usable(x, 1, 1):  # Triton: ~26 launches for the job
            self._triton_step(x, self._cat(gs), v, k_first, hy)
        elif self.prescale:
            _update(self, x, self._scaled_grad(gs), v, None, k_first, hy)
        else:
            g, s = self._cat(gs), self.scales()
            if s.dtype != x.dtype:
                s = s.to(x.dtype)
            if self.fusable and x.dtype in (torch.float32, torch.float64) and fused.enabled():
                self._fused_update(x, g, v, s, k_first, hy)
            else:
                _update(self, x, g, v, s, k_first, hy)
        if len(segs) > 1:  # back into the layers, in one (foreach) launch
            torch._foreach_copy_(xs, list(x.view(-1).split([t.numel() for t in xs])))
            if momentum:
                torch._foreach_copy_(vs, list(v.view(-1).split([t.numel() for t in vs])))


# -- kernel layers: structure-of-arrays components of every manifold, side by side ---------------
class _Workspace:
    """Temporaries kept from step to step: fresh large allocations page-fault on every step, and
    on CPU that costs more than the arithmetic done in them."""

    def __init__(self):
        self._t: dict = {}

    def get(self, name: str, shape: tuple, like: Tensor) -> Tensor:
        t = self._t.get(name)
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
            t = self._t[name] = like.new_empty(shape)
        return t

    def flat(self, name: str, numel: int, like: Tensor) -> Tensor:
        """The first ``numel`` elements of a 1-D buffer that grows to the largest request: one
        scratch tensor serves layers of every size, one after the other."""
        t = self._t.get(name)
        if t is None or t.numel() < numel or t.dtype != like.dtype or t.device != like.device:
            keep = t.numel() if t is not None and t.dtype == like.dtype and t.device == like.device else 0
            t = self._t[name] = like.new_empty(max(numel, keep))
        return t[:numel]


class _KernelJob(_GroupNorms):
    """One kernel layer: ω is ``(A, B, N)`` (see :class:`pomfx.parametrization.POM`), its
    components of all manifolds interleaved in weight order. Every operation is a small-matrix
    one written as elementwise ops over the contiguous N axis, with per-component masks choosing
    the manifold's formula (sphere, oblique, Stiefel and Euclidean share one skeleton: the normal
    part of a vector Y is ``ω·C(ωᵀY)`` and the retraction is ``(ω+ξ)·R⁻¹``, for a per-manifold C
    and triangular R). Groups are scattered over N, so the step has two phases over chunks: the
    momentum and the norms, then (after the per-group step size) retraction and transport."""

    def __init__(self, params: list[ComponentParameter], chunk: int, batched: bool, shared: _Workspace):
        poms = [p.pom for p in params]
        self.params = params
        self.shared = shared  # scratch shared by the layers of a step (the fused step's u)
        self.a, self.b = poms[0]._shape
        self.sizes = [int(pom.comp_type.numel()) for pom in poms]
        self.n = sum(self.sizes)
        self.cuda = batched  # batched: one chunk and no host sync (the same elementwise ops)
        types = torch.cat([pom.comp_type for pom in poms]) if len(poms) > 1 else poms[0].comp_type
        present = set(torch.unique(types).tolist())
        self.has = {name: code in present for name, code in _TYPE_CODE.items()}
        self.full = self.has["st"]  # Stiefel components need full B×B products
        self.constrained = any(self.has[k] for k in ("sp", "ob", "st"))
        self.types = types
        if self.cuda:  # (counted here, at planning: a step decides nothing on the host)
            sp, ob, st, _ = torch.bincount(types.long(), minlength=4).tolist()
            self.st_range = (sp + ob, sp + ob + st)  # of the components sorted by manifold
        ngs = [int(pom.group_norm2.numel()) for pom in poms]
        self.ng = sum(ngs)
        offsets = np.cumsum([0, *ngs[:-1]])
        self.group_spans = [(int(o), int(o) + g) for o, g in zip(offsets, ngs)]  # each layer's groups
        gid = [pom.comp_group + int(o) for pom, o in zip(poms, offsets)]
        self.gid = None if self.ng == self.n else (torch.cat(gid) if len(gid) > 1 else gid[0])
        self.ids = gid[0] if len(gid) == 1 else torch.cat(gid)  # group of each component (int32)
        norm2 = torch.cat([pom.group_norm2 for pom in poms])
        self.norm_g = norm2.double().sqrt()  # exact: the norms² are integers
        self._all_ok: Tensor | None = None
        self._scale_key, self._scale = None, None
        step = self.n if self.cuda else max(1, chunk // (self.a * self.b))
        self.chunks = [(i, min(i + step, self.n)) for i in range(0, self.n, step)]
        self.nc = min(step, self.n)
        self.ws = _Workspace()
        starts = np.cumsum([0, *self.sizes]).tolist()
        self.spans = list(zip(starts, starts[1:]))  # each layer's components
        # components too large for the unrolled kernels: numba's block step, one block each
        self.blockwise = not self.cuda and fused.kernel_blocks(self.a, self.b)
        if self.blockwise:
            self.euc = (types == _TYPE_CODE["euc"]).double()
        self.m: dict = {}  # the current chunk's float masks (see _masks)
        self._vnorm: dict = {}  # layer -> (its buffer, weakly; the buffer's _version; ‖v_c‖ (N,))

    def _masks(self, i: int, j: int, like: Tensor) -> None:
        """Float masks of components [i, j) into a workspace: ``sp``, ``ob``, ``st``, ``euc``
        (None for a manifold the layer does not use), ``st/2`` and ``not st``. A job of one
        chunk (batched mode) keeps them from phase to phase and step to step: eight launches
        each time otherwise."""
        key = (i, j, like.dtype, like.device)
        if len(self.chunks) == 1 and self.__dict__.get("_mask_key") == key:
            return
        nc, ws = j - i, self.ws
        codes = self.ws.get("codes", (4, 1), self.types)
        codes.copy_(torch.arange(4, device=self.types.device).view(4, 1))
        hit = torch.eq(
            self.types[i:j].unsqueeze(0), codes, out=ws.get("hit", (4, self.nc), codes.bool())[:, :nc]
        )
        m = ws.get("masks", (6, self.nc), like)[:, :nc]
        m[:4].copy_(hit)
        torch.mul(m[2], 0.5, out=m[4])
        m[5].fill_(1.0).sub_(m[2])
        self.m = {name: (m[code] if self.has[name] else None) for name, code in _TYPE_CODE.items()}
        self.m["st/2"], self.m["not st"] = m[4], m[5]
        self._mask_key = key

    def _comp_norms(self, dt: torch.dtype) -> Tensor:
        """‖ω_g‖ of each component's group, in component order and ``dt`` (kept): where every
        component is its own group (``gid`` None) the groups are still numbered apart from
        the components, so ``norm_g`` is not in component order."""
        return self._cache("norm_c", dt, lambda: self._norms(dt)[self.ids.long()])

    def group_sum(self, t: Tensor) -> Tensor:
        return torch.zeros(self.ng, dtype=t.dtype, device=t.device).index_add_(0, self.gid, t)

    def scales(self) -> Tensor:
        """1/R² of every component (cached until a layer's scales change)."""
        key = tuple(p.pom._scale_key() for p in self.params)
        if key != self._scale_key:
            parts = [p.pom.lr_scale() for p in self.params]
            self._scale = torch.cat(parts) if len(parts) > 1 else parts[0]
            self._scale_key = key
        return self._scale

    def run(self, flat: dict, first: dict, hy: _Hyper) -> None:
        a, b, n = self.a, self.b, self.n
        parts = [flat[id(p)] for p in self.params]
        x0 = parts[0][0]
        if self.cuda and fused_gpu.usable(x0, a, b):  # Triton: three launches per layer
            self._triton_step(parts, first, hy)
            return
        if self.cuda and fused_gpu.usable(x0, 1, 1):  # larger components (5×5, 7×7): as blocks
            self._triton_blocks(parts, first, hy)
            return
        on_cpu = not self.cuda and x0.dtype in (torch.float32, torch.float64)
        if on_cpu and fused.available(a, b):
            # fused kernels: layer by layer, no concatenation (one call each costs microseconds)
            view = lambda t: None if t is None else t.view(a, b, -1)  # noqa: E731
            self._run([tuple(view(t) for t in part) for part in parts], first, hy, True)
            return
        if on_cpu and self.blockwise and self._blocks(parts, first, hy):
            return
        if len(parts) == 1:
            xf, gf, vf = parts[0]
            X, G = xf.view(a, b, n), gf.view(a, b, n)
            V = vf.view(a, b, n) if vf is not None else None
        else:  # several layers side by side along N
            X = torch.cat([x.view(a, b, -1) for x, _, _ in parts], 2)
            G = torch.cat([g.view(a, b, -1) for _, g, _ in parts], 2)
            V = torch.cat([v.view(a, b, -1) for _, _, v in parts], 2) if parts[0][2] is not None else None
        self._run([(X, G, V)], first, hy, False)
        if len(parts) > 1:  # back into the layers, in one (foreach) launch
            dst = [x for x, _, _ in parts] + ([v for _, _, v in parts] if V is not None else [])
            src = list(X.split(self.sizes, 2)) + (list(V.split(self.sizes, 2)) if V is not None else [])
            torch._foreach_copy_([d.view(a, b, -1) for d in dst], src)

    def _triton_step(self, parts: list[tuple], first: dict, hy: _Hyper) -> None:
        """The step by :mod:`pomfx.fused_gpu`, layer by layer in place (no concatenation): u's
        norms, the job's group sums, then each layer's retraction and transport. Nothing on the
        host depends on a tensor's value: a group with a non-finite gradient is skipped on the
        device."""
        a, b, n = self.a, self.b, self.n
        x0 = parts[0][0]
        dt, dev = x0.dtype, x0.device
        self._vnorm = {}
        s = self.scales()
        k = self._damping(first, hy, x0)
        key = None if isinstance(k, Tensor) else (self._scale_key, dt, k, hy.maximize, hy.mu, hy.wd)
        cg, mu_n, wd_n = self._cache("fused", key, lambda: self._coefs(s.to(dt), k, hy))
        order, start, gid = self._cache("groups", dev, lambda: _group_order(self.ids, self.ng))
        hyp = self._hyper(hy, dt, dev)
        mode = _mode(hy)
        q, qg = self.ws.get("q", (n,), x0), self.ws.get("qg", (self.ng,), x0)
        layers = [
            (tuple(None if t is None else t.view(a, b, -1) for t in part), slice(i, j))
            for part, (i, j) in zip(parts, self.spans)
        ]
        for (x, g, v), c in layers:
            fused_gpu.norms(x, g, v, cg[c], mu_n[c], wd_n[c], self.types[c], q[c], hyp, mode)
        fused_gpu.group_sums(q, order, start, qg)
        norm_g = self._norms(dt)
        for (x, g, v), c in layers:
            fused_gpu.step(
                x, g, v, cg[c], mu_n[c], wd_n[c], self.types[c], gid[c], qg, norm_g, hyp, mode, self.full
            )

    def _triton_blocks(self, parts: list[tuple], first: dict, hy: _Hyper) -> None:
        """Components too large for the unrolled kernels (5×5, 7×7) stepped as blocks by
        :func:`pomfx.fused_gpu.block_step`: the job copied to (N, A, B), sorted by manifold (its
        Stiefel components side by side), and back (eight more launches, ~34 in all where the
        torch ops take ~100)."""
        a, b, n = self.a, self.b, self.n
        x0 = parts[0][0]
        dt, dev = x0.dtype, x0.device
        t = fused_gpu.block_tiles(a, b)[2]
        perm, types, gid, order, start = self._cache("blk", dev, lambda: self._sorted_tables(t))
        full = [torch.cat([p[i].view(a, b, -1).permute(2, 0, 1) for p in parts]) for i in (0, 1, 2)
                if i < 2 or parts[0][2] is not None]  # fmt: skip
        X, G = full[0][perm], full[1][perm]
        V = full[2][perm] if len(full) == 3 else None
        s = self.scales()
        srow = self._cache(
            "srow", (self._scale_key, dt), lambda: s.to(dt)[perm].view(n, 1).expand(n, a).contiguous()
        )
        scol = self._cache("scol", (dt, dev), lambda: torch.ones(n, b, dtype=dt, device=dev))
        k = self._damping(first, hy, x0)
        k = k[perm] if isinstance(k, Tensor) else k
        self._block_step(X, G, V, srow, scol, types, gid, order, start, k, hy, self.st_range)
        full[0].index_copy_(0, perm, X)
        dst = [p[0] for p in parts]
        src = list(full[0].permute(1, 2, 0).split(self.sizes, 2))
        if V is not None:
            full[2].index_copy_(0, perm, V)
            dst += [p[2] for p in parts]
            src += list(full[2].permute(1, 2, 0).split(self.sizes, 2))
        torch._foreach_copy_([d.view(a, b, -1) for d in dst], src)

    def _sorted_tables(self, t: int) -> tuple[Tensor, ...]:
        """The components sorted by manifold (a stable permutation), their codes and groups, and
        the (component, tile) partial sums of ‖u‖² ordered by group."""
        perm = torch.sort(self.types.long(), stable=True)[1]
        gid = self.ids[perm]
        order, start, _ = _group_order(gid.repeat_interleave(t), self.ng)
        return perm, self.types[perm], gid, order, start

    def _blocks(self, parts: list[tuple], first: dict, hy: _Hyper) -> bool:
        """The step by :func:`pomfx.fused.block_step`, each component a block of an (N, A, B) copy of
        the structure of arrays (components too large for the unrolled kernels: 5×5, 7×7; such
        layers are small, and the copies cost microseconds). A block is its own group there: exact
        where every component is its own group (depthwise convs); otherwise only when no group's
        step size is capped, which a bound shows first (as in :meth:`_one_pass`, here with ‖u_c‖ ≤
        α|cg_c|‖g_c‖ + β‖v_c‖: α = 1, β = μ for the heavy ball, α = 1 + μ, β = μ² for Nesterov;
        :func:`pomfx.fused.block_bound`), and the step is then every group's with r = lr. Returns
        whether it stepped: not when the bound fails (a capped group, a non-finite gradient), which
        the torch ops then take."""
        a, b, n, mu = self.a, self.b, self.n, hy.mu
        dt = parts[0][0].dtype
        k = self._damping(first, hy, parts[0][0])
        s = self.scales()
        skey, fixed = self._scale_key, not isinstance(k, Tensor)  # k per layer: nothing kept
        S = self._cache("S", (skey, dt), lambda: s.to(dt).view(n, 1).expand(n, b).contiguous())
        # (X, G, V) of each layer as contiguous (N, A, B) copies (block_step's kernel compiles once,
        # for the block layers' contiguous blocks), and its span of components; no momentum: X for V
        blocks = lambda *ts: tuple(t.view(a, b, -1).permute(2, 0, 1).contiguous() for t in ts)  # noqa: E731
        layers = [
            (blocks(x, g, x if v is None else v), slice(i, j)) for (x, g, v), (i, j) in zip(parts, self.spans)
        ]
        radius = hy.radius
        if self.gid is not None:
            lr = float(hy.lr)
            scale = hy.radius**2 * (1 - 1 / 64) / lr**2 if lr > 0 else math.inf  # lr = 0: finiteness only
            lim = torch.tensor([scale, scale * b, scale * b, math.inf], dtype=torch.float64)
            alpha, beta = (1.0 + mu, mu * mu) if hy.nesterov else (1.0, mu)
            coef = self._cache("coef", (skey, k, alpha) if fixed else None, lambda: alpha * s.double() * k)
            for (_, G, V), c in layers:
                if not fused.block_bound(G, V, coef[c], beta, lim, self.types[c]):
                    return False
            radius = math.inf  # every group's cap is 1: each block steps by lr
        self._vnorm = {}  # the one-pass norms of V (unused here) are stale after any step
        key = (k, hy.maximize, hy.wd) if fixed else None
        cg, wdk = self._cache("cg", key, lambda: _block_coefs(k, n, self.euc, hy))
        norm_c = self._comp_norms(torch.float64)
        for ((X, G, V), c), (x, _, v) in zip(layers, parts):
            _block_step(X, G, V, S[c], False, self.types[c], cg[c], wdk[c], norm_c[c], hy, radius)
            x.view(a, b, -1).copy_(X.permute(1, 2, 0))
            if v is not None:
                v.view(a, b, -1).copy_(V.permute(1, 2, 0))
        return True

    def _damping(self, first: dict, hy: _Hyper, like: Tensor):
        """k = 1 − τ (1 on a parameter's first step, and without the heavy ball): a float, or
        (N,) when the job's layers differ."""
        firsts = [first[id(p)] for p in self.params]
        if hy.mu == 0 or hy.nesterov or all(firsts):
            return 1.0
        if not any(firsts) or not hy.damp:
            return 1.0 - hy.damp
        parts = [torch.full((m,), 1.0 if f else 1.0 - hy.damp, dtype=like.dtype, device=like.device)
                 for m, f in zip(self.sizes, firsts)]  # fmt: skip
        return torch.cat(parts)

    def _ones(self) -> Tensor:
        """(N,) True: every component steps."""
        if self._all_ok is None:
            self._all_ok = torch.ones(self.n, dtype=torch.bool)
        return self._all_ok

    def _fused_step(
        self, segs: list[tuple], spans: list, first: dict, hy: _Hyper, s: Tensor, vnorm: dict
    ) -> bool:
        """The fused step without a check first (no momentum, or the heavy ball): phase A writes u
        to scratch and leaves ω and v alone, so a non-finite gradient, which makes its component's
        ``q = ‖u_c‖²`` non-finite, is caught in q before anything has changed; the caller then runs
        the checked step (that skips whole groups). Returns whether it stepped. This saves the
        check's pass over the gradient, and the step size is one :func:`pomfx.fused.step_size`.
        Usually the step is one pass (:meth:`_one_pass`), which a non-finite gradient also
        leaves to the two phases."""
        n, X = self.n, segs[0][0]
        ws, mu = self.ws, hy.mu
        k = self._damping(first, hy, X)
        key = None if isinstance(k, Tensor) else (self._scale_key, X.dtype, k, hy.maximize, mu, hy.wd)
        cg, mu_n, wd_n = self._cache("fused", key, lambda: self._coefs(s, k, hy))
        if self._one_pass(segs, spans, cg, mu_n, wd_n, hy, vnorm):
            return True
        q = ws.get("q", (n,), X)
        scratch = self.shared.flat("u", sum(x.numel() for x, _, _ in segs), X)
        us = list(scratch.split([x.numel() for x, _, _ in segs]))
        mode = 3 if mu else 0
        for (x, g, v), u, (i, j) in zip(segs, us, spans):
            u = u.view(x.shape)
            fused.phase_a(x, g, v, u, cg[i:j], mu_n[i:j], wd_n[i:j], self.types[i:j], mode, mu, q[i:j])
        h = ws.get("h", (n,), X)
        big = fused.step_size(q, self.ids, self._norms(X.dtype), self.types, float(hy.lr), hy.radius,
                              ws.get("qg", (self.ng,), X), h)  # fmt: skip
        if big < 0:  # a non-finite q: nothing has changed yet
            return False
        twice = self.full and big > _RESTEP  # (per component: only where h²q > _RESTEP)
        transport, ok = mu != 0, self._ones()  # V ← transported u (on euc, u itself)
        for (x, _, v), u, (i, j) in zip(segs, us, spans):
            u, v = u.view(x.shape), v if transport else None
            fused.phase_b(x, u, v, h[i:j], self.types[i:j], ok[i:j], twice, transport, u, q[i:j], _RESTEP)
        return True

    def _coefs(self, s: Tensor, k, hy: _Hyper) -> tuple[Tensor, Tensor, Tensor]:
        """The fused kernels' per-component coefficients (N,): the gradient's ``cg = ±k/R²``, the
        momentum μ and euc's weight decay ``wd·k`` (the kernels mask it to euc components).
        Fresh tensors: they are kept from step to step (only the kernels read them)."""
        cg = s * ((-1.0 if hy.maximize else 1.0) * k)
        mu_n = torch.full_like(cg, hy.mu)
        wd_n = torch.zeros_like(cg)
        if hy.wd and self.has["euc"]:
            wd_n.add_(hy.wd * k)
        return cg, mu_n, wd_n

    def _one_pass(
        self, segs: list[tuple], spans: list, cg: Tensor, mu_n: Tensor, wd_n: Tensor, hy: _Hyper, vnorm: dict
    ) -> bool:
        """The fused step in one pass (:func:`pomfx.fused.one_pass`) when a bound shows that no
        group's step size is capped, as is usual: every group then steps by lr, and the two
        phases' result is that of one pass, bit for bit. Returns whether it ran.

        The bound (:func:`pomfx.fused.within`): with e_c ≥ ‖u_c‖ and Σ_{c∈g} e_c² ≤ δ²‖ω_g‖²/lr²,
        ‖u_g‖² = Σ_c ‖u_c‖² ≤ δ²‖ω_g‖²/lr², so the cap min(1, δ‖ω_g‖/(lr‖u_g‖)) is 1; ‖ω_c‖² is
        1 on sp and B on ob and st. Where some Stiefel component has e_c² > ``_RESTEP``/lr², the
        pass chooses per component whether to do the Cholesky-QR twice, as phase B does (h²q >
        ``_RESTEP``). A 1/64 margin covers rounding. It costs a pass over G, against phase A's
        pass and U's traffic: ‖v_c‖ is the one the last one-pass step wrote (the bits V gives
        again, so a resumed run, which computes them, decides alike), while the buffer
        is the same tensor, at the same version (any other writer of V bumps it, or goes
        through :meth:`_run`, which drops the norms). The group sums are only taken where a
        component is over its own share δ²‖ω_c‖²/lr² (at lr 0.1 on ResNet-18, most layers: a
        group's largest e_c² is 7-27× its mean share)."""
        lr = float(hy.lr)
        X = segs[0][0]
        key = (lr, hy.radius, X.dtype)
        lim = self._cache("lim", key, lambda: self._limits(lr, hy.radius, X.dtype))
        lim_g = self._cache("lim_g", key, lambda: self._group_limits(lr, hy.radius, X.dtype))
        qg = self.ws.get("qg", (self.ng,), X)
        e2 = self.ws.get("e2", (self.n,), X)
        bufs = [None if v is None else v if v._base is None else v._base for _, _, v in segs]  # the buffers
        # each layer's coefficients (a CPU job is one layer: the whole tensors, no slicing)
        one = len(segs) == 1
        coefs = [(cg, mu_n, wd_n, self.types)] if one else [
            (cg[i:j], mu_n[i:j], wd_n[i:j], self.types[i:j]) for i, j in spans]  # fmt: skip
        twice = []
        for k, ((x, g, v), (c, m, _, t), (i, j)) in enumerate(zip(segs, coefs, spans)):
            ref, version, norms = vnorm.get(k, (None, None, None))
            fresh = ref is not None and ref() is bufs[k] and bufs[k]._version == version
            groups = (self.ids if one else self.ids[i:j], lim_g, qg, self.group_spans[k])
            how = fused.within(x, g, v, c, m, t, lim, e2[i:j], norms if fresh else None, groups)
            if not how:
                return False
            twice.append(how == 2)
        for k, ((x, g, v), c) in enumerate(zip(segs, coefs)):
            norms = None if v is None else self.ws.get(f"vnorm{k}", (c[0].numel(),), x)
            fused.one_pass(x, g, v, *c, lr, norms, twice[k], _RESTEP)
            if norms is not None:
                self._vnorm[k] = (weakref.ref(bufs[k]), bufs[k]._version, norms)
        return True

    def _limits(self, lr: float, radius: float, dt: torch.dtype) -> Tensor:
        """The one-pass bound's limits on e_c² (see :func:`pomfx.fused.within`), less a 1/64 margin
        for rounding: per manifold (sp, ob, st, euc) a component's share δ²‖ω_c‖²/lr² of its
        group's limit, then ``_RESTEP``/lr², above which a Stiefel component may need a second
        Cholesky-QR."""
        big = float(torch.finfo(dt).max)
        scale = (1 - 1 / 64) / lr**2 if lr > 0 else big
        cap = [radius**2, radius**2 * self.b, radius**2 * self.b, big, _RESTEP]
        return torch.tensor([min(c * scale, big) for c in cap], dtype=dt)

    def _group_limits(self, lr: float, radius: float, dt: torch.dtype) -> Tensor:
        """(G,) each group's limit on Σ_c e_c²: δ²‖ω_g‖²/lr² less the 1/64 margin (none on euc)."""
        big = torch.finfo(dt).max
        scale = radius**2 * (1 - 1 / 64) / lr**2 if lr > 0 else math.inf
        euc = torch.zeros(self.ng, dtype=torch.bool).index_fill_(
            0, self.ids[self.types == _TYPE_CODE["euc"]].long(), True
        )
        return (self._norms(torch.float64).square() * scale).clamp_(max=big).masked_fill_(euc, big).to(dt)

    def _run(self, segs: list[tuple], first: dict, hy: _Hyper, fuse: bool) -> None:
        """The step on ``segs``: ``(X, G, V)`` (A, B, ·) triples covering the job's N components in
        order: one (the job, concatenated) for the torch kernels, one per layer for the fused ones."""
        a, b, n = self.a, self.b, self.n
        X = segs[0][0]
        dt = X.dtype
        ws = self.ws
        mu, nesterov = hy.mu, hy.nesterov
        s = self.scales()
        if s.dtype != dt:
            s = s.to(dt)
        spans = self.spans if fuse else [(0, n)]
        vnorm, self._vnorm = self._vnorm, {}  # any step below rewrites V: only one_pass renews it
        if fuse and not nesterov and self._fused_step(segs, spans, first, hy, s, vnorm):
            return
        # non-finite gradients: one reduction, then whole groups
        gsum = ws.get("n1", (n,), X)
        for (_, g, _), (i, j) in zip(segs, spans):
            torch.sum(g, (0, 1), out=gsum[i:j])
        fin = _finite(gsum)
        if not self.cuda and bool(fin.all()):  # the common case: no group to skip
            ok = None
        else:
            ok = fin if self.gid is None else self.group_sum((~fin).to(torch.int32))[self.gid] == 0
        okf = None
        if ok is not None:
            segs = [(x, torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), v) for x, g, v in segs]
            okf = ok.to(dt)
        sign = -1.0 if hy.maximize else 1.0
        k = self._damping(first, hy, X)
        cg = torch.mul(s, sign * k, out=ws.get("cg", (n,), X))
        if okf is not None:
            cg.mul_(okf)
        mu_eff = mu if ok is None else torch.where(ok, torch.full_like(okf, mu), 1.0)
        wd_euc = None
        if hy.wd and self.has["euc"]:
            wd_euc = hy.wd * k if okf is None else okf * (hy.wd * k)  # times the euc mask, per chunk
        heavy = mu != 0 and not nesterov  # the buffer is u
        Us = [v if heavy else ws.get(f"U{k}", x.shape, x) for k, (x, _, v) in enumerate(segs)]
        q = ws.get("q", (n,), X)

        # phase A: u = momentum (or d), and ‖u_c‖²
        if fuse:
            mode = 0 if mu == 0 else (2 if nesterov else 1)
            mu_n = mu_eff if isinstance(mu_eff, Tensor) else ws.get("mu", (n,), X).fill_(mu)
            wd_n = ws.get("wd", (n,), X).zero_()
            if wd_euc is not None:
                wd_n.add_(wd_euc)
            for (x, g, v), u, (i, j) in zip(segs, Us, spans):
                u = None if heavy else u
                fused.phase_a(x, g, v, u, cg[i:j], mu_n[i:j], wd_n[i:j], self.types[i:j], mode, mu, q[i:j])
            X, G, V = segs[0]
            U = Us[0]
        else:
            (X, G, V), U = segs[0], Us[0]
            uu = ws.get("uu", (a, b, self.nc), X)
        for i, j in () if fuse else self.chunks:
            Xc, Gc, Uc = X[..., i:j], G[..., i:j], U[..., i:j]
            cgc = cg[i:j]
            self._masks(i, j, X)
            Cm = self._normal(Xc, Gc, i, j, dt, cgc)  # (B, B, n), or (B, n) for a diagonal C
            if U is V:
                Uc.mul_(mu_eff if isinstance(mu_eff, float) else mu_eff[i:j])
                Uc.addcmul_(Gc, cgc)
            else:
                torch.mul(Gc, cgc, out=Uc)
            if Cm is not None:
                self._sub_normal_(Uc, Xc, Cm)
            if wd_euc is not None:
                w = self.m["euc"] * (wd_euc if isinstance(wd_euc, float) else wd_euc[i:j])
                Uc.addcmul_(Xc, w)
            if nesterov:
                Vc = V[..., i:j]
                Vc.mul_(mu_eff if isinstance(mu_eff, float) else mu_eff[i:j]).add_(Uc)
                Uc.add_(Vc, alpha=mu)
            u2 = torch.mul(Uc, Uc, out=uu[..., : j - i])
            torch.sum(u2, (0, 1), out=q[i:j])

        # the step size of each group: lr·min(1, δ‖ω_g‖ / (lr‖u_g‖)); Euclidean components: lr
        lr = hy.lr
        qg = q if self.gid is None else self.group_sum(q)
        norm_g = self._norms(dt) if self.gid is not None else self._comp_norms(dt)
        f = qg.sqrt().mul_(lr).clamp_min_(1e-30).reciprocal_().mul_(norm_g).mul_(hy.radius)
        f.clamp_(max=1.0)
        if self.gid is not None:
            f = f[self.gid]
        if self.has["euc"]:
            f = torch.where(self.types == _TYPE_CODE["euc"], 1.0, f)
        h = f.mul_(lr) if isinstance(lr, float) else f * lr
        if okf is not None:
            h = h * okf
        twice = self.full and (self.cuda or bool(((h * h) * q).max() > _RESTEP))

        # phase B: retraction, then transport of the momentum
        if fuse:
            ok = self._ones() if ok is None else ok
            transport = mu != 0 and self.constrained
            for (x, _, v), u, (i, j) in zip(segs, Us, spans):
                v = v if transport else None
                t = self.types[i:j]
                fused.phase_b(x, u, v, h[i:j], t, ok[i:j], twice, transport, None, q[i:j], _RESTEP)
            return
        for i, j in self.chunks:
            Xc, Uc = X[..., i:j], U[..., i:j]
            self._masks(i, j, X)
            Xc.addcmul_(Uc, h[i:j], value=-1.0)
            if self.constrained:
                for _ in range(2 if twice else 1):
                    self._normalize_(Xc, i, j, None if ok is None else ok[i:j], dt)
            if mu != 0 and self.constrained:
                Vc = V[..., i:j]
                Cm = self._normal(Xc, Vc, i, j, dt, None if okf is None else okf[i:j])
                self._sub_normal_(Vc, Xc, Cm)

    # -- the per-manifold pieces, masked ---------------------------------------------------------
    def _normal(self, X: Tensor, Y: Tensor, i: int, j: int, dt, coef: Tensor | None = None) -> Tensor | None:
        """C with ``ω·C`` the normal part of Y at ω: sym(ωᵀY) on st, ddiag(ωᵀY) on ob,
        tr(ωᵀY)·I on sp, 0 on euc; times ``coef`` (n,) if given. (B, B, n), or its diagonal
        (B, n) when there is no st."""
        if not self.constrained:
            return None
        nc, b, ws = j - i, self.b, self.ws
        if self.full:
            M = _soa_tmm(X, Y, ws.get("M", (b, b, self.nc), X)[..., :nc])
            C = torch.add(M, M.transpose(0, 1), out=ws.get("C", (b, b, self.nc), X)[..., :nc])
            C.mul_(self.m["st/2"] if coef is None else self.m["st/2"] * coef)
            d = self._typed_diag(M.diagonal(0, 0, 1).t(), i, j, dt)  # (B, n)
            C.diagonal(0, 0, 1).t().add_(d if coef is None else d.mul_(coef))
            return C
        xy = torch.mul(X, Y, out=ws.get("uu", (self.a, b, self.nc), X)[..., :nc])
        d = torch.sum(xy, 0, out=ws.get("d", (b, self.nc), X)[:, :nc])  # (B, n): diag(ωᵀY)
        d = self._typed_diag(d, i, j, dt)
        return d if coef is None else d.mul_(coef)

    def _typed_diag(self, d: Tensor, i: int, j: int, dt) -> Tensor:
        """ob: d; sp: tr = Σ d on every diagonal entry; others 0. (B, n), in a workspace."""
        nc, ws = j - i, self.ws
        out = ws.get("cd", (self.b, self.nc), d)[:, :nc]
        m_sp, m_ob = self.m["sp"], self.m["ob"]
        if m_ob is not None:
            torch.mul(d, m_ob, out=out)
        else:
            out.zero_()
        if m_sp is not None:
            tr = torch.sum(d, 0, keepdim=True, out=ws.get("tr", (1, self.nc), d)[:, :nc])
            out.add_(tr.mul_(m_sp))
        return out

    def _sub_normal_(self, V: Tensor, X: Tensor, C: Tensor) -> None:
        if C.dim() == 2:
            V.addcmul_(X, C.unsqueeze(0), value=-1.0)
        else:
            _soa_sub_mm_(V, X, C)

    def _typed_norm_(self, d: Tensor, out: Tensor, i: int, j: int, dt, inverse: bool) -> Tensor:
        """(Inverse) norms into ``out`` (B, n) from the column norms² ``d``: per column on ob, the
        Frobenius norm on sp, 1 on euc, 0 on st. Arguments are clamped so that every branch is
        finite before the masks multiply it."""
        fn = torch.rsqrt if inverse else torch.sqrt
        m_sp, m_ob, m_euc = self.m["sp"], self.m["ob"], self.m["euc"]
        tiny = torch.finfo(dt).tiny
        if m_ob is not None:
            torch.clamp(d, min=tiny, out=out)
            fn(out, out=out).mul_(m_ob)
        else:
            out.zero_()
        if m_sp is not None:
            tr = torch.sum(d, 0, keepdim=True, out=self.ws.get("tr", (1, self.nc), d)[:, : j - i])
            out.add_(fn(tr.clamp_min_(tiny), out=tr).mul_(m_sp))
        if m_euc is not None:
            out.add_(m_euc)
        return out

    def _normalize_(self, Y: Tensor, i: int, j: int, ok: Tensor | None, dt) -> None:
        """Y ← Y·R⁻¹: R = chol(YᵀY) on st, diag of column norms on ob, ‖Y‖_F·I on sp, I on euc;
        components with ``ok`` False are left exactly as they are."""
        nc, b, ws = j - i, self.b, self.ws
        if not self.full:
            yy = torch.mul(Y, Y, out=ws.get("uu", (self.a, b, self.nc), Y)[..., :nc])
            d = torch.sum(yy, 0, out=ws.get("d", (b, self.nc), Y)[:, :nc])  # column norms²
            inv = self._typed_norm_(d, ws.get("nrm", (b, self.nc), Y)[:, :nc], i, j, dt, True)
            if ok is not None:
                inv = torch.where(ok, inv, 1.0)
            Y.mul_(inv.unsqueeze(0))
            return
        P = _soa_tmm(Y, Y, ws.get("M", (b, b, self.nc), Y)[..., :nc])
        Pd = P.diagonal(0, 0, 1).t()
        norm = self._typed_norm_(Pd, ws.get("nrm", (b, self.nc), Y)[:, :nc], i, j, dt, False)
        P.mul_(self.m["st"])  # identity outside st: its Cholesky factor is I
        Pd.add_(self.m["not st"])
        R = ws.get("C", (b, b, self.nc), Y)[..., :nc]
        if b > _SOA_COLS:  # batched LAPACK / cuSOLVER: a few launches, not O(B²)
            R.copy_(torch.linalg.cholesky_ex(P.permute(2, 0, 1), upper=True)[0].permute(1, 2, 0))
        else:
            _soa_chol_(P, R, ws.get("d", (b, self.nc), Y)[:, :nc])
        Rd = R.diagonal(0, 0, 1).t()
        Rd.mul_(self.m["st"]).add_(norm)
        if ok is not None:
            R = torch.where(ok, R, torch.eye(b, dtype=dt, device=Y.device).unsqueeze(-1))
        if b > _SOA_COLS:
            Y.copy_(right_solve_upper(R.permute(2, 0, 1), Y.permute(2, 0, 1)).permute(1, 2, 0))
            return
        for col in range(b):  # forward substitution on the columns: q_j = (y_j − Σ_k<j r_kj q_k) / r_jj
            yj = Y[:, col]
            for kk in range(col):
                yj.addcmul_(Y[:, kk], R[kk, col], value=-1.0)
            yj.div_(R[col, col])


def _mode(hy: _Hyper) -> int:
    """The Triton kernels' momentum mode: 0 none, 3 heavy ball, 2 Nesterov."""
    return 0 if hy.mu == 0 else (2 if hy.nesterov else 3)


def _device_values(values: tuple[float, ...], dt: torch.dtype, dev: torch.device) -> Tensor:
    """``values`` as a tensor filled on the device: a host-to-device copy of a CPU tensor waits
    for the device."""
    out = torch.empty(len(values), dtype=dt, device=dev)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


def _group_order(ids: Tensor, ng: int) -> tuple[Tensor, Tensor, Tensor]:
    """The components sorted by group (stably), where each of the ``ng`` groups' runs starts
    (ng + 1,), and ``ids`` as int32: for :func:`pomfx.fused_gpu.group_sums`, built on the device
    without a host sync."""
    ordered, order = torch.sort(ids.long(), stable=True)
    start = torch.searchsorted(ordered, torch.arange(ng + 1, device=ids.device))
    return order, start, ids.to(torch.int32)


def _soa_tmm(X: Tensor, Y: Tensor, out: Tensor) -> Tensor:
    """XᵀY per component for (A, B, n) X and Y, into ``out`` (B, B, n)."""
    if X.shape[1] > _SOA_COLS:
        return out.copy_(torch.bmm(X.permute(2, 1, 0), Y.permute(2, 0, 1)).permute(1, 2, 0))
    torch.mul(X[0].unsqueeze(1), Y[0].unsqueeze(0), out=out)
    for r in range(1, X.shape[0]):
        out.addcmul_(X[r].unsqueeze(1), Y[r].unsqueeze(0))
    return out


def _soa_sub_mm_(V: Tensor, X: Tensor, C: Tensor) -> None:
    """V −= X·C per component: (A, B, n) V and X, (B, B, n) C."""
    if X.shape[1] > _SOA_COLS:
        V.sub_(torch.bmm(X.permute(2, 0, 1), C.permute(2, 0, 1)).permute(1, 2, 0))
        return
    for r in range(X.shape[1]):
        V.addcmul_(X[:, r].unsqueeze(1), C[r].unsqueeze(0), value=-1.0)


def _soa_chol_(P: Tensor, R: Tensor, d: Tensor) -> Tensor:
    """Upper Cholesky factor R (P = RᵀR, positive diagonal) per component of (B, B, n) P, into
    ``R``; ``d`` is a (B, n) workspace."""
    b = P.shape[0]
    R.zero_()
    tiny = torch.finfo(P.dtype).tiny
    for j in range(b):
        dj = d[: b - j]
        dj.copy_(P[j, j:])
        for k in range(j):
            dj.addcmul_(R[k, j].unsqueeze(0), R[k, j:], value=-1.0)
        torch.clamp(dj[0], min=tiny, out=R[j, j]).sqrt_()
        if j + 1 < b:
            torch.div(dj[1:], R[j, j], out=R[j, j + 1 :])
    return R


# -- the arithmetic of one job ------------------------------------------------------------------
def _finite(t: Tensor) -> Tensor:
    """``isfinite(t)`` as ``t − t == 0`` (NaN and ±inf give NaN): two kernels on CUDA, where
    ``torch.isfinite`` takes four."""
    return (t - t) == 0


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-component inner products of (n, A, B) tensors: (n,); large components summed
    accurately (see :func:`pomfx.manifolds.frobenius_norm`)."""
    n = a.shape[0]
    if a.shape[1] * a.shape[2] > BIG_COMPONENT:
        return (a * b).sum((1, 2))
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).view(n)


def _coldot(a: Tensor, b: Tensor, small: bool) -> Tensor:
    """Per-column inner products of (n, A, B) tensors: (n, B)."""
    if small:
        out = a[:, 0] * b[:, 0]
        for i in range(1, a.shape[1]):
            out.addcmul_(a[:, i], b[:, i])
        return out
    return torch.linalg.vecdot(a, b, dim=1)  # (einsum here: 30× slower on a 1024×256 block)


def _tmm(a: Tensor, b: Tensor, small: bool) -> Tensor:
    """aᵀb per component: (n, B, B)."""
    if small:
        out = a[:, 0, :, None] * b[:, 0, None, :]
        for i in range(1, a.shape[1]):
            out.addcmul_(a[:, i, :, None], b[:, i, None, :])
        return out
    return torch.bmm(a.transpose(1, 2), b)


def _sub_mm_(v: Tensor, a: Tensor, c: Tensor, small: bool) -> None:
    """v -= a @ c, in place, for (n, A, B) v and a and (n, B, B) c."""
    if small:
        for j in range(a.shape[2]):
            v.addcmul_(a[:, :, j, None], c[:, None, j, :], value=-1.0)
    else:
        v.baddbmm_(a, c, alpha=-1.0)


def _sym(a: Tensor) -> Tensor:
    return (a + a.transpose(1, 2)).mul_(0.5)


def _chol_qr_small_(y: Tensor, ok: Tensor | None) -> None:
    """y ← Q of y = QR (R upper, positive diagonal), in place, by Cholesky-QR in tensor ops.

    ``ok`` (n,) bool: components where it is False are left exactly as they are.
    """
    n, _, b = y.shape
    m = _tmm(y, y, True)
    r = torch.zeros_like(m)
    for j in range(b):
        d = m[:, j, j:] - (r[:, :j, j, None] * r[:, :j, j:]).sum(1) if j else m[:, j, j:]
        rjj = d[:, 0].clamp_min(torch.finfo(y.dtype).tiny).sqrt()
        r[:, j, j] = rjj
        if j + 1 < b:
            r[:, j, j + 1 :] = d[:, 1:] / rjj[:, None]
    if ok is not None:
        eye = torch.eye(b, dtype=y.dtype, device=y.device)
        r = torch.where(ok.view(n, 1, 1), r, eye)
    for j in range(b):  # forward substitution on the columns: q_j = (y_j - Σ_k<j r_kj q_k) / r_jj
        col = y[:, :, j]
        for k in range(j):
            col.addcmul_(y[:, :, k], r[:, k, j, None], value=-1.0)
        col.div_(r[:, j, j, None])


def _chol_qr_(y: Tensor, ok: Tensor | None, small: bool, twice: bool | None) -> None:
    """y ← Q of y = QR, in place (components not ``ok`` left as they are). ``twice``: repeat
    the Cholesky-QR; None (large blocks on a CPU): repeat it only where the first Gram matrix
    may be ill-conditioned (:func:`_well_conditioned`)."""
    if small:
        _chol_qr_small_(y, ok)
        if twice:
            _chol_qr_small_(y, ok)
        return
    q = y
    for i in range(2):  # y = x + ξ, ξ tangent: well conditioned, its Gram matrix is I + ξᵀξ
        g = q.transpose(1, 2) @ q
        r = torch.linalg.cholesky_ex(g, upper=True)[0]
        q = right_solve_upper(r, q)
        if i == 0 and twice is None and _well_conditioned(g):
            break
    y.copy_(q if ok is None else torch.where(ok.view(-1, 1, 1), q, y))


def _well_conditioned(gram: Tensor) -> bool:
    """Whether every (B, B) Gram matrix has κ ≤ 1 + ``_RESTEP`` by Gershgorin's discs
    (λ_max ≤ max_i Σ_j |g_ij|, λ_min ≥ min_i (g_ii − Σ_{j≠i} |g_ij|)): then one Cholesky-QR is
    orthonormal to rounding (error ~ κ·ε), as the small-component rule ‖ξ‖²_F ≤ ``_RESTEP``
    guarantees; an O(B²) test that spares the second O(A·B²) pass of large blocks."""
    rows = gram.abs().sum(-1)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    lo = (2 * diag - rows).amin(-1)
    return bool((rows.amax(-1) <= (1 + _RESTEP) * lo).all())


def _update(job: _Job, x: Tensor, g: Tensor, v: Tensor | None, s: Tensor, first, hy: _Hyper) -> None:
    """One FG-SGD step of the (n, A, B) components ``x`` with raw gradient ``g``, momentum ``v``
    and scales ``s`` (None: ``g`` is scaled already), in place on x and v. See the module
    docstring for the formulas. ``job.parts`` splits the components into ranges of one manifold
    each: the manifolds' own pieces (normal part, retraction, transport) run range by range,
    the rest (momentum, step size, the move) once over all."""
    small, n, b = job.small, x.shape[0], x.shape[2]
    parts = job.parts
    if s is not None:
        g = g * s  # 1/R² of every element: (n, A, 1) or (n, 1, B), a broadcast over output channels
    # 1. the normal part of the gradient, whose reduction also tells finite components (on a
    # CPU, for free; batched, one sum over g instead: three launches for all the manifolds)
    coefs, fins = [], []
    for man, i, j in parts:
        a, fin = _normal_coef(man, x[i:j], g[i:j], small, finite=not job.cuda)
        coefs.append(a)
        fins.append(fin)
    if job.cuda:
        fin = _finite(g.sum((1, 2)))
    else:
        fin = fins[0] if len(fins) == 1 else torch.cat(fins)
    if job.gid is not None:
        bad = torch.zeros(job.ng, dtype=torch.int32, device=x.device).index_add_(0, job.gid, (~fin).int())
        ok = bad[job.gid] == 0
    else:
        ok = fin
    if not job.cuda and bool(ok.all()):
        ok = None  # CPU: the check is free, and the arithmetic below needs no masks
    if ok is not None:
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        coefs = [
            a if a is None else torch.where(ok[i:j].view((j - i,) + (1,) * (a.dim() - 1)), a, 0.0)
            for a, (_, i, j) in zip(coefs, parts)
        ]
        okf = ok.to(x.dtype)
    # coefficient of the gradient in d (and in the momentum buffer)
    mu = hy.mu
    sign = -1.0 if hy.maximize else 1.0
    k = 1.0 if mu == 0 or hy.nesterov else _damp_factor(first, hy.damp, x)
    cg = sign * k  # scalar or (n,)
    if ok is not None:
        cg = cg * okf
    cg3 = cg.view(n, 1, 1) if isinstance(cg, Tensor) else cg
    cg1 = cg if isinstance(cg, Tensor) else torch.full((n,), cg, dtype=x.dtype, device=x.device)

    def add_d(out: Tensor) -> None:
        """out += k·d (out already holds k·s·g): subtract the normal part, add weight decay."""
        for (man, i, j), a in zip(parts, coefs):
            o, xs, m = out[i:j], x[i:j], j - i
            if man == "sp":
                o.addcmul_(xs, (cg1[i:j] * a).view(m, 1, 1), value=-1.0)
            elif man == "ob":
                o.addcmul_(xs, (cg1[i:j, None] * a).view(m, 1, b), value=-1.0)
            elif man == "st":
                _sub_mm_(o, xs, _sym(a).mul_(cg1[i:j].view(m, 1, 1)), small)
            elif hy.wd:
                wd = hy.wd * (k if isinstance(k, float) else k[i:j].view(m, 1, 1))
                if ok is not None:
                    wd = okf[i:j].view(m, 1, 1) * wd
                if isinstance(wd, Tensor):
                    o.addcmul_(xs, wd)
                else:
                    o.add_(xs, alpha=wd)

    def mul_g(out: Tensor | None) -> Tensor:
        if isinstance(cg3, Tensor):
            return torch.mul(g, cg3) if out is None else out.addcmul_(g, cg3)
        return torch.mul(g, cg3) if out is None else out.add_(g, alpha=cg3)

    # 2. momentum
    mu_eff = mu if ok is None else torch.where(ok, torch.full_like(okf, mu), 1.0).view(n, 1, 1)
    if mu != 0 and not hy.nesterov:
        v.mul_(mu_eff)
        mul_g(v)
        add_d(v)
        u = v
    else:
        u = mul_g(None)
        add_d(u)
        if mu != 0:
            v.mul_(mu_eff).add_(u)
            u.add_(v, alpha=mu)
    # 3. step size and the move; Euclidean components: lr
    lr = hy.lr
    if all(man == "euc" for man, _, _ in parts):
        h = lr if ok is None else okf.view(n, 1, 1) * lr
        if isinstance(h, Tensor):
            x.addcmul_(u, h, value=-1.0)
        else:
            x.add_(u, alpha=-h)
        return
    qc = {}  # per oblique range: ‖u‖² of every column
    if len(parts) == 1 and parts[0][0] == "ob":
        qc[0] = _coldot(u, u, small)
        q = qc[0].sum(1)
    else:
        q = _dot(u, u)
        qc = {r: _coldot(u[i:j], u[i:j], small) for r, (man, i, j) in enumerate(parts) if man == "ob"}
    qg = (
        q
        if job.gid is None
        else torch.zeros(job.ng, dtype=q.dtype, device=q.device).index_add_(0, job.gid, q)
    )
    f = (hy.radius * job._norms(q.dtype) / (qg.sqrt() * lr).clamp_min(1e-30)).clamp_(max=1.0)
    if job.gid is not None:
        f = f[job.gid]
    for man, i, j in parts:
        if man == "euc":
            f[i:j] = 1.0
    h = f * lr
    if ok is not None:
        h = h * okf
    x.addcmul_(u, h.view(n, 1, 1), value=-1.0)
    # 4. retraction and transport, manifold by manifold
    for r, (man, i, j) in enumerate(parts):
        oks, okfs = (None, None) if ok is None else (ok[i:j], okf[i:j])
        _retract_transport(
            man, x[i:j], None if mu == 0 else v[i:j], h[i:j], q[i:j], qc.get(r), oks, okfs, job, hy
        )


def _normal_coef(
    man: str, x: Tensor, g: Tensor, small: bool, finite: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """The coefficients of the normal part of ``g`` at ``x`` (ωᵀg's trace on sp, its diagonal
    on ob, the whole B×B product on st, none on euc) and which components they say are finite
    (None unless ``finite``)."""
    n = x.shape[0]
    if man == "sp":
        a = _dot(x, g)
    elif man == "ob":
        a = _coldot(x, g, small)
    elif man == "st":
        a = _tmm(x, g, small)
    else:
        a = None
    if not finite:
        return a, None
    fin = _finite(g if a is None else a)
    return a, fin if fin.dim() == 1 else fin.view(n, -1).all(1)


def _retract_transport(man, x, v, h, q, qc, ok, okf, job: _Job, hy: _Hyper) -> None:
    """Components of one manifold after the move (``x`` = ω + ξ): back onto the manifold, and
    the momentum ``v`` (None: none) transported there. ``q`` and, on ob, ``qc``: ‖u‖² of each
    component and of each column; ``h`` the step sizes; ``ok``/``okf``: the masks (or None)."""
    n, b, small = x.shape[0], x.shape[2], job.small
    if man == "sp":
        inv = _dot(x, x).rsqrt_()
        if ok is not None:
            inv = torch.where(ok, inv, 1.0)
        x.mul_(inv.view(n, 1, 1))
        if v is not None:  # v ← v − ⟨ω', v⟩ω'; for u = v: ⟨ω', v⟩ = −h‖v‖²/‖ω+ξ‖
            t = -_dot(x, v) if hy.nesterov else h * q * inv
            if ok is not None and hy.nesterov:
                t = t * okf
            v.addcmul_(x, t.view(n, 1, 1))
    elif man == "ob":
        inv = _coldot(x, x, small).rsqrt_()
        if ok is not None:
            inv = torch.where(ok.view(n, 1), inv, 1.0)
        x.mul_(inv.view(n, 1, b))
        if v is not None:
            t = -_coldot(x, v, small) if hy.nesterov else h.view(n, 1) * qc * inv
            if ok is not None and hy.nesterov:
                t = t * okf.view(n, 1)
            v.addcmul_(x, t.view(n, 1, b))
    elif man == "st":
        if job.cuda:
            twice = True  # no host sync
        else:  # small components: by the step's size; blocks: by the Gram matrix (None)
            twice = bool(((h * h) * q).max() > _RESTEP) if small else None
        _chol_qr_(x, ok, small, twice)
        if v is not None:
            c = _sym(_tmm(x, v, small))
            if ok is not None:
                c.mul_(okf.view(n, 1, 1))
            _sub_mm_(v, x, c, small)


def _block_step(X, G, V, S, srow: bool, types, cg, wdk, norm_g, hy: _Hyper, radius: float) -> None:
    """:func:`pomfx.fused.block_step` with the group's hyperparameters. Without momentum the
    kernel neither reads nor writes V: X stands in for it."""
    V = X if V is None else V
    fused.block_step(X, G, V, S, srow, types, cg, wdk, norm_g, hy.mu, hy.nesterov, hy.lr, radius, _RESTEP)


def _block_coefs(k, n: int, euc, hy: _Hyper) -> tuple[Tensor, Tensor]:
    """:func:`pomfx.fused.block_step`'s coefficients, float64 (n,): the gradient's ``cg = ±k``
    (its sign, and the damping factor k: a float or (n,)) and euc's weight decay ``wd·k``
    (``euc``: whether the blocks are euc, a bool or an (n,) float mask)."""
    k = torch.as_tensor(k, dtype=torch.float64).expand(n)
    cg = (k * (-1.0 if hy.maximize else 1.0)).contiguous()
    return cg, (k * (hy.wd * torch.as_tensor(euc, dtype=torch.float64))).expand(n).contiguous()


def _damp_factor(first, damp: float, x: Tensor):
    """1 − τ, except 1 on a parameter's first step (torch's SGD sets the buffer to d then)."""
    if isinstance(first, Tensor):
        return torch.full(first.shape, 1.0 - damp, dtype=x.dtype, device=x.device).masked_fill_(first, 1.0)
    return 1.0 if first else 1.0 - damp
