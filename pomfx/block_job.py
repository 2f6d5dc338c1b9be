"""FG-SGD's block jobs: (n, A, B) components of 1×1 convs and linears, bucketed by shape across
layers (:func:`pomfx.optim._plan`).

A job concatenates its segments (a bucket's components, or a range of them) and steps them
together: on a CPU by :func:`pomfx.fused.block_step` where the job is small, else by
:func:`update` in torch ops manifold by manifold; on CUDA by :func:`pomfx.fused_gpu.block_step`,
every manifold at once. The result is copied back into the layers in one launch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import fused, fused_gpu
from .jobs import TYPE_CODE, Hyper, Job, block_coefs, damp_factor, fused_block_step, group_order
from .parametrization import ComponentParameter
from .small_matrix import RESTEP, chol_qr_, coldot, dot, isfinite, sub_mm_, sym, tmm

__all__ = ["BlockJob", "Segment", "update"]

_SMALL_ROWS, _SMALL_COLS = 16, 8  # components up to this size use elementwise small-matrix ops


class Segment:
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


class BlockJob(Job):
    """Block segments of one kind, stepped together (concatenated when there are several)."""

    def __init__(self, kind: tuple, segs: list[Segment]):
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

    def _fused_update(self, x: Tensor, g: Tensor, v: Tensor | None, s: Tensor, first, hy: Hyper) -> None:
        """:func:`update` by :func:`pomfx.fused.block_step`: the same formulas, per block."""
        n = x.shape[0]
        k = 1.0 if hy.mu == 0 or hy.nesterov else damp_factor(first, hy.damp, x)
        if self._types is None:
            self._types = torch.full((n,), TYPE_CODE[self.manifold], dtype=torch.int8)
        cg, wdk = block_coefs(k, n, self.manifold == "euc", hy)
        S = s.reshape(n, -1).contiguous()
        fused_block_step(
            x, g.contiguous(), v, S, s.shape[2] == 1, self._types, cg, wdk, self.norm_g, hy, hy.radius
        )

    def _triton_step(self, x: Tensor, g: Tensor, v: Tensor | None, first, hy: Hyper) -> None:
        """The step by :func:`pomfx.fused_gpu.block_step`, every manifold of the job at once;
        its per-component tables built once (the scales' when they change)."""
        a, b, dt, dev = self.rows, self.cols, x.dtype, x.device
        t = fused_gpu.block_tiles(a, b)[2]
        types, gid, order, start = self._cache("blk", dev, lambda: self._tables(t, dev))
        self.scales()  # (the scale key brought up to date)
        srow, scol = self._cache("s", (self._scale_key, dt), lambda: self._row_col_scales(dt))
        k = 1.0 if hy.mu == 0 or hy.nesterov else damp_factor(first, hy.damp, x)
        st = next(((i, j) for man, i, j in self.parts if man == "st"), (0, 0))  # (contiguous: by manifold)
        self._gpu_block_step(x, g, v, srow, scol, types, gid, order, start, k, hy, st)

    def _tables(self, t: int, dev: torch.device) -> tuple[Tensor, ...]:
        """Manifold codes (n,) int8, groups (n,) int32, and the (component, tile) partial sums of
        ‖u‖² ordered by group, for :func:`pomfx.fused_gpu.group_sums`."""
        codes = [torch.full((j - i,), TYPE_CODE[man], dtype=torch.int8) for man, i, j in self.parts]
        ids = torch.arange(self.n, device=dev) if self.gid is None else self.gid.to(dev)
        order, start, _ = group_order(ids.repeat_interleave(t), self.ng)
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

    def run(self, flat: dict, first: dict, hy: Hyper) -> None:
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
            update(self, x, self._scaled_grad(gs), v, None, k_first, hy)
        else:
            g, s = self._cat(gs), self.scales()
            if s.dtype != x.dtype:
                s = s.to(x.dtype)
            if self.fusable and x.dtype in (torch.float32, torch.float64) and fused.enabled():
                self._fused_update(x, g, v, s, k_first, hy)
            else:
                update(self, x, g, v, s, k_first, hy)
        if len(segs) > 1:  # back into the layers, in one (foreach) launch
            torch._foreach_copy_(xs, list(x.view(-1).split([t.numel() for t in xs])))
            if momentum:
                torch._foreach_copy_(vs, list(v.view(-1).split([t.numel() for t in vs])))


def update(job: BlockJob, x: Tensor, g: Tensor, v: Tensor | None, s: Tensor, first, hy: Hyper) -> None:
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
        fin = isfinite(g.sum((1, 2)))
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
    k = 1.0 if mu == 0 or hy.nesterov else damp_factor(first, hy.damp, x)
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
                sub_mm_(o, xs, sym(a).mul_(cg1[i:j].view(m, 1, 1)), small)
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
        qc[0] = coldot(u, u, small)
        q = qc[0].sum(1)
    else:
        q = dot(u, u)
        qc = {r: coldot(u[i:j], u[i:j], small) for r, (man, i, j) in enumerate(parts) if man == "ob"}
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
        a = dot(x, g)
    elif man == "ob":
        a = coldot(x, g, small)
    elif man == "st":
        a = tmm(x, g, small)
    else:
        a = None
    if not finite:
        return a, None
    fin = isfinite(g if a is None else a)
    return a, fin if fin.dim() == 1 else fin.view(n, -1).all(1)


def _retract_transport(man, x, v, h, q, qc, ok, okf, job: BlockJob, hy: Hyper) -> None:
    """Components of one manifold after the move (``x`` = ω + ξ): back onto the manifold, and
    the momentum ``v`` (None: none) transported there. ``q`` and, on ob, ``qc``: ‖u‖² of each
    component and of each column; ``h`` the step sizes; ``ok``/``okf``: the masks (or None)."""
    n, b, small = x.shape[0], x.shape[2], job.small
    if man == "sp":
        inv = dot(x, x).rsqrt_()
        if ok is not None:
            inv = torch.where(ok, inv, 1.0)
        x.mul_(inv.view(n, 1, 1))
        if v is not None:  # v ← v − ⟨ω', v⟩ω'; for u = v: ⟨ω', v⟩ = −h‖v‖²/‖ω+ξ‖
            t = -dot(x, v) if hy.nesterov else h * q * inv
            if ok is not None and hy.nesterov:
                t = t * okf
            v.addcmul_(x, t.view(n, 1, 1))
    elif man == "ob":
        inv = coldot(x, x, small).rsqrt_()
        if ok is not None:
            inv = torch.where(ok.view(n, 1), inv, 1.0)
        x.mul_(inv.view(n, 1, b))
        if v is not None:
            t = -coldot(x, v, small) if hy.nesterov else h.view(n, 1) * qc * inv
            if ok is not None and hy.nesterov:
                t = t * okf.view(n, 1)
            v.addcmul_(x, t.view(n, 1, b))
    elif man == "st":
        if job.cuda:
            twice = True  # no host sync
        else:  # small components: by the step's size; blocks: by the Gram matrix (None)
            twice = bool(((h * h) * q).max() > RESTEP) if small else None
        chol_qr_(x, ok, small, twice)
        if v is not None:
            c = sym(tmm(x, v, small))
            if ok is not None:
                c.mul_(okf.view(n, 1, 1))
            sub_mm_(v, x, c, small)
