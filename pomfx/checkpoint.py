"""Loading checkpoints of the unconverted model into a converted one."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .renorm import poms

__all__ = ["load_plain_state_dict"]


def load_plain_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load a state_dict of the *unconverted* model into the converted ``model``.

    The converted model stores a weight ``<m>.<t>`` as ``<m>.parametrizations.<t>.original`` (ω)
    plus its POM's buffers; the plain checkpoint has ``<m>.<t>``. Each such weight of the
    checkpoint recalibrates its layer (κ from the weight's norms, λ statistics reset, R = κγ) and
    is projected onto the layer's manifolds; every other key loads as ``load_state_dict`` does.

    Everything is checked before anything changes: with ``strict`` (default) a missing or
    unexpected key raises, listing both sets; a wrong shape or a non-finite converted weight
    always raises. Never a silent partial load: ``strict=False`` loads the matching keys and
    returns ``(missing_keys, unexpected_keys)``, like torch's ``load_state_dict``.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    # every key of the converted model, under the name it has in the plain model
    converted = {}  # plain key -> (module, tensor name, POM)
    prefixes = {}  # "<m>.parametrizations.<t>." -> plain key
    for name, module, t, pom in poms(model):
        key = f"{name}.{t}" if name else t
        converted[key] = (module, t, pom)
        prefixes[f"{key[: len(key) - len(t)]}parametrizations.{t}."] = key
    own = model.state_dict()
    plain_own = {}  # plain key -> own key (None for a converted weight)
    for k in own:
        p = next((v for pre, v in prefixes.items() if k.startswith(pre)), None)
        plain_own[p or k] = None if p else k

    missing = sorted(set(plain_own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(plain_own))
    if strict and (missing or unexpected):
        hint = ""
        if any(".parametrizations." in k or k.startswith("parametrizations.") for k in unexpected):
            hint = "\n  (this looks like a checkpoint of a converted model: use model.load_state_dict)"
        raise RuntimeError(
            "load_plain_state_dict: the checkpoint's keys do not match the model; nothing was loaded.\n"
            f"  missing from the checkpoint ({len(missing)}): {missing or 'none'}\n"
            f"  unexpected in the checkpoint ({len(unexpected)}): {unexpected or 'none'}" + hint
        )

    bad = []
    for key, value in state_dict.items():
        if key not in plain_own or not isinstance(value, Tensor):
            continue
        if key in converted:
            want = converted[key][2].layout.weight_shape
            if not torch.isfinite(value).all():
                bad.append(f"{key}: non-finite values")
        else:
            mine = own[plain_own[key]]
            want = tuple(mine.shape) if isinstance(mine, Tensor) else tuple(value.shape)
        if tuple(value.shape) != tuple(want):
            bad.append(f"{key}: checkpoint shape {tuple(value.shape)}, model shape {tuple(want)}")
    if bad:
        raise RuntimeError("load_plain_state_dict: nothing was loaded:\n  " + "\n  ".join(bad))

    rest = {plain_own[k]: v for k, v in state_dict.items() if plain_own.get(k)}
    model.load_state_dict(rest, strict=False)
    with torch.no_grad():
        for key, (module, t, pom) in converted.items():
            if key in state_dict:
                original = module.parametrizations[t].original
                w = state_dict[key].to(original.device, original.dtype)
                pom.calibrate(w)
                original.copy_(pom.omega_from_weight(w))
    return _IncompatibleKeys(missing, unexpected)
