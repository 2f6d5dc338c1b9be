"""FG-SGD: Riemannian SGD over the products of manifolds of converted layers (Algorithm 1).

For every constrained bucket of every layer, each step does (paper's lines 4-6):

1. Riemannian gradient: ``g = Π_ω(∇_ω L / R²)`` (tangent projection of the scaled gradient);
2. momentum in the tangent space, ``v ← μ·T(v) + (1−τ)·g`` (Nesterov: ``g + μ·v``), where the
   buffer ``T(v)`` is carried to the new point by vector transport (projection);
3. step ``ξ = −r(t, Θ)·v`` and retraction ``ω ← Retr_ω(ξ)``.

**Step size r(t, Θ), pomfx's reading.** A user who switches from ``torch.optim.SGD(lr)`` expects
the same training. The layer computes ``W = R ⊙ ω``; a step ``ΔW = −lr·∇_W L`` is, in ω,
``Δω = −(lr/R²)·∇_ω L`` (since ``∇_ω L = R·∇_W L``). FG-SGD therefore scales each component's
gradient by 1/R² (R carries κ, the layer's initial scale, see :mod:`pomfx.parametrization`): the
effective weight moves as SGD would move it, restricted to the manifold's tangent directions.
On top, one step never moves a group further than the geodesic radius δ (``radius``, in
radians, relative to the group's norm ‖ω_g‖_F)::

    r(t, Θ)_g = lr(t) / R² · min(1, δ·‖ω_g‖_F / ‖ξ_g‖_F)

With small gradients the cap is inactive and FG-SGD is plain Riemannian SGD. Plain SGD
stabilises itself on scale-invariant weights (a large step inflates ‖w‖ and slows the next
ones); the cap is that safeguard on a manifold, where the norm cannot grow.

Euclidean parameters (``euc`` components, biases, norm layers, unconverted layers) get exactly
``torch.optim.SGD`` (same code path), with weight decay; constrained components get none.
Non-finite gradients skip the step of the groups they touch (``nonfinite="skip"``, ω and its
momentum stay as they were) or raise (``nonfinite="raise"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from . import manifolds as _m
from .parametrization import ComponentParameter

__all__ = ["FGSGD"]

_NONFINITE = ("skip", "raise")


class FGSGD(Optimizer):
    """Riemannian SGD for pomfx-converted models; torch's SGD for every other parameter.

    Takes ``model.parameters()`` or param groups, like ``torch.optim.SGD``; works with LR
    schedulers, ``torch.amp.GradScaler``, closures and ``state_dict``. ``radius`` is δ above;
    ``nonfinite`` chooses what a non-finite gradient does: ``"skip"`` or ``"raise"``.
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
    ):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if isinstance(p, ComponentParameter) and p.pom is not None:
                    self._manifold_step(p, group)
                else:
                    plain.append(p)
                    grads.append(p.grad)
                    bufs.append(self.state[p].get("momentum_buffer"))
            if plain:
                _torch_sgd(
                    plain,
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
                    for p, buf in zip(plain, bufs):
                        self.state[p]["momentum_buffer"] = buf
        return loss

    def _manifold_step(self, p: ComponentParameter, group: dict) -> None:
        pom, grad = p.pom, p.grad
        if grad.is_sparse:
            raise RuntimeError("FGSGD does not support sparse gradients on constrained weights")
        lr, mu, damp = group["lr"], group["momentum"], group["dampening"]
        state = self.state[p]
        buf = state.get("momentum_buffer")
        first = buf is None and mu != 0
        if first:
            buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        scale = pom.lr_scale().to(grad.dtype)
        for b, x in pom.buckets(p.data):
            sl = slice(b.offset, b.offset + b.numel)
            g = grad[sl].view_as(x)
            s = scale[pom.bucket_units(b)]
            g = g * (s.view(-1, 1, 1) if pom.layout.kernel else s.view_as(x))
            if group["maximize"]:
                g = -g
            manifold = _m.get(b.manifold)
            euclidean = manifold is _m.Euclidean
            if euclidean and group["weight_decay"]:
                g = g.add(x, alpha=group["weight_decay"])
            ok = self._finite_groups(g, pom, b, group["nonfinite"])
            d = torch.where(ok, manifold.proj_tangent(x, g), 0.0)
            if mu != 0:
                v = buf[sl].view_as(x)
                if first:
                    v.copy_(d)
                else:
                    v.copy_(torch.where(ok, v * mu + d * (1 - damp), v))
                d = d + v * mu if group["nesterov"] else v
            xi = d * -lr
            if not euclidean:
                xi = xi * self._radius_cap(xi, pom, b, group["radius"])
            x.copy_(torch.where(ok, manifold.retract(x, xi), x))
            if mu != 0:
                v.copy_(manifold.transport(x, v))

    @staticmethod
    def _finite_groups(g: Tensor, pom, b, mode: str) -> Tensor:
        """(n, 1, 1) mask of components whose whole group has a finite gradient."""
        ok = torch.isfinite(g).all(-1).all(-1)
        if len(b.group_sizes) != b.count:  # several components per group: any bad spoils all
            gid = pom.group_id[pom.bucket_units(b)]
            bad = torch.zeros(len(b.group_sizes), device=g.device).index_add_(0, gid, (~ok).float())
            ok = bad[gid] == 0
        if mode == "raise" and not bool(ok.all()):
            raise FloatingPointError(f"non-finite gradient in {pom.layout.options['name']!r}")
        return ok.view(-1, 1, 1)

    @staticmethod
    def _radius_cap(xi: Tensor, pom, b, radius: float) -> Tensor:
        """(n, 1, 1) factor min(1, δ·‖ω_g‖/‖ξ_g‖) of each component's group."""
        sq = xi.square().sum((-2, -1))
        per_comp = 1.0 if b.manifold == "sp" else float(b.cols)  # ‖ω_c‖²_F on sp, ob, st
        if len(b.group_sizes) != b.count:
            gid = pom.group_id[pom.bucket_units(b)]
            sq_g = torch.zeros(len(b.group_sizes), device=xi.device, dtype=sq.dtype).index_add_(0, gid, sq)
            n_g = torch.bincount(gid, minlength=len(b.group_sizes)).to(sq.dtype)
            f = (radius * (n_g * per_comp).sqrt() / sq_g.sqrt().clamp_min(1e-30)).clamp(max=1.0)[gid]
        else:
            f = (radius * per_comp**0.5 / sq.sqrt().clamp_min(1e-30)).clamp(max=1.0)
        return f.view(-1, 1, 1)
