"""The conversion pass: targets -> plan -> POM parametrizations on the user's own modules.

Which layers are converted, with which options (one precedence, applied in this order):

1. every conv/linear the trace finds is a candidate, with the call's scheme/manifolds/group_size;
2. by default the *output layer* (the conv/linear whose output reaches the model's output
   through no other conv/linear: the classifier) is skipped: constraining it bounds the logits,
   which cost 4-5 points on digits (DESIGN §1). ``include`` selects layers explicitly and lifts
   that default for the layers it names; with ``include`` given, only matching layers convert;
3. ``exclude`` removes layers, whatever else matched them;
4. ``overrides`` ``{selector: {"scheme"|"manifolds"|"group_size": value}}`` set per-layer options;
   when several keys match a layer, later keys win.

A selector is a glob on the qualified name (``"layer1.*"``), a module type (``nn.Linear``), or a
callable ``(name, module) -> bool``. A model that is already converted is refused (ValueError):
converting twice would constrain ω itself. ``pomfx.fold`` first, to convert again.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn
from torch.nn.utils import parametrize

from pomfx.layout import Layout, build_layout, check_group_size, check_scheme, parse_manifolds
from pomfx.parametrization import POM, ComponentParameter, make_portable
from pomfx.renorm import lambda_hook, poms

from .trace import find_targets, module_type

__all__ = ["Plan", "PlanRow", "plan", "convert"]

Selector = str | type | Callable[[str, nn.Module], bool]
_OVERRIDE_KEYS = ("scheme", "manifolds", "group_size")


@dataclass
class PlanRow:
    name: str
    type: str
    shape: tuple[int, ...]
    convert: bool
    reason: str = ""
    scheme: str = ""
    manifolds: str = ""
    group_size: int | None = None
    groups: dict[str, int] = field(default_factory=dict)
    components: int = 0
    params: int = 0
    layout: Layout | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "layout"}
        d["shape"] = list(self.shape)
        return d


@dataclass
class Plan:
    """The dry run: what would be converted, layer by layer, what is skipped and why."""

    rows: list[PlanRow]
    method: str
    renorm: bool
    seed: int

    @property
    def converted(self) -> list[PlanRow]:
        return [r for r in self.rows if r.convert]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "renorm": self.renorm,
            "seed": self.seed,
            "layers": [r.to_dict() for r in self.rows],
        }

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "scheme", "manifolds", "groups", "comps", "params", "note")
        body = [
            (
                r.name,
                r.type,
                "×".join(map(str, r.shape)),
                r.scheme if r.convert else "-",
                r.manifolds if r.convert else "-",
                " ".join(f"{k}:{v}" for k, v in r.groups.items()) if r.convert else "-",
                str(r.components) if r.convert else "-",
                str(r.params),
                "" if r.convert else f"skipped: {r.reason}",
            )
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in body]
        n = len(self.converted)
        lines.append(f"{n} of {len(self.rows)} layers converted (traced by {self.method})")
        return "\n".join(lines)


def _matches(sel: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(sel, str):
        return fnmatch.fnmatchcase(name, sel)
    if isinstance(sel, type):
        return issubclass(module_type(module), sel)
    if callable(sel):
        return bool(sel(name, module))
    raise ValueError(f"a selector is a name glob, a module type or a callable; got {sel!r}")


def _selectors(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def plan(
    model: nn.Module,
    scheme: str = "pio",
    *,
    manifolds: str = "sp+ob+st",
    group_size: int | None = None,
    seed: int = 0,
    renorm: bool = True,
    example_inputs: Any = None,
    include: Selector | list | None = None,
    exclude: Selector | list | None = None,
    overrides: dict | None = None,
    inplace: bool = False,
) -> Plan:
    """The dry run of :func:`convert` with the same arguments; validates them, changes nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pomfx expects a torch.nn.Module, got {type(model).__name__}")
    check_scheme(scheme)
    parse_manifolds(manifolds)
    check_group_size(group_size)
    already = [name for name, *_ in poms(model)]
    if already:
        raise ValueError(
            f"model is already converted by pomfx ({len(already)} layers, e.g. {already[0]!r}); "
            "call pomfx.fold(model) first to convert it again"
        )
    overrides = dict(overrides or {})
    for key, opts in overrides.items():
        if not isinstance(opts, dict) or set(opts) - set(_OVERRIDE_KEYS):
            raise ValueError(f"override for {key!r} must be a dict with keys among {_OVERRIDE_KEYS}, got {opts!r}")
    targets, method = find_targets(model)
    include, exclude = _selectors(include), _selectors(exclude)
    used = {id(s): False for s in include + list(overrides)}
    rows, seen_weights = [], {}
    for t in targets:
        m = t.module
        row = PlanRow(t.name, module_type(m).__name__, tuple(m.weight.shape), convert=True)
        row.params = m.weight.numel()
        hits = [s for s in include if _matches(s, t.name, m)]
        for s in hits:
            used[id(s)] = True
        opts = {"scheme": scheme, "manifolds": manifolds, "group_size": group_size}
        for key, o in overrides.items():
            if _matches(key, t.name, m):
                used[id(key)] = True
                opts.update(o)
        if include and not hits:
            row.convert, row.reason = False, "not selected by include"
        elif any(_matches(s, t.name, m) for s in exclude):
            row.convert, row.reason = False, "excluded"
        elif t.output_layer and not hits:
            row.convert, row.reason = False, "output layer (classifier); name it in include= to convert it"
        elif id(m.weight) in seen_weights:
            row.convert, row.reason = False, f"weight tied to {seen_weights[id(m.weight)]}, converted there"
        elif m.weight.dim() < 2 or m.weight.numel() == 0:
            row.convert, row.reason = False, "weight has no (out, in) matrix"
        if row.convert:
            seen_weights[id(m.weight)] = t.name
            row.scheme, row.group_size = check_scheme(opts["scheme"]), check_group_size(opts["group_size"])
            row.manifolds = "+".join(parse_manifolds(opts["manifolds"]))
            row.layout = build_layout(
                t.name,
                m.weight.shape,
                scheme=row.scheme,
                manifolds=row.manifolds,
                group_size=row.group_size,
                seed=seed,
                conv_groups=getattr(m, "groups", 1),
            )
            for b in row.layout.buckets:
                row.groups[b.manifold] = row.groups.get(b.manifold, 0) + len(b.group_sizes)
            row.components = row.layout.n_components
        rows.append(row)
    unused = [k for k in include + list(overrides) if not used[id(k)]]
    if unused:
        raise ValueError(
            f"selector {unused[0]!r} matches no conv/linear layer; layers: "
            + ", ".join(t.name for t in targets[:20])
            + (" ..." if len(targets) > 20 else "")
        )
    return Plan(rows, method, renorm, seed)


