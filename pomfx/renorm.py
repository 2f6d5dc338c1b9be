"""Renormalization, stage (ii): running statistics λ of the input feature channels, and R.

A forward pre-hook on each converted module keeps, in training mode only, a running estimate
of the variance of every input channel (momentum 0.1, like BatchNorm). ``update_scales`` commits
it into R = κ·γ/λ̂ (see :mod:`pomfx.parametrization`); the paper rescales once per epoch.
Under torch.distributed the running variances are averaged over ranks first, so every rank
commits the same R.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import fused, fused_gpu
from .parametrization import POM, _fused_map

__all__ = ["MOMENTUM", "lambda_hook", "poms", "update_scales"]

MOMENTUM = 0.1


def poms(model: nn.Module):
    """``(qualified name, module, tensor name, POM)`` for every converted tensor of ``model``."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            if isinstance(plist[0], POM):
                yield name, module, tensor_name, plist[0]


@torch.no_grad()
def lambda_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: fold the batch's per-input-channel variance into ``running_var``.

    Training mode only (eval leaves the statistics alone). A module-level function (no closure),
    so deep copies and pickles of the model keep a hook that updates their own POM, never the
    original's. On CPU the variance is computed from sums over the non-channel dimensions of the
    input shifted by one of its samples (no cancellation when the mean is large against the
    spread; :func:`pomfx.fused.fold_channel_var` in one pass where it can), on CUDA by
    :func:`pomfx.fused_gpu.fold_channel_var` (the same sums, two launches; else ``var_mean``).
    The running value is a cumulative average over the first batches, then an exponential one
    (momentum 0.1), without a host sync.
    """
    if not module.training or not args or not isinstance(args[0], Tensor):
        return
    pom = module.parametrizations.weight[0]
    x = args[0].detach()
    is_linear = issubclass(parametrize.type_before_parametrizations(module), nn.Linear)
    cdim = x.dim() - 1 if is_linear else 1
    if x.dim() < 2 or x.shape[cdim] != pom.running_var.numel():
        return
    count = x.numel() // x.shape[cdim]
    if count < 2:
        return
    rv, seen = pom.running_var, pom.num_batches_tracked
    view = _channel_view(x, cdim)  # no copy
    if view is not None and _fused_map(x) and _fused_map(rv) and rv.is_contiguous():  # one read
        fused.fold_channel_var(view, rv, max(1.0 / (int(seen) + 1), MOMENTUM))
        seen.add_(1)  # in place: no Module.__setattr__
        return
    if view is not None and fused_gpu.fold_usable(view, rv):  # two launches, no host sync
        fused_gpu.fold_channel_var(view, rv, seen, MOMENTUM)
        return
    if x.is_cuda:  # one fused Welford kernel there
        dims = [d for d in range(x.dim()) if d != cdim]
        var = torch.var_mean(_accurate(x), dims, correction=0)[0]
    else:
        var = _shifted_var(x, cdim, count)
    seen.add_(1)  # this batch counted: the weight is 1/seen, at least 0.1
    rv.lerp_(var.to(rv.dtype), seen.reciprocal().clamp_(min=MOMENTUM).to(rv.dtype))


def _channel_view(x: Tensor, cdim: int) -> Tensor | None:
    """``x`` as (P, C, Q) in its memory order, C its channels (a view, no copy): P the dims laid
    out outside the channel's, Q those inside it (contiguous: the dims before and after ``cdim``;
    channels-last: Q = 1). None where x's elements are not dense in memory."""
    if x.is_contiguous():  # (the usual case, without sorting the strides)
        return x.view(math.prod(x.shape[:cdim]), x.shape[cdim], -1)
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # outermost first
    y = x.permute(order)
    if not y.is_contiguous():
        return None
    i = order.index(cdim)
    return y.view(math.prod(y.shape[:i]), x.shape[cdim], -1)


def _accurate(x: Tensor) -> Tensor:
    """``x`` in the dtype its statistics are summed in: float64 stays, the rest float32."""
    return x if x.dtype == torch.float64 else x.float()


def _shifted_var(x: Tensor, cdim: int, count: int) -> Tensor:
    """Per-channel variance from sums of ``d = x − x[0, …, c, …, 0]`` over the other dims (on
    CPU ~20× faster than ``var``; the shift keeps a large mean from cancelling the spread)."""
    pick = [0] * x.dim()
    pick[cdim] = slice(None)
    shape = [1] * x.dim()
    shape[cdim] = -1
    xf = _accurate(x)
    d = xf - xf[tuple(pick)].reshape(shape)
    dims = [i for i in range(x.dim()) if i != cdim]
    s1 = d.sum(dims)
    s2 = d.square_().sum(dims)
    return (s2 - s1 * s1 / count).div_(count).clamp_min_(0)


@torch.no_grad()
def update_scales(model: nn.Module) -> int:
    """Commit the running λ of every converted layer into its scales R; returns how many.

    Call it once per epoch (the paper rescales at each epoch). Layers that have seen no
    training batch since conversion keep their scales.
    """
    dist = torch.distributed
    synced = dist.is_available() and dist.is_initialized()
    n = 0
    for _, _, _, pom in poms(model):
        if synced:
            dist.all_reduce(pom.running_var, op=dist.ReduceOp.AVG)
        if pom.num_batches_tracked > 0 or not pom.renorm:
            pom.commit_scales()
            n += 1
    return n
