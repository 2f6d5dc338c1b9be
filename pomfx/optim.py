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
interleaved: one :class:`pomfx.kernel_job.KernelJob` applies the four manifolds' formulas side
by side with per-component masks, as elementwise ops over the contiguous component axis (a B×B
product of 3×3 kernels is 3 fused multiply-adds over N, where a batched matmul or LAPACK call
per component would be 10-40× slower on CPU; :mod:`pomfx.small_matrix`); on a CPU that job is
numba's (:mod:`pomfx.fused`): two phases with the group step sizes between them, or, when a
bound on each component's step (summed over its group where needed) shows that no group's step
can be capped (the usual case), the whole step in one pass over ω, g and v. Block layers
(K = 1) are bucketed: same manifold and shape, across layers, one
:class:`pomfx.block_job.BlockJob`; on a CPU a job of small blocks runs as one numba loop
(:func:`pomfx.fused.block_step`, the same formulas per block, in float64), and so does a kernel
layer whose components are too large for the unrolled kernels (5×5, 7×7), each component a
block, where no group's step is capped. On CPU, work is cut into chunks of about ``chunk``
elements so that its passes run in cache, temporaries live in persistent workspaces (fresh
large allocations page-fault on every step), and a non-finite check costs one reduction; on
CUDA ("batched" mode) all kernel layers of a shape form one job: with Triton
(:mod:`pomfx.fused_gpu`), components of up to 16 entries take three kernels, u's norms and the
step per layer and the group sums per job; larger ones (5×5, 7×7) go as blocks; without Triton
(``POMFX_TRITON=0``) the job runs in one chunk with the same elementwise ops (batched matmuls
and cuSOLVER's batched Cholesky on 3×3 matrices measured 20× slower on an H100). All blocks of a
shape form another job: with Triton (:func:`pomfx.fused_gpu.block_step`) every manifold at
once, Triton kernels around the Stiefel blocks' batched products, Cholesky factors and
triangular solves (~26 launches); otherwise the manifolds' own pieces range by range (~75).
Nothing syncs with the host: the step is bound by the launches it issues there
(``benchmarks/launch_count.py`` counts them on any machine, ``benchmarks/host_cost.py`` times
the host's share). The step's matmuls are IEEE float32 whatever the user's TF32 setting
(:func:`pomfx.manifolds.ieee_matmuls`): a TF32 Gram matrix would retract ω off Stiefel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from .block_job import BlockJob, Segment
from .jobs import TYPE_CODE, Hyper, Workspace
from .kernel_job import KernelJob
from .manifolds import ieee_matmuls
from .parametrization import ComponentParameter

__all__ = ["FGSGD"]

_NONFINITE = ("skip", "raise")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


_CHUNK = 1 << 18  # elements per CPU job: x, grad, momentum and temporaries stay in cache


_BATCH = 1 << 26  # elements per batched (CUDA) job at most: its copies and temporaries, ~8 × 256 MB


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
        self._plans: dict = {}  # (group index, params with grads) -> list of BlockJob
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
        hyper = Hyper(group)
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


def _plan(params: list[ComponentParameter], chunk: int, batched: bool | None) -> list:
    """The jobs of one step. Chunked (CPU): one :class:`~pomfx.kernel_job.KernelJob` per kernel
    layer, cut into chunks of ~``chunk`` elements; block buckets cut at group boundaries into
    such chunks, small ones merged by kind (manifold, shape, dtype, device) into
    :class:`~pomfx.block_job.BlockJob` s. Batched (CUDA): fewest kernel launches: one job for all
    kernel layers of a shape, one for all blocks of a shape (every manifold, both broadcasts of
    R; segments ordered by manifold)."""
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
                    kinds.setdefault(kind, []).append(Segment(p, b, bi, c0, c1))
    shared = Workspace()
    for ps in kernels.values():
        cuda = ps[0].device.type != "cpu" if batched is None else batched
        for layers in _packs(ps, [p.numel() for p in ps], _BATCH):
            jobs.append(KernelJob(layers, chunk, cuda, shared))
    for kind, segs in kinds.items():
        cuda = kind[3]
        segs.sort(key=lambda seg: TYPE_CODE[seg.b.manifold])  # each manifold's components together
        for pack in _packs(segs, [seg.numel for seg in segs], _BATCH if cuda else chunk):
            jobs.append(BlockJob(kind, pack))
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
