"""The POM parametrization: a layer's weight as ``W = R ⊙ ω`` with ω on a product of manifolds.

``ω`` is stored as one flat :class:`ComponentParameter` per layer (the ``original`` of a
``torch.nn.utils.parametrize`` parametrization). The forward multiplies it by the scale buffer
``R`` (DESIGN §1, renormalization)::

    W[p, q, :] = R[p, q] · ω_(p,q)        R[p, q] = κ · γ[p, q] / λ̂[c(p, q)]

γ is the manifold's geometric scale (1 for sp, 1/√B for ob and st, 1 for euc), λ̂_c the std of
input channel c relative to the layer's mean (committed by :func:`pomfx.update_scales`), and κ
the RMS Frobenius norm of the layer's components at conversion. κ is pomfx's reading: since
γ‖ω‖_F = 1 on every constrained manifold, κ keeps the converted layer at the scale of the
user's own initialisation, which is what lets FG-SGD reproduce SGD's effective step (see
:mod:`pomfx.optim`). ``renorm=False`` fixes R = 1 (the paper's ablation without stage (ii)).

Storage (see :class:`POM`): kernel layouts keep ω in the weight's own order, structure of
arrays, so that the forward is one multiply and no gather (a gather of 3×3 kernels costs ~30
elementwise passes on CPU); block layouts keep the layout's bucket order and scatter elements.

Memory: besides ω, a converted block layer keeps per weight element only its R (the ``scale``
buffer) and the layout's ``inverse`` (int32): 12 bytes, against the 4 of the plain weight (γ,
the input channels, the inverse permutation and FG-SGD's 1/R² in storage order are computed
when needed or kept per block, never per element).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import fused, fused_gpu
from . import manifolds as _m
from .layout import Layout

__all__ = ["ComponentParameter", "POM", "LAMBDA_CLAMP"]

LAMBDA_CLAMP = (0.1, 10.0)  # λ̂ = λ_c / mean(λ) is clamped here: dead or exploding channels


class ComponentParameter(nn.Parameter):
    """The flat storage ω of a converted weight; ``.pom`` is the :class:`POM` that reads it.

    A Parameter subclass, so that FG-SGD recognises constrained weights by type (DESIGN §5:
    attributes on a plain Parameter do not survive ``deepcopy``). ``deepcopy`` and pickling keep
    the type and the link to the POM (through the copy memo, to the copied POM).
    """

    def __new__(cls, data: Tensor, pom: POM | None = None, requires_grad: bool = True):
        p = super().__new__(cls, data, requires_grad)
        p.pom = pom
        return p

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = type(self)(self.data.clone(memory_format=torch.preserve_format), None, self.requires_grad)
        memo[id(self)] = result
        result.pom = copy.deepcopy(self.pom, memo)
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_component, (self.data, self.requires_grad, self.pom))

    def __repr__(self) -> str:
        return f"ComponentParameter({tuple(self.shape)}, {self.dtype})"


def _rebuild_component(data: Tensor, requires_grad: bool, pom) -> ComponentParameter:
    return ComponentParameter(data, pom, requires_grad)


def _sum_squares(t: Tensor) -> float:
    """Σ t² in float64, from float32 partial sums over rows of 4096 (``vector_norm`` of a long
    fp32 vector accumulates in a few lanes and loses digits; a float64 copy costs a pass)."""
    t = t.reshape(-1)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    cut = t.numel() - t.numel() % 4096
    parts = [torch.linalg.vector_norm(t[:cut].view(-1, 4096), dim=1)] if cut else []
    if cut < t.numel():
        parts.append(torch.linalg.vector_norm(t[cut:]).reshape(1))
    if not parts:
        return 0.0
    return float(torch.cat(parts).double().square().sum())


def _fused_map(t: Tensor) -> bool:
    """Whether the fused CPU kernels (:mod:`pomfx.fused`) may map ``t`` (CPU, fp32/fp64, not
    traced: under torch.compile the torch ops are traced instead)."""
    return (
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.float64)
        and fused.enabled()
        and not torch.compiler.is_compiling()
    )


def _fusable(t: Tensor, a: int, b: int) -> bool:
    """Whether the unrolled kernels of (A × B) components serve this map."""
    return _fused_map(t) and fused.available(a, b)


def _gamma_times(layout: Layout, kappa: float) -> Tensor:
    """(P, Q) float32 ``κ·γ``: for block layouts one numba pass over the layout's γ tables
    (:func:`pomfx.fused.block_gamma`), else ``layout.gamma`` times κ (the same float32 products)."""
    if layout.gamma_tables is not None and fused.enabled():
        return fused.block_gamma(*layout.gamma_tables, kappa, layout.transposed).view(layout.weight_shape[:2])
    gamma = torch.from_numpy(layout.gamma)
    return gamma if kappa == 1.0 else gamma.mul_(kappa)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _alias(t: Tensor) -> Tensor:
    """A flat tensor on ``t``'s memory that is not a view of it: a view holds its base (and so
    the storage's count) and, as a custom Function's output, may not be changed in place."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


