"""Loading checkpoints of the unconverted model into a converted one."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .renorm import poms

__all__ = ["load_plain_state_dict"]


def load_plain_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load a state_dict of the *unconverted* model into the converted ``model``.

    Each converted weight ``<m>.weight`` of the checkpoint recalibrates that layer (κ from its
    norms, λ reset) and is projected onto the layer's manifolds; every other key loads as usual.
    ``strict`` (default) refuses any missing or unexpected key, listing them, before anything
    is changed: never a silent partial load. Returns torch's ``(missing, unexpected)`` keys.
    """
    converted = {f"{name}.{t}" if name else t: (name, t, pom) for name, _, t, pom in poms(model)}
    plain = {k: v for k, v in state_dict.items() if k not in converted}
    expected = set(model.state_dict()) - {
        k for k in model.state_dict() if any(k.startswith(f"{n}.parametrizations.{t}.") if n else k.startswith(f"parametrizations.{t}.") for n, t, _ in converted.values())
    }
    missing = sorted((expected - set(plain)) | (set(converted) - set(state_dict)))
    unexpected = sorted(set(plain) - expected)
    if strict and (missing or unexpected):
        raise RuntimeError(
            "load_plain_state_dict: keys do not match the model.\n"
            f"  missing from the checkpoint: {missing or 'none'}\n"
            f"  unexpected in the checkpoint: {unexpected or 'none'}"
        )
    result = model.load_state_dict(plain, strict=False)
    with torch.no_grad():
        for key, (name, t, pom) in converted.items():
            if key not in state_dict:
                continue
            module = model.get_submodule(name)
            original = module.parametrizations[t].original
            w = state_dict[key].to(original.device, original.dtype)
            if tuple(w.shape) != pom.layout.weight_shape:
                raise RuntimeError(f"{key}: checkpoint shape {tuple(w.shape)} != {pom.layout.weight_shape}")
            pom.calibrate(w)
            original.copy_(pom.omega_from_weight(w))
    return result.__class__(missing, unexpected)
