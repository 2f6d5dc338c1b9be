"""The POM parametrization: a layer's weight as ``W = R ⊙ ω`` with ω on a product of manifolds.

``ω`` is stored as one flat :class:`ComponentParameter` per layer (the ``original`` of a
``torch.nn.utils.parametrize`` parametrization), cut into buckets of same-manifold, same-shape
components (see :mod:`pomfx.layout`). The forward gathers the components into the weight's
shape and multiplies by the scale buffer ``R`` (DESIGN §1, renormalization)::

    W[p, q, :] = R[p, q] · stored_units[index[p·Q + q]]        R[p, q] = κ · γ[p, q] / λ̂[c(p, q)]

γ is the manifold's geometric scale (1 for sp, 1/√B for ob and st, 1 for euc), λ̂_c the std of
input channel c relative to the layer's mean (committed by :func:`pomfx.update_scales`), and κ
the RMS Frobenius norm of the layer's components at conversion. κ is pomfx's reading: since
γ‖ω‖_F = 1 on every constrained manifold, κ keeps the converted layer at the scale of the
user's own initialisation, which is what lets FG-SGD reproduce SGD's effective step (see
:mod:`pomfx.optim`). ``renorm=False`` fixes R = 1 (the paper's ablation without stage (ii)).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

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


class _Gather(torch.autograd.Function):
    """Rows of x picked by a permutation; the backward is the inverse gather (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g: Tensor):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


class POM(nn.Module):
    """Parametrization module: ``forward(ω_flat) -> W``; holds the layout and the scales."""

    def __init__(self, layout: Layout, renorm: bool = True):
        super().__init__()
        self.layout = layout
        self.renorm = renorm
        p, q = layout.weight_shape[:2]
        idx = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
        self.register_buffer("index", idx(layout.index), persistent=False)
        self.register_buffer("inverse", idx(layout.inverse), persistent=False)
        self.register_buffer("in_channel", idx(layout.in_channel), persistent=False)
        self.register_buffer("gamma", torch.as_tensor(layout.gamma, dtype=torch.float32), persistent=False)
        gid = [torch.arange(len(b.group_sizes)).repeat_interleave(torch.tensor(b.group_sizes)) for b in layout.buckets]
        self.register_buffer("group_id", torch.cat(gid), persistent=False)
        self.register_buffer("kappa", torch.ones(()))
        self.register_buffer("scale", torch.ones(p, q) if not renorm else self.gamma.clone())
        self.register_buffer("running_var", torch.ones(layout.in_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self._lr_cache: tuple | None = None

    # -- the map ω -> W ----------------------------------------------------------------------
    def units(self, omega: Tensor) -> Tensor:
        """The stored components as rows of ``unit`` elements, in storage order."""
        lay = self.layout
        if not lay.kernel:
            return omega.view(-1, 1)
        b = lay.buckets[0]
        x = omega.view(-1, b.rows, b.cols)
        if lay.transpose:
            x = x.transpose(-1, -2)
        return x.reshape(x.shape[0], -1)

    def forward(self, omega: Tensor) -> Tensor:
        w = _Gather.apply(self.units(omega), self.index, self.inverse)
        p, q = self.layout.weight_shape[:2]
        w = w.view(p, q, -1) * self.scale.to(w.dtype).unsqueeze(-1)
        return w.view(self.layout.weight_shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """ω for a given weight: ``project(W / R)`` per bucket (assigning ``module.weight = W``)."""
        return self.omega_from_weight(weight)

    @torch.no_grad()
    def omega_from_weight(self, weight: Tensor) -> Tensor:
        """Each component of ``W / R`` projected onto its manifold, in storage order."""
        p, q = self.layout.weight_shape[:2]
        scaled = weight.detach().reshape(p, q, -1) / self.scale.to(weight.dtype).unsqueeze(-1)
        stored = self._stored(scaled)
        out = torch.empty_like(stored)
        for b, x in self.buckets(stored):
            out[b.offset : b.offset + b.numel] = _m.get(b.manifold).project(x).reshape(-1)
        return out

    @torch.no_grad()
    def calibrate(self, weight: Tensor) -> None:
        """Set κ from ``weight`` (RMS Frobenius norm of its constrained components), reset λ and
        commit R = κγ: the converted layer starts at the scale of ``weight``."""
        sq, n = torch.zeros((), dtype=torch.float64), 0
        for b, x in self.buckets(self._stored(weight.detach())):
            if b.manifold != "euc":
                sq += x.double().square().sum().cpu()
                n += b.count
        kappa = float((sq / n).sqrt()) if n else 1.0
        if not kappa > 0 or kappa == float("inf"):  # all-zero or broken weights
            kappa = self.layout.weight_shape[1] ** -0.5  # a kaiming-like kernel norm
        self.kappa.fill_(kappa)
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.commit_scales()

    def _stored(self, weight: Tensor) -> Tensor:
        """The elements of a weight (or of anything of its shape) in flat storage order."""
        p, q = self.layout.weight_shape[:2]
        stored = weight.reshape(p * q, -1).index_select(0, self.inverse)
        lay = self.layout
        if lay.kernel and lay.transpose:
            b = lay.buckets[0]
            stored = stored.view(-1, b.cols, b.rows).transpose(-1, -2)
        return stored.reshape(-1)

    # -- scales --------------------------------------------------------------------------
    @torch.no_grad()
    def commit_scales(self) -> None:
        """R = κ·γ/λ̂ with λ̂_c = λ_c / mean(λ), clamped to LAMBDA_CLAMP (renorm=False: R = 1)."""
        if not self.renorm:
            self.scale.fill_(1.0)
            return
        lam = self.running_var.clamp_min(0).sqrt()
        lam_hat = (lam / lam.mean().clamp_min(1e-12)).clamp(*LAMBDA_CLAMP)
        self.scale.copy_(self.kappa * self.gamma / lam_hat[self.in_channel])

    def lr_scale(self) -> Tensor:
        """1/R² per stored unit: FG-SGD's factor that makes a step on ω the step SGD would take
        on W = R ⊙ ω (a gradient step of size lr on W is one of lr/R² on ω)."""
        key = (self.scale.data_ptr(), self.scale._version, self.scale.device)
        if self._lr_cache is None or self._lr_cache[0] != key:
            s = self.scale.reshape(-1).index_select(0, self.inverse)
            self._lr_cache = (key, 1.0 / s.square())
        return self._lr_cache[1]

    # -- views -----------------------------------------------------------------------------
    def buckets(self, flat: Tensor):
        """``(bucket, view)`` pairs: each bucket's components as an (n, A, B) view of ``flat``."""
        for b in self.layout.buckets:
            yield b, flat[b.offset : b.offset + b.numel].view(b.count, b.rows, b.cols)

    def bucket_units(self, b) -> slice:
        """The slice of storage units (kernels, or block elements) that bucket ``b`` holds."""
        if self.layout.kernel:
            start = b.offset // (b.rows * b.cols)
            return slice(start, start + b.count)
        return slice(b.offset, b.offset + b.numel)

    @torch.no_grad()
    def constraint_error(self, omega: Tensor) -> float:
        """Largest distance of a component from its manifold."""
        err = 0.0
        for b, x in self.buckets(omega.detach()):
            err = max(err, float(_m.get(b.manifold).distance(x.double()).max()))
        return err

    # -- checkpoints -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"layout": self.layout.describe(), "renorm": self.renorm}

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
        self._lr_cache = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_lr_cache"] = None
        return state

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
    return (_rebuild_parametrized, (parametrize.type_before_parametrizations(self), nn.Module.__getstate__(self)))


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
