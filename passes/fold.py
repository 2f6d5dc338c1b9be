"""Folding: every POM parametrization replaced by its plain weight W = R ⊙ ω.

The result has the user's original classes and module tree, ordinary Parameters, no pomfx
hooks or buffers, and the state_dict keys of the unconverted model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from pomfx.renorm import lambda_hook, poms

__all__ = ["fold"]


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model computing what the converted ``model`` computes (a copy unless ``inplace``)."""
    out = model if inplace else copy.deepcopy(model)
    for _, module, tensor_name, _ in list(poms(out)):
        _unparametrize(module, tensor_name)
    return out


def _unparametrize(module: nn.Module, tensor_name: str) -> None:
    original = module.parametrizations[tensor_name].original
    cls = parametrize.type_before_parametrizations(module)
    with torch.no_grad():
        weight = nn.Parameter(getattr(module, tensor_name).detach().clone(), original.requires_grad)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is lambda_hook:
            del module._forward_pre_hooks[key]
    # Done by hand rather than by parametrize.remove_parametrizations, which would keep the
    # ComponentParameter object as the new weight. The generated class is this module's own
    # (pomfx gives every deep copy a fresh one), so deleting its property touches no other.
    delattr(type(module), tensor_name)
    del module.parametrizations[tensor_name]
    if not module.parametrizations:
        module.__class__ = cls
        del module._modules["parametrizations"]
    module.register_parameter(tensor_name, weight)
