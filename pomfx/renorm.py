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

from . import fused
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
    ``var_mean``; the running value is a cumulative average over the first batches, then an
    exponential one (momentum 0.1), without a host sync.
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
    rv = pom.running_var
    if _fused_map(x) and _fused_map(rv) and x.is_contiguous() and rv.is_contiguous():  # one read of x
        weight = max(1.0 / (int(pom.num_batches_tracked) + 1), MOMENTUM)
        fused.fold_channel_var(x.view(math.prod(x.shape[:cdim]), x.shape[cdim], -1), rv, weight)
        pom.num_batches_tracked.add_(1)  # in place: no Module.__setattr__
        return
    if x.is_cuda:  # one fused Welford kernel there
        dims = [d for d in range(x.dim()) if d != cdim]
        var = torch.var_mean(x.float(), dims, correction=0)[0]
    else:
        var = _shifted_var(x, cdim, count)
    seen = pom.num_batches_tracked.add_(1)  # this batch counted: the weight is 1/seen, at least 0.1
    rv.lerp_(var.to(rv.dtype), seen.reciprocal().clamp_(min=MOMENTUM).to(rv.dtype))


def _shifted_var(x: Tensor, cdim: int, count: int) -> Tensor:
    """Per-channel variance from sums of ``d = x − x[0, …, c, …, 0]`` over the other dims (on
    CPU ~20× faster than ``var``; the shift keeps a large mean from cancelling the spread)."""
    pick = [0] * x.dim()
    pick[cdim] = slice(None)
    shape = [1] * x.dim()
    shape[cdim] = -1
    xf = x.float()
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
