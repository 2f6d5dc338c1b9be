"""Finding the weights to convert: torch.fx first, a module walk when the model is untraceable.

The traced graph is only used to *find* targets (``call_module`` nodes of conv and linear
modules) and the output layer; parametrizations are then registered on the user's own modules.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.fx
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["CONV_LINEAR", "Target", "find_targets"]

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Target:
    """One weight that could be converted."""

    name: str  # qualified name of the module
    module: nn.Module
    output_layer: bool  # its output reaches the model's output through no other target


def module_type(m: nn.Module) -> type:
    return parametrize.type_before_parametrizations(m)


def _is_target(m: nn.Module) -> bool:
    return issubclass(module_type(m), CONV_LINEAR)


def _fx_targets(model: nn.Module) -> list[Target]:
    graph = torch.fx.symbolic_trace(model).graph
    nodes = [
        n for n in graph.nodes if n.op == "call_module" and _is_target(model.get_submodule(n.target))
    ]
    names = {n.target for n in nodes}

    def reaches_output(node) -> bool:
        stack, seen = list(node.users), set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                return True
            if u.op == "call_module" and u.target in names:
                continue
            stack.extend(u.users)
        return False

    targets, seen = [], set()
    for n in nodes:
        if n.target in seen:  # one module called twice is converted once
            continue
        seen.add(n.target)
        targets.append(Target(n.target, model.get_submodule(n.target), reaches_output(n)))
    return targets


def _walk_targets(model: nn.Module) -> list[Target]:
    found = [(name, m) for name, m in model.named_modules() if _is_target(m)]
    return [Target(name, m, i == len(found) - 1) for i, (name, m) in enumerate(found)]


def find_targets(model: nn.Module) -> tuple[list[Target], str]:
    """Targets in graph order and the method that found them: ``"fx"`` or ``"module walk"``."""
    try:
        return _fx_targets(model), "fx"
    except Exception as e:  # noqa: BLE001 - any tracing failure means: fall back
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
            "falling back to a module walk (the last conv/linear is taken as the output layer)",
            stacklevel=3,
        )
        return _walk_targets(model), "module walk"
