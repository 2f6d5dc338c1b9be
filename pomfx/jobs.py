"""What both kinds of FG-SGD job share: the group's hyperparameters, the groups' norms and the
per-job caches, persistent workspaces, and the small helpers of the fused (numba, Triton) steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused, fused_gpu
from .parametrization import _TYPE_CODE as TYPE_CODE
from .small_matrix import RESTEP

__all__ = [
    "TYPE_CODE",
    "Job",
    "Hyper",
    "Workspace",
    "block_coefs",
    "damp_factor",
    "device_values",
    "fused_block_step",
    "group_order",
    "step_mode",
]


class Hyper:
    """A param group's hyperparameters, read once a step (lr may be a tensor)."""

    __slots__ = ("lr", "mu", "damp", "nesterov", "maximize", "wd", "radius")

    def __init__(self, group: dict):
        self.lr = group["lr"]
        self.mu = group["momentum"]
        self.damp = group["dampening"]
        self.nesterov = group["nesterov"]
        self.maximize = group["maximize"]
        self.wd = group["weight_decay"]
        self.radius = group["radius"]


class Job:
    """The base of both kinds of job: ``norm_g`` (float64), ‖ω_g‖ of every group of the job, the
    job's caches (kept while their key holds), and the Triton block step with its tables."""

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

    def _hyper(self, hy: Hyper, dt: torch.dtype, dev: torch.device) -> Tensor:
        """(lr, radius, restep, μ, wd, ±1) for the Triton kernels, in ``dt`` on the device (a
        Triton kernel's float arguments are float32). Kept until lr changes; a device tensor lr
        is copied in every step."""
        lr = hy.lr
        rest = (hy.radius, RESTEP, hy.mu, hy.wd, -1.0 if hy.maximize else 1.0)
        if isinstance(lr, Tensor) and lr.device.type != "cpu":
            hyp = self._cache(
                "hyp_rest", (*rest, dt, dev), lambda: device_values((0.0, *rest), dt, dev)
            ).clone()
            hyp[0].copy_(lr.reshape(()))
            return hyp
        values = (float(lr), *rest)
        return self._cache("hyp", (*values, dt, dev), lambda: device_values(values, dt, dev))

    def _gpu_block_step(self, X, G, V, srow, scol, types, gid, order, start, k, hy: Hyper, st) -> None:
        """:func:`pomfx.fused_gpu.block_step` of (n, A, B) components with the job's tables and
        hyperparameters; ``k`` the damping factor (a float, or (n,)); ``st`` the Stiefel
        components' range."""
        n, dt, dev = X.shape[0], X.dtype, X.device
        if not isinstance(k, Tensor):
            k = self._cache("k", (k, dt, dev), lambda: torch.full((n,), k, dtype=dt, device=dev))
        norm_g, hyp = self._norms(dt), self._hyper(hy, dt, dev)
        fused_gpu.block_step(
            X, G, V, srow, scol, types, gid, k, norm_g, hyp, order, start, self.ng, step_mode(hy), st
        )


class Workspace:
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


def step_mode(hy: Hyper) -> int:
    """The Triton kernels' momentum mode: 0 none, 3 heavy ball, 2 Nesterov."""
    return 0 if hy.mu == 0 else (2 if hy.nesterov else 3)


def device_values(values: tuple[float, ...], dt: torch.dtype, dev: torch.device) -> Tensor:
    """``values`` as a tensor filled on the device: a host-to-device copy of a CPU tensor waits
    for the device."""
    out = torch.empty(len(values), dtype=dt, device=dev)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


def group_order(ids: Tensor, ng: int) -> tuple[Tensor, Tensor, Tensor]:
    """The components sorted by group (stably), where each of the ``ng`` groups' runs starts
    (ng + 1,), and ``ids`` as int32: for :func:`pomfx.fused_gpu.group_sums`, built on the device
    without a host sync."""
    ordered, order = torch.sort(ids.long(), stable=True)
    start = torch.searchsorted(ordered, torch.arange(ng + 1, device=ids.device))
    return order, start, ids.to(torch.int32)


def fused_block_step(X, G, V, S, srow: bool, types, cg, wdk, norm_g, hy: Hyper, radius: float) -> None:
    """:func:`pomfx.fused.block_step` with the group's hyperparameters. Without momentum the
    kernel neither reads nor writes V: X stands in for it."""
    V = X if V is None else V
    fused.block_step(X, G, V, S, srow, types, cg, wdk, norm_g, hy.mu, hy.nesterov, hy.lr, radius, RESTEP)


def block_coefs(k, n: int, euc, hy: Hyper) -> tuple[Tensor, Tensor]:
    """:func:`pomfx.fused.block_step`'s coefficients, float64 (n,): the gradient's ``cg = ±k``
    (its sign, and the damping factor k: a float or (n,)) and euc's weight decay ``wd·k``
    (``euc``: whether the blocks are euc, a bool or an (n,) float mask)."""
    k = torch.as_tensor(k, dtype=torch.float64).expand(n)
    cg = (k * (-1.0 if hy.maximize else 1.0)).contiguous()
    return cg, (k * (hy.wd * torch.as_tensor(euc, dtype=torch.float64))).expand(n).contiguous()


def damp_factor(first, damp: float, x: Tensor):
    """1 − τ, except 1 on a parameter's first step (torch's SGD sets the buffer to d then)."""
    if isinstance(first, Tensor):
        return torch.full(first.shape, 1.0 - damp, dtype=x.dtype, device=x.device).masked_fill_(first, 1.0)
    return 1.0 if first else 1.0 - damp