class _Recycler:
    """One flat buffer per POM for the CPU maps: each step's weight W is written into it in the
    forward; in the backward, once W is dropped, ∇ω is written into it too, and the buffer
    becomes ω's gradient while the incoming ∇W (which the conv's backward allocated) becomes
    the buffer. So a converted layer allocates and frees what a plain layer does (its weight's
    gradient, once a step) and no more: W and ∇ω coming and going cost ResNet-18 ~20 k page
    faults a step on a CPU (fresh pages, after the allocator returned the freed ones), where
    plain training takes none.

    The buffer is handed out (as an alias of its memory) only when nothing else holds it: no tensor
    made from it before (the last W, kept by an autograd graph or the user; a gradient not yet
    set to None; a ∇W someone kept) is alive, by the storage's use count. Otherwise a new buffer
    is made, and the old one lives on with its users: recycling never changes a value anyone
    holds. Not copied with the model (deep copies and pickles start empty). The buffer stays for
    the model's life, one weight's worth per converted layer: training's peak is unchanged (W
    existed then anyway); a deployed model is ``pomfx.fold``-ed into plain weights."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf: Tensor | None = None

    def __deepcopy__(self, memo):
        return _Recycler()

    def __reduce__(self):
        return (_Recycler, ())

    def take(self, numel: int, like: Tensor) -> Tensor:
        """A flat tensor of ``numel`` elements like ``like``, for the caller to overwrite."""
        b = self.buf
        free = (
            b is not None
            and b.numel() == numel
            and b.dtype == like.dtype
            and b.device == like.device
            and _storage_use_count is not None
            and _storage_use_count(b.untyped_storage()._cdata) == 2  # the buffer and this query
        )
        if not free:
            b = self.buf = like.new_empty(numel)
        return _alias(b)  # autograd may keep it (AccumulateGrad steals it), not ours

    def adopt(self, t: Tensor) -> None:
        """Keep ``t``'s memory as the buffer (a tensor that owns all of its storage, contiguous),
        through an alias of our own: :meth:`take` hands it out once nothing else holds it."""
        if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
            self.buf = _alias(t)


class _ScaleKernels(torch.autograd.Function):
    """Kernel layouts: ``W[n] = R[n] · ω[:, :, n]`` (or its transpose), one pass each way (on a
    CPU numba's, into the POM's recycled buffer: :class:`_Recycler`).

    ω is stored structure-of-arrays, ``(A, B, N)`` with N = P·Q weight rows in the weight's own
    order, so the forward needs no gather; the backward writes ∇ω in the same layout.
    """

    @staticmethod
    def forward(
        ctx, omega: Tensor, scale: Tensor, a: int, b: int, transpose: bool, pool: _Recycler
    ) -> Tensor:
        x = omega.view(a, b, -1)
        n = x.shape[2]
        xw = x.permute(2, 1, 0) if transpose else x.permute(2, 0, 1)  # (N, rows, cols) of W
        s = scale.view(n, 1, 1)
        if s.dtype != omega.dtype:
            s = s.to(omega.dtype)
        ctx.save_for_backward(s)
        ctx.shape = (a, b, transpose)
        ctx.pool = pool
        if torch.compiler.is_compiling():  # out= does not fix the strides under tracing
            return (xw * s).contiguous()
        if _fusable(omega, a, b):
            out = pool.take(omega.numel(), omega).view(n, a * b)
            return fused.scale_to_weight(x, s.view(n), transpose, out).view(xw.shape)
        return torch.mul(xw, s, out=omega.new_empty(xw.shape))  # contiguous, in one pass

    @staticmethod
    def backward(ctx, g: Tensor):
        (s,) = ctx.saved_tensors
        a, b, transpose = ctx.shape
        n = s.shape[0]
        none = (None,) * 5
        if _fusable(g, a, b) and not torch.is_grad_enabled():  # (create_graph: the torch ops)
            flat = g.reshape(n, a * b).contiguous()
            out = ctx.pool.take(g.numel(), g)
            fused.scale_from_weight(flat, s.view(n), a, b, transpose, out)
            ctx.pool.adopt(flat)  # ∇W's memory serves the next step's W
            return (out, *none)
        g = g.reshape(n, b, a) if transpose else g.reshape(n, a, b)
        gx = g.permute(2, 1, 0) if transpose else g.permute(1, 2, 0)  # (A, B, N)
        if torch.compiler.is_compiling():
            return ((gx * s.view(1, 1, n)).reshape(-1), *none)
        return (torch.mul(gx, s.view(1, 1, n), out=g.new_empty(a, b, n)).view(-1), *none)


class _ScatterScale(torch.autograd.Function):
    """Block layouts: ``W[inverse] = stored``, then ``W ⊙= R`` (an element scatter: a permutation);
    the backward is the gather ``(R ⊙ ∇W)[inverse]``. On a CPU both run row by row through the
    layout's :class:`~pomfx.layout.BlockMap`, on CUDA each in one Triton launch
    (:func:`pomfx.fused_gpu.block_map`). Only the maps and R are read, both kept by the POM
    anyway: nothing per element is saved for the backward."""

    @staticmethod
    def forward(ctx, omega: Tensor, inverse: Tensor, scale: Tensor, bmap, pool: _Recycler):
        ctx.save_for_backward(inverse, scale)
        ctx.bmap, ctx.pool = bmap, pool  # bmap None under torch.compile: the torch ops are traced
        if bmap is not None and omega.is_contiguous():
            return fused.block_map(omega, bmap, scale.reshape(-1), "weight", pool.take(omega.numel(), omega))
        if fused_gpu.map_usable(omega):  # one launch
            return fused_gpu.block_map(omega.contiguous(), inverse, scale.reshape(-1), "weight")
        w = omega.new_empty(omega.shape).index_put_((inverse,), omega)
        return w.mul_(scale.view(-1))

    @staticmethod
    def backward(ctx, g: Tensor):
        inverse, scale = ctx.saved_tensors
        if ctx.bmap is not None and _fused_map(g) and not torch.is_grad_enabled():  # (create_graph: torch)
            g = g.reshape(-1).contiguous()
            gw = fused.block_map(g, ctx.bmap, scale.reshape(-1), "storage", ctx.pool.take(g.numel(), g))
            ctx.pool.adopt(g)  # ∇W's memory serves the next step's W
            return gw, None, None, None, None
        if fused_gpu.map_usable(g) and not torch.is_grad_enabled():  # one launch
            gw = fused_gpu.block_map(g.reshape(-1).contiguous(), inverse, scale.reshape(-1), "storage")
            return gw, None, None, None, None
        return (g.reshape(-1) * scale.view(-1)).index_select(0, inverse), None, None, None, None


_TYPE_CODE = {"sp": 0, "ob": 1, "st": 2, "euc": 3}


class POM(nn.Module):
    """Parametrization module: ``forward(ω_flat) -> W``; holds the layout and the scales.

    **Storage of ω** (the flat ComponentParameter):

    - kernel layouts (K > 1): structure-of-arrays ``(A, B, N)``, N = P·Q components in the
      weight's own row order (``W.view(P·Q, K)``); component n is ``ω[:, :, n]`` (A×B, tall),
      and ``W[n]`` is it, or its transpose for wide kernels. No gather in the forward; the
      optimizer reads the type and group of each component from ``comp_type``/``comp_group``.
    - block layouts (K = 1): the layout's bucket order (each bucket ``(count, A, B)``,
      contiguous); the forward scatters the elements with ``layout.inverse``.

    :meth:`buckets` gives each bucket's components as ``(count, A, B)`` in either case (views
    for blocks, copies for kernels).
    """

    def __init__(self, layout: Layout, renorm: bool = True, weight: Tensor | None = None):
        """``weight``: calibrate to it (as :meth:`calibrate` does, without building γ twice)."""
        super().__init__()
        self.layout = layout
        self.renorm = renorm
        p, q = layout.weight_shape[:2]
        ngroups = [len(b.group_sizes) for b in layout.buckets]
        sizes = np.concatenate([np.asarray(b.group_sizes, dtype=np.int32) for b in layout.buckets])
        gid = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)  # storage order, unique per layer
        per_comp = np.repeat([1.0 if b.manifold == "sp" else float(b.cols) for b in layout.buckets], ngroups)
        # Σ_c ‖ω_c‖²_F of each group (1 per sp component, B per ob/st one), for the step-size cap
        self.register_buffer(
            "group_norm2", torch.as_tensor(sizes * per_comp, dtype=torch.float32), persistent=False
        )
        codes = np.asarray([_TYPE_CODE[b.manifold] for b in layout.buckets], dtype=np.int8)
        ctype = np.repeat(codes, [b.count for b in layout.buckets])
        if layout.kernel:  # per component in weight order
            inv = layout.inverse
            ctype_w, gid_w = np.empty_like(ctype), np.empty_like(gid)
            ctype_w[inv], gid_w[inv] = ctype, gid
            ctype, gid = ctype_w, gid_w
        self.register_buffer("comp_type", torch.from_numpy(ctype), persistent=False)
        self.register_buffer("comp_group", torch.from_numpy(gid), persistent=False)
        self.register_buffer("kappa", torch.ones(()))
        self.register_buffer("running_var", torch.ones(layout.in_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        if weight is not None:
            self._set_kappa(weight)
        # R = κγ (λ̂ = 1), or γ until calibrated; 1 without renormalization
        scale = _gamma_times(layout, float(self.kappa)) if renorm else torch.ones(p, q)
        self.register_buffer("scale", scale)
        self._reset_cache()

    def _reset_cache(self) -> None:
        """Forget what was derived from the buffers. A block layout's forward reads ``inverse``: it
        is made again at once, so that a compiled forward finds it (made inside the graph, it would
        change the cache and the next call would recompile)."""
        self._cache = {}
        self._pool = _Recycler()
        if not self.layout.kernel:
            self.inverse  # noqa: B018 (made on the scales' device)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._reset_cache()
        return out

    # -- the layout's arrays, as tensors on the scales' device --------------------------------
    @property
    def inverse(self) -> Tensor:
        """Layout.inverse: the weight unit of each storage unit of the bucket order. Not a buffer:
        it follows from the layout (saved in the state_dict); made when first needed (the
        forward of a kernel layout needs none), on the scales' device."""
        dev = self.scale.device
        t = self._cache.get("inverse")
        if t is None or t.device != dev:
            t = self._cache["inverse"] = torch.from_numpy(self.layout.inverse).to(dev)
        return t

    @property
    def index(self) -> Tensor:
        """Layout.index: weight unit ← storage unit (computed on each call, not kept)."""
        return torch.from_numpy(self.layout.index).to(self.scale.device)

    @property
    def in_channel(self) -> Tensor:
        """(P, Q): the input feature channel each weight row reads (computed, not kept)."""
        return torch.from_numpy(self.layout.in_channel).to(self.scale.device)

    @property
    def gamma(self) -> Tensor:
        """(P, Q) float32: γ of the manifold holding each weight row (computed, not kept)."""
        return torch.from_numpy(self.layout.gamma).to(self.scale.device)

    @property
    def _shape(self) -> tuple[int, int]:
        b = self.layout.buckets[0]
        return b.rows, b.cols

    # -- the map ω -> W ----------------------------------------------------------------------
    def forward(self, omega: Tensor) -> Tensor:
        lay = self.layout
        if lay.kernel:
            a, b = self._shape
            w = _ScaleKernels.apply(omega, self.scale, a, b, lay.transpose, self._pool)
        else:
            scale = self.scale if self.scale.dtype == omega.dtype else self.scale.to(omega.dtype)
            bmap = lay.block_map if _fused_map(omega) else None  # (None in layouts pickled before it)
            w = _ScatterScale.apply(omega, self.inverse, scale, bmap, self._pool)
        return w.reshape(lay.weight_shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """ω for a given weight: ``project(W / R)`` per component (assigning ``module.weight = W``).

        torch's parametrize takes a ``NotImplementedError`` here for "no right inverse" and would
        keep W itself as ω, silently: such an error is raised as a ``RuntimeError`` instead."""
        try:
            return self.omega_from_weight(weight)
        except NotImplementedError as e:
            raise RuntimeError(f"pomfx could not compute ω from a {weight.dtype} weight: {e}") from e

    @torch.no_grad()
    @_m.ieee_matmuls()  # TF32 Gram matrices would project off the manifold
    def omega_from_weight(self, weight: Tensor) -> Tensor:
        """Each component of ``W / R`` projected onto its manifold, in storage order (for a
        float16/bfloat16 weight computed in float32, which torch's factorizations need, then
        rounded)."""
        if weight.dtype in (torch.float16, torch.bfloat16):
            return self.omega_from_weight(weight.float()).to(weight.dtype)
        p, q = self.layout.weight_shape[:2]
        lay = self.layout
        if lay.kernel and _fusable(weight, *self._shape):  # one pass: divide, project, store
            s = self.scale.reshape(-1).to(weight.dtype)
            w = weight.detach().reshape(p * q, -1).contiguous()
            return fused.project(w, s, self.comp_type, *self._shape, lay.transpose).view(-1)
        if lay.block_map is not None and _fused_map(weight):  # W / R into storage order, one pass
            s = self.scale.reshape(-1).to(weight.dtype)
            w = weight.detach().reshape(-1).contiguous()
            stored = fused.block_map(w, lay.block_map, s, "storage_div")
            return self._project_buckets(stored)
        scaled = weight.detach().reshape(p, q, -1) / self.scale.to(weight.dtype).unsqueeze(-1)
        if lay.kernel:  # components as rows (N, A, B), projected bucket by bucket, then (A, B, N)
            a, b = self._shape
            x = scaled.reshape(p * q, b, a).transpose(1, 2) if lay.transpose else scaled.reshape(p * q, a, b)
            x = x.contiguous()
            for bk, rows in self._bucket_rows():
                if bk.manifold != "euc":
                    x.index_copy_(0, rows, _m.get(bk.manifold).project(x.index_select(0, rows)))
            return x.permute(1, 2, 0).contiguous().view(-1)
        return self._project_buckets(self._stored(scaled))

    def _project_buckets(self, stored: Tensor) -> Tensor:
        """Every bucket of a block layout's ``stored`` projected onto its manifold, in place."""
        for bk, x in self.buckets(stored):
            if bk.manifold != "euc":
                _m.get(bk.manifold).project_(x)
        return stored

    @torch.no_grad()
    def calibrate(self, weight: Tensor) -> None:
        """Set κ from ``weight`` (RMS Frobenius norm of its constrained components), reset λ and
        commit R = κγ: the converted layer starts at the scale of ``weight``."""
        self._set_kappa(weight)
        if self.renorm:
            self.scale.copy_(self.gamma).mul_(self.kappa)  # λ̂ = 1: R = κγ
        else:
            self.scale.fill_(1.0)

    def _set_kappa(self, weight: Tensor) -> None:
        """κ = sqrt(Σ_c ‖W_c‖² / n) over the n constrained components c (all but euc); λ reset."""
        lay = self.layout
        flat = weight.detach().reshape(-1)
        total, n = _sum_squares(flat), 0
        for b in lay.buckets:
            if b.manifold != "euc":
                n += b.count
                continue
            u0 = b.offset // (b.rows * b.cols)  # the euc units' weight rows (kernels) or elements
            units = torch.from_numpy(
                lay.inverse[u0 : u0 + b.count] if lay.kernel else lay.inverse[b.offset : b.offset + b.numel]
            )
            total -= _sum_squares(flat.view(-1, lay.unit).index_select(0, units.to(flat.device).long()))
        kappa = math.sqrt(total / n) if n and total > 0 else (0.0 if n else 1.0)
        if not kappa > 0 or kappa == float("inf"):  # all-zero or broken weights
            kappa = lay.weight_shape[1] ** -0.5  # a kaiming-like kernel norm
        self.kappa.fill_(kappa)
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _stored(self, weight: Tensor) -> Tensor:
        """The elements of a weight (or of anything of its shape) in flat storage order."""
        lay = self.layout
        p, q = lay.weight_shape[:2]
        if lay.kernel:
            a, b = self._shape
            w = weight.reshape(p * q, b, a) if lay.transpose else weight.reshape(p * q, a, b)
            x = w.permute(2, 1, 0) if lay.transpose else w.permute(1, 2, 0)  # (A, B, N)
            return x.contiguous().view(-1)
        return weight.reshape(-1).index_select(0, self.inverse)

    def _bucket_rows(self):
        """``(bucket, weight rows)`` of a kernel layout: the components of each bucket."""
        rows = self._cache.get("rows")
        if rows is None or rows[0].device != self.inverse.device:
            rows = []
            for b in self.layout.buckets:
                u0 = b.offset // (b.rows * b.cols)
                rows.append(self.inverse[u0 : u0 + b.count].long())  # index_copy_ needs int64
            self._cache["rows"] = rows
        return zip(self.layout.buckets, rows)

    # -- scales --------------------------------------------------------------------------
    @torch.no_grad()
    def commit_scales(self) -> None:
        """R = κ·γ/λ̂ with λ̂_c = λ_c / mean(λ), clamped to LAMBDA_CLAMP (renorm=False: R = 1)."""
        if not self.renorm:
            self.scale.fill_(1.0)
            return
        lam = self.running_var.clamp_min(0).sqrt()
        lam_hat = (lam / lam.mean().clamp_min(1e-12)).clamp(*LAMBDA_CLAMP)
        rows, chan = self.layout.channel_view()
        self.scale.view(rows).copy_(self.gamma.view(rows)).mul_(self.kappa).div_(lam_hat.view(chan))

    def _scale_key(self) -> tuple:
        """What changes when R does (its memory or its version): FG-SGD's caches of 1/R² read it
        every step, so it skips Module's attribute lookup."""
        s = self._buffers["scale"]
        return (s.data_ptr(), s._version, s.device)

    @torch.no_grad()
    def lr_scale(self) -> Tensor | tuple[Tensor, ...]:
        """1/R², cached until the scales change: FG-SGD's factor that makes a step on ω the step
        SGD would take on W = R ⊙ ω (a gradient step of size lr on W is one of lr/R² on ω).
        Kernels: (N,), per component in weight order. Blocks: one tensor per bucket, (count, A, 1)
        or (count, 1, B), broadcasting over the block's output channels (R is constant along
        them), so that it costs a few bytes per block, not four per weight."""
        key = self._scale_key()
        hit = self._cache.get("lr_scale")
        if hit is None or hit[0] != key:
            s = self.scale.reshape(-1)
            if self.layout.kernel:
                scales = s.clone().square_().reciprocal_()
            else:
                probes = self._cache.get("probes")
                if probes is None or probes[0].device != s.device:
                    probes = [torch.from_numpy(p).to(s.device).long() for p in self.layout.scale_probes]
                    self._cache["probes"] = probes
                scales = tuple(s[p].square_().reciprocal_() for p in probes)
            hit = self._cache["lr_scale"] = (key, scales)
        return hit[1]

    # -- views -----------------------------------------------------------------------------
    def buckets(self, flat: Tensor):
        """``(bucket, x)`` pairs: each bucket's components as an ``(count, A, B)`` tensor of
        ``flat`` (views for block layouts; gathered copies for kernel layouts)."""
        if self.layout.kernel:
            a, b = self._shape
            x = flat.view(a, b, -1)
            for bk, rows in self._bucket_rows():
                yield bk, x.index_select(2, rows).permute(2, 0, 1)
            return
        for b in self.layout.buckets:
            yield b, flat[b.offset : b.offset + b.numel].view(b.count, b.rows, b.cols)

    @torch.no_grad()
    @_m.ieee_matmuls()  # (a TF32 Gram matrix would show ~1e-3 of error that is not there)
    def constraint_error(self, omega: Tensor) -> float:
        """Largest distance of a component from its manifold."""
        err = 0.0
        for b, x in self.buckets(omega.detach()):
            err = max(err, float(_m.get(b.manifold).distance(x.double()).max()))
        return err

    # -- checkpoints -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        storage = "kernels (A, B, N)" if self.layout.kernel else "buckets"
        return {"layout": self.layout.describe(), "renorm": self.renorm, "storage": storage}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise RuntimeError(
                f"checkpoint layout of {self.layout.options['name']!r} differs from this model's: "
                f"saved {state}, here {mine}. Convert the model with the same scheme, manifolds, "
                "group_size, seed and renorm as the checkpoint was made with."
            )

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_cache()

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_cache()

    def extra_repr(self) -> str:
        kinds = {}
        for b in self.layout.buckets:
            kinds[b.manifold] = kinds.get(b.manifold, 0) + len(b.group_sizes)
        mix = ", ".join(f"{k}:{v}" for k, v in kinds.items())
        return f"{self.layout.options['scheme']}, groups=({mix}), renorm={self.renorm}"


# -- making parametrized modules picklable and safely deep-copyable -------------------------
def _rebuild_parametrized(cls: type, state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    parametrize._inject_new_class(module)
    for name in module.parametrizations:
        parametrize._inject_property(module, name)
    make_portable(module)
    return module


def _reduce_parametrized(self, proto):
    return (
        _rebuild_parametrized,
        (parametrize.type_before_parametrizations(self), nn.Module.__getstate__(self)),
    )


def _deepcopy_parametrized(self, memo):
    if id(self) in memo:
        return memo[id(self)]
    cls = parametrize.type_before_parametrizations(self)
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    replica.__dict__.update(copy.deepcopy(self.__dict__, memo))
    parametrize._inject_new_class(replica)  # its own class: removing from one never breaks the other
    for name in replica.parametrizations:
        parametrize._inject_property(replica, name)
    make_portable(replica)
    return replica


def make_portable(module: nn.Module) -> None:
    """Let ``torch.save(module)`` and ``copy.deepcopy(module)`` work on a parametrized module.

    torch's generated class refuses pickling and is shared by deep copies (DESIGN §5 traps);
    we give the class a reduce that rebuilds a fresh generated class on load and on copy.
    """
    cls = type(module)
    cls.__reduce_ex__ = _reduce_parametrized
    cls.__deepcopy__ = _deepcopy_parametrized
    cls.__getstate__ = nn.Module.__getstate__
