"""Renormalization, stage (ii): running statistics λ of the input feature channels, and R.

A forward pre-hook on each converted module keeps, in training mode only, a running estimate
of the variance of every input channel (momentum 0.1, like BatchNorm). ``update_scales`` commits
it into R = κ·γ/λ̂ (see :mod:`pomfx.parametrization`); the paper rescales once per epoch.
Under torch.distributed the running variances are averaged over ranks first, so every rank
commits the same R.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .parametrization import POM

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

    A module-level function (no closure), so deep copies and pickles of the model keep a hook
    that updates their own POM, never the original's.
    """
    if not module.training or not args or not isinstance(args[0], Tensor):
        return
    pom = module.parametrizations.weight[0]
    x = args[0].detach()
    is_linear = issubclass(parametrize.type_before_parametrizations(module), nn.Linear)
    channel_dim = x.dim() - 1 if is_linear else 1
    if x.dim() == 1 or x.shape[channel_dim] != pom.running_var.numel():
        return
    dims = [d for d in range(x.dim()) if d != channel_dim]
    var = x.float().var(dim=dims, unbiased=False) if x.numel() > x.shape[channel_dim] else None
    if var is None:
        return
    # a cumulative average over the first batches, then an exponential one
    weight = (1.0 / (pom.num_batches_tracked + 1)).clamp(min=MOMENTUM)  # no host sync
    pom.running_var.lerp_(var, weight.to(var.dtype))
    pom.num_batches_tracked += 1


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
