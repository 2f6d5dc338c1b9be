"""Folding: every POM parametrization replaced by its plain weight W = R ⊙ ω.

The result has the user's original classes and module tree, an ordinary ``nn.Parameter`` for
every converted weight (listed first among the module's parameters, where conv and linear
keep their weight), no pomfx hooks or buffers, and the state_dict keys of the unconverted
model. Its outputs are the converted model's: the folded weight is the very tensor the
converted layer computes in its forward.

The copy variant does not deep-copy the converted model and then strip it: that would copy
every ω, layout and index buffer only to throw them away. It computes each W from the
original (one forward of each POM, no autograd), then deep-copies the model with the
converted modules replaced by plain replicas that hold W, so every tensor is copied at most
once and nothing of the original is touched.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import parametrize

from pomfx.parametrization import make_portable
from pomfx.renorm import lambda_hook, poms

__all__ = ["fold"]


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model computing what the converted ``model`` computes.

    ``inplace=False`` (default) returns a new model and leaves ``model`` untouched (folding the
    copy never affects the original, and the copy shares no tensor with it); ``inplace=True``
    folds ``model`` itself and returns it. A model with no pomfx layer comes back as a plain
    deep copy (or itself, in place). The training/eval mode of every module is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pomfx.fold expects a torch.nn.Module, got {type(model).__name__}")
    folded = _folded_weights(model)
    if inplace:
        for module, weights in folded.values():
            _strip(module, weights)
        return model
    memo: dict[int, object] = {}
    for module, weights in folded.values():
        for w in weights.values():
            memo[id(w)] = w  # the fresh W is the copy's own tensor: never copy it again
        cls = parametrize.type_before_parametrizations(module)
        memo[id(module)] = cls.__new__(cls)
    for module, weights in folded.values():  # fill the shells once all are in the memo
        replica = memo[id(module)]
        replica.__dict__.update(copy.deepcopy(_plain_state(module, weights), memo))
        if "parametrizations" in replica._modules:  # a parametrization not from pomfx remains
            parametrize._inject_new_class(replica)
            for name in replica.parametrizations:
                parametrize._inject_property(replica, name)
            make_portable(replica)
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _folded_weights(model: nn.Module) -> dict[int, tuple[nn.Module, dict[str, nn.Parameter]]]:
    """Per converted module (by id): the module and its folded Parameters, by tensor name."""
    out: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = {}
    for _, module, name, _ in poms(model):
        plist = module.parametrizations[name]
        w = plist()  # the whole chain: W = R ⊙ ω (and any parametrization stacked on it)
        if w.untyped_storage().data_ptr() == plist.original.untyped_storage().data_ptr():
            w = w.clone()
        param = nn.Parameter(w.detach(), requires_grad=plist.original.requires_grad)
        out.setdefault(id(module), (module, {}))[1][name] = param
    return out


def _plain_state(module: nn.Module, weights: dict[str, nn.Parameter]) -> dict:
    """``module.__dict__`` (shallow) without the folded parametrizations and pomfx hooks."""
    state = dict(module.__dict__)
    mods = OrderedDict(module._modules)
    left = {n: p for n, p in mods.pop("parametrizations").items() if n not in weights}
    if left:
        mods["parametrizations"] = nn.ModuleDict(left)
    state["_modules"] = mods
    state["_parameters"] = dict(list(weights.items()) + list(module._parameters.items()))
    hooks = OrderedDict((k, h) for k, h in module._forward_pre_hooks.items() if h is not lambda_hook)
    state["_forward_pre_hooks"] = hooks
    state["_forward_pre_hooks_with_kwargs"] = OrderedDict(
        (k, v) for k, v in module._forward_pre_hooks_with_kwargs.items() if k in hooks
    )
    return state


def _strip(module: nn.Module, weights: dict[str, nn.Parameter]) -> None:
    """In place: drop the folded parametrizations and pomfx hooks, register the plain weights."""
    cls = parametrize.type_before_parametrizations(module)
    for name in weights:
        del module.parametrizations[name]
        if len(module.parametrizations):
            # The generated class belongs to this module alone (torch makes one per module,
            # pomfx one per deep copy), so deleting its property touches no other module.
            delattr(type(module), name)
    if not len(module.parametrizations):
        module.__class__ = cls
        del module._modules["parametrizations"]
    module._parameters = dict(list(weights.items()) + list(module._parameters.items()))
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is lambda_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