def convert(
    model: nn.Module,
    scheme: str = "pio",
    *,
    manifolds: str = "sp+ob+st",
    group_size: int | None = None,
    seed: int = 0,
    renorm: bool = True,
    example_inputs: Any = None,
    include: Selector | list | None = None,
    exclude: Selector | list | None = None,
    overrides: dict | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Reparameterize conv/linear weights of ``model`` as points of products of manifolds.

    Returns the user's own model class (a deep copy unless ``inplace``), each converted weight
    now computed as ``W = R ⊙ ω`` by a :class:`~pomfx.parametrization.POM` parametrization;
    train it with :class:`pomfx.FGSGD`. All arguments are validated before anything changes.
    """
    p = plan(
        model,
        scheme,
        manifolds=manifolds,
        group_size=group_size,
        seed=seed,
        renorm=renorm,
        example_inputs=example_inputs,
        include=include,
        exclude=exclude,
        overrides=overrides,
    )
    if not p.converted:
        warnings.warn(f"pomfx.convert: nothing to convert in {type(model).__name__}", stacklevel=2)
        return model if inplace else copy.deepcopy(model)
    out = model if inplace else copy.deepcopy(model)
    for row in p.converted:
        apply_layout(out.get_submodule(row.name), row.layout, renorm)
    return out


def apply_layout(module: nn.Module, layout: Layout, renorm: bool) -> POM:
    """Register the POM parametrization of ``layout`` on ``module.weight``."""
    pom = POM(layout, renorm).to(module.weight.device)
    pom.calibrate(module.weight)
    parametrize.register_parametrization(module, "weight", pom)
    plist = module.parametrizations.weight
    plist.original = ComponentParameter(plist.original.data, pom, plist.original.requires_grad)
    make_portable(module)
    if renorm:
        module.register_forward_pre_hook(lambda_hook)
    return pom
