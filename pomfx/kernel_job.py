"""FG-SGD's kernel jobs: k×k conv layers, their components structure-of-arrays (A, B, N) in
weight order, every manifold side by side (:class:`KernelJob`).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import Tensor

from . import fused, fused_gpu
from .jobs import (
    TYPE_CODE,
    Hyper,
    Job,
    Workspace,
    block_coefs,
    fused_block_step,
    group_order,
    step_mode,
)
from .manifolds import right_solve_upper
from .parametrization import ComponentParameter
from .small_matrix import RESTEP, SOA_COLS, isfinite, soa_chol_, soa_sub_mm_, soa_tmm

__all__ = ["KernelJob"]


class KernelJob(Job):
    """One kernel layer (batched, on CUDA: every kernel layer of a shape): ω is ``(A, B, N)``
    (see :class:`pomfx.parametrization.POM`), its components of all manifolds interleaved in
    weight order. Every operation is a small-matrix one written as elementwise ops over the
    contiguous N axis, with per-component masks choosing the manifold's formula (sphere,
    oblique, Stiefel and Euclidean share one skeleton: the normal part of a vector Y is
    ``ω·C(ωᵀY)`` and the retraction is ``(ω+ξ)·R⁻¹``, for a per-manifold C and triangular R).
    Groups are scattered over N, so the step has two phases over chunks: the momentum and the
    norms, then (after the per-group step size) retraction and transport."""

    def __init__(self, params: list[ComponentParameter], chunk: int, batched: bool, shared: Workspace):
        poms = [p.pom for p in params]
        self.params = params
        self.shared = shared  # scratch shared by the layers of a step (the fused step's u)
        self.a, self.b = poms[0]._shape
        self.sizes = [int(pom.comp_type.numel()) for pom in poms]
        self.n = sum(self.sizes)
        self.cuda = batched  # batched: one chunk and no host sync (the same elementwise ops)
        types = torch.cat([pom.comp_type for pom in poms]) if len(poms) > 1 else poms[0].comp_type
        present = set(torch.unique(types).tolist())
        self.has = {name: code in present for name, code in TYPE_CODE.items()}
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
        self.ws = Workspace()
        starts = np.cumsum([0, *self.sizes]).tolist()
        self.spans = list(zip(starts, starts[1:]))  # each layer's components
        # components too large for the unrolled kernels: numba's block step, one block each
        self.blockwise = not self.cuda and fused.kernel_blocks(self.a, self.b)
        if self.blockwise:
            self.euc = (types == TYPE_CODE["euc"]).double()
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
        self.m = {name: (m[code] if self.has[name] else None) for name, code in TYPE_CODE.items()}
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

    def run(self, flat: dict, first: dict, hy: Hyper) -> None:
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

    def _triton_step(self, parts: list[tuple], first: dict, hy: Hyper) -> None:
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
        order, start, gid = self._cache("groups", dev, lambda: group_order(self.ids, self.ng))
        hyp = self._hyper(hy, dt, dev)
        mode = step_mode(hy)
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

    def _triton_blocks(self, parts: list[tuple], first: dict, hy: Hyper) -> None:
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
        self._gpu_block_step(X, G, V, srow, scol, types, gid, order, start, k, hy, self.st_range)
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
        order, start, _ = group_order(gid.repeat_interleave(t), self.ng)
        return perm, self.types[perm], gid, order, start

    def _blocks(self, parts: list[tuple], first: dict, hy: Hyper) -> bool:
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
        cg, wdk = self._cache("cg", key, lambda: block_coefs(k, n, self.euc, hy))
        norm_c = self._comp_norms(torch.float64)
        for ((X, G, V), c), (x, _, v) in zip(layers, parts):
            fused_block_step(X, G, V, S[c], False, self.types[c], cg[c], wdk[c], norm_c[c], hy, radius)
            x.view(a, b, -1).copy_(X.permute(1, 2, 0))
            if v is not None:
                v.view(a, b, -1).copy_(V.permute(1, 2, 0))
        return True

    def _damping(self, first: dict, hy: Hyper, like: Tensor):
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
        self, segs: list[tuple], spans: list, first: dict, hy: Hyper, s: Tensor, vnorm: dict
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
        twice = self.full and big > RESTEP  # (per component: only where h²q > RESTEP)
        transport, ok = mu != 0, self._ones()  # V ← transported u (on euc, u itself)
        for (x, _, v), u, (i, j) in zip(segs, us, spans):
            u, v = u.view(x.shape), v if transport else None
            fused.phase_b(x, u, v, h[i:j], self.types[i:j], ok[i:j], twice, transport, u, q[i:j], RESTEP)
        return True

    def _coefs(self, s: Tensor, k, hy: Hyper) -> tuple[Tensor, Tensor, Tensor]:
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
        self, segs: list[tuple], spans: list, cg: Tensor, mu_n: Tensor, wd_n: Tensor, hy: Hyper, vnorm: dict
    ) -> bool:
        """The fused step in one pass (:func:`pomfx.fused.one_pass`) when a bound shows that no
        group's step size is capped, as is usual: every group then steps by lr, and the two
        phases' result is that of one pass, bit for bit. Returns whether it ran.

        The bound (:func:`pomfx.fused.within`): with e_c ≥ ‖u_c‖ and Σ_{c∈g} e_c² ≤ δ²‖ω_g‖²/lr²,
        ‖u_g‖² = Σ_c ‖u_c‖² ≤ δ²‖ω_g‖²/lr², so the cap min(1, δ‖ω_g‖/(lr‖u_g‖)) is 1; ‖ω_c‖² is
        1 on sp and B on ob and st. Where some Stiefel component has e_c² > ``RESTEP``/lr², the
        pass chooses per component whether to do the Cholesky-QR twice, as phase B does (h²q >
        ``RESTEP``). A 1/64 margin covers rounding. It costs a pass over G, against phase A's
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
            fused.one_pass(x, g, v, *c, lr, norms, twice[k], RESTEP)
            if norms is not None:
                self._vnorm[k] = (weakref.ref(bufs[k]), bufs[k]._version, norms)
        return True

    def _limits(self, lr: float, radius: float, dt: torch.dtype) -> Tensor:
        """The one-pass bound's limits on e_c² (see :func:`pomfx.fused.within`), less a 1/64 margin
        for rounding: per manifold (sp, ob, st, euc) a component's share δ²‖ω_c‖²/lr² of its
        group's limit, then ``RESTEP``/lr², above which a Stiefel component may need a second
        Cholesky-QR."""
        big = float(torch.finfo(dt).max)
        scale = (1 - 1 / 64) / lr**2 if lr > 0 else big
        cap = [radius**2, radius**2 * self.b, radius**2 * self.b, big, RESTEP]
        return torch.tensor([min(c * scale, big) for c in cap], dtype=dt)

    def _group_limits(self, lr: float, radius: float, dt: torch.dtype) -> Tensor:
        """(G,) each group's limit on Σ_c e_c²: δ²‖ω_g‖²/lr² less the 1/64 margin (none on euc)."""
        big = torch.finfo(dt).max
        scale = radius**2 * (1 - 1 / 64) / lr**2 if lr > 0 else math.inf
        euc = torch.zeros(self.ng, dtype=torch.bool).index_fill_(
            0, self.ids[self.types == TYPE_CODE["euc"]].long(), True
        )
        return (self._norms(torch.float64).square() * scale).clamp_(max=big).masked_fill_(euc, big).to(dt)

    def _run(self, segs: list[tuple], first: dict, hy: Hyper, fuse: bool) -> None:
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
        fin = isfinite(gsum)
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
            f = torch.where(self.types == TYPE_CODE["euc"], 1.0, f)
        h = f.mul_(lr) if isinstance(lr, float) else f * lr
        if okf is not None:
            h = h * okf
        twice = self.full and (self.cuda or bool(((h * h) * q).max() > RESTEP))

        # phase B: retraction, then transport of the momentum
        if fuse:
            ok = self._ones() if ok is None else ok
            transport = mu != 0 and self.constrained
            for (x, _, v), u, (i, j) in zip(segs, Us, spans):
                v = v if transport else None
                t = self.types[i:j]
                fused.phase_b(x, u, v, h[i:j], t, ok[i:j], twice, transport, None, q[i:j], RESTEP)
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
            M = soa_tmm(X, Y, ws.get("M", (b, b, self.nc), X)[..., :nc])
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
            soa_sub_mm_(V, X, C)

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
        P = soa_tmm(Y, Y, ws.get("M", (b, b, self.nc), Y)[..., :nc])
        Pd = P.diagonal(0, 0, 1).t()
        norm = self._typed_norm_(Pd, ws.get("nrm", (b, self.nc), Y)[:, :nc], i, j, dt, False)
        P.mul_(self.m["st"])  # identity outside st: its Cholesky factor is I
        Pd.add_(self.m["not st"])
        R = ws.get("C", (b, b, self.nc), Y)[..., :nc]
        if b > SOA_COLS:  # batched LAPACK / cuSOLVER: a few launches, not O(B²)
            R.copy_(torch.linalg.cholesky_ex(P.permute(2, 0, 1), upper=True)[0].permute(1, 2, 0))
        else:
            soa_chol_(P, R, ws.get("d", (b, self.nc), Y)[:, :nc])
        Rd = R.diagonal(0, 0, 1).t()
        Rd.mul_(self.m["st"]).add_(norm)
        if ok is not None:
            R = torch.where(ok, R, torch.eye(b, dtype=dt, device=Y.device).unsqueeze(-1))
        if b > SOA_COLS:
            Y.copy_(right_solve_upper(R.permute(2, 0, 1), Y.permute(2, 0, 1)).permute(1, 2, 0))
            return
        for col in range(b):  # forward substitution on the columns: q_j = (y_j − Σ_k<j r_kj q_k) / r_jj
            yj = Y[:, col]
            for kk in range(col):
                yj.addcmul_(Y[:, kk], R[kk, col], value=-1.0)
            yj.div_(R[col, col])
