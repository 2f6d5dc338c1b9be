"""The conversion pass: targets -> plan -> POM parametrizations on the user's own modules.

**What is a candidate.** Every conv/linear weight that :mod:`passes.trace` finds: the ``weight``
of ``Conv1d/2d/3d`` (grouped and depthwise included: no POM group crosses a conv group),
``ConvTranspose1d/2d/3d`` and ``Linear`` modules, and Parameters that a module's own forward
passes to ``F.conv*``/``F.conv_transpose*``/``F.linear`` ("functional" weights).

- ConvTranspose weights are stored ``(C_in, C_out/groups, *k)``: their in/out roles are swapped
  against a conv's ``(C_out, C_in/groups, *k)``. pomfx lays them out by their *roles*
  (``build_layout(..., transposed=True)``): ``po`` groups the kernels that write one output
  channel (a column ``W[:, d]`` of the stored weight), ``pi`` those that read one input channel
  (a row ``W[c]``), and λ is measured on the C_in channels of the input, like for a conv.
- Functional weights are parametrized on the module that owns the attribute, so its forward
  reads ``W = R ⊙ ω`` unchanged. pomfx cannot see their inputs, so they get no λ statistics:
  R = κγ (stage (ii) without λ).
- Tied weights (one Parameter reachable from several modules or used twice) are converted
  once: every module that holds it reads the same ω through the same POM (one layout, one
  ``ComponentParameter``), so the tie survives conversion, ``deepcopy`` and ``torch.save``.

**Which candidates convert; one precedence**, applied in this order, first rule that decides wins:

1. ``exclude``: a layer matched by any ``exclude`` selector is never converted.
2. ``include``: when given, only layers it matches convert, and naming a layer there lifts
   the defaults of rule 4 for it.
3. Layers that cannot convert: weight missing, not a Parameter (old-style ``weight_norm``), lazy
   (uninitialised), empty, or already parametrized by something else (``parametrize``'s
   ``weight_norm``/``orthogonal``: pomfx does not stack parametrizations).
4. Defaults: the *output layer* (the conv/linear whose output reaches the model's output through
   no other conv/linear: the classifier, or every parallel head) is skipped: constraining it
   bounds the logits, which cost 4-5 points on digits (DESIGN §1). Exception: a model whose
   every conv/linear is an output layer (a model that is one ``nn.Linear``) converts them.
   The *first conv* (3 input channels on images) converts like any other layer: it is a full
   conv of D·3 kernels and the paper constrains every conv; ``exclude="conv1"`` keeps it plain.

``overrides = {selector: {"scheme"|"manifolds"|"group_size": value}}`` set per-layer options;
they never decide *whether* a layer converts. When several keys match one layer, the more
specific wins: module type < callable < name glob < exact qualified name; between keys of the
same kind, the later in the dict wins. The call's own ``scheme``/``manifolds``/``group_size``
are the base.

A **selector** is a glob on the qualified name (``"layer1.*"``; a functional weight's name is
``"<module>.<attr>"``), a module type (``nn.Linear``: the class before parametrization,
subclasses included; for a functional weight, the owning module's type), a callable
``(name, module) -> bool``, or a list of these. A selector that matches no candidate is an error
(a typo would otherwise silently change what converts).

**Validation before any change.** ``plan`` checks every argument and builds every layout before
``convert`` touches a module: on bad input (not a Module, unknown scheme or manifold,
group_size < 1, a selector or override naming no layer, a malformed override) the error names
the problem and the valid choices, and the model is unchanged. A Stiefel component always fits:
every component is stored tall (a wide kernel or block is constrained through its transpose,
DESIGN §1), so any ``manifolds``/``group_size`` gives orthonormal columns; no error is needed.
A model that is already converted is refused (ValueError): converting twice would constrain ω
itself; ``pomfx.fold`` it first. A model with nothing to convert comes back unchanged (a deep
copy unless ``inplace``) with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from pomfx.layout import Layout, build_layout, check_group_size, check_scheme, parse_manifolds
from pomfx.parametrization import POM, ComponentParameter, make_portable
from pomfx.renorm import lambda_hook, poms

from .trace import Target, check_selector, find_targets, is_target, matches, tracer_kwargs

__all__ = ["Plan", "PlanRow", "plan", "convert", "apply_plan"]

Selector = str | type | Callable[[str, nn.Module], bool]
OVERRIDE_KEYS = ("scheme", "manifolds", "group_size")


@dataclass
class PlanRow:
    """One candidate weight: what would happen to it and why."""

    name: str
    type: str
    shape: tuple[int, ...]
    trace: str  # "fx", "submodule fx" or "module walk": the path that found it
    convert: bool
    reason: str = ""  # why skipped ("" when converted)
    note: str = ""  # anything else worth knowing (tied weights, output layer converted, ...)
    scheme: str = ""
    manifolds: str = ""
    group_size: int | None = None
    groups: dict[str, int] = field(default_factory=dict)  # manifold -> number of groups (POMs)
    components: int = 0
    params: int = 0
    output_layer: bool = False
    module_name: str = ""
    tensor: str = "weight"
    transposed: bool = False
    conv_groups: int = 1
    functional: bool = False
    tied: list[tuple[str, str]] = field(default_factory=list)  # other (module, attr) holding it
    layout: Layout | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "layout"}
        d["shape"] = list(self.shape)
        d["tied"] = [".".join(x for x in t if x) for t in self.tied]
        return d


@dataclass
class Plan:
    """The dry run: what would be converted, layer by layer, what is skipped and why.

    ``str(plan)`` is a table; ``plan.to_dict()`` is JSON-able. ``method`` names the tracing
    path(s) used ("fx", "fx + module walk", "submodule fx + module walk", ...); ``failures``
    maps each module torch.fx could not trace to the reason.
    """

    rows: list[PlanRow]
    method: str
    renorm: bool
    seed: int
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def converted(self) -> list[PlanRow]:
        return [r for r in self.rows if r.convert]

    @property
    def skipped(self) -> list[PlanRow]:
        return [r for r in self.rows if not r.convert]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "renorm": self.renorm,
            "seed": self.seed,
            "failures": dict(self.failures),
            "converted": len(self.converted),
            "params_converted": sum(r.params for r in self.converted),
            "params_total": sum(r.params for r in self.rows),
            "layers": [r.to_dict() for r in self.rows],
        }

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "trace", "scheme", "manifolds", "groups", "comps", "params", "note")
        body = []
        for r in self.rows:
            done = r.convert
            note = r.note if done else f"skipped: {r.reason}" + (f"; {r.note}" if r.note else "")
            body.append(
                (
                    r.name or "(model)",
                    r.type,
                    "×".join(map(str, r.shape)),
                    r.trace,
                    r.scheme if done else "-",
                    r.manifolds if done else "-",
                    " ".join(f"{k}:{v}" for k, v in r.groups.items()) if done else "-",
                    str(r.components) if done else "-",
                    str(r.params),
                    note,
                )
            )
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
        lines += [fmt.format(*row).rstrip() for row in body]
        d = self.to_dict()
        lines.append(
            f"{d['converted']} of {len(self.rows)} layers converted "
            f"({d['params_converted']:,} of {d['params_total']:,} weights); traced by {self.method}"
        )
        if self.failures:
            names = list(self.failures)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            lines.append(f"torch.fx could not trace: {', '.join(names[:5])}{more} (reasons: .failures)")
        return "\n".join(lines)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set, frozenset)) else [x]


def _specificity(sel) -> int:
    """Override precedence: module type < callable < name glob < exact qualified name."""
    if isinstance(sel, type):
        return 0
    if not isinstance(sel, str):
        return 1
    return 2 if any(ch in sel for ch in "*?[") else 3


def _check_overrides(overrides) -> list[tuple[Any, dict]]:
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        raise TypeError(
            f"overrides must be a dict {{selector: {{option: value}}}}, got {type(overrides).__name__}"
        )
    out = []
    for key, opts in overrides.items():
        check_selector(key)
        if not isinstance(opts, dict) or not opts or set(opts) - set(OVERRIDE_KEYS):
            raise ValueError(
                f"override for {key!r} must be a non-empty dict with keys among {OVERRIDE_KEYS}, got {opts!r}"
            )
        if "scheme" in opts:
            check_scheme(opts["scheme"])
        if "manifolds" in opts:
            parse_manifolds(opts["manifolds"])
        if "group_size" in opts:
            check_group_size(opts["group_size"])
        out.append((key, opts))
    return sorted(out, key=lambda kv: _specificity(kv[0]))  # stable: dict order within a kind


def _places(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """id(Parameter) -> every distinct (module name, attribute, module) that holds it."""
    out: dict[int, list] = {}
    seen = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is None or (id(mod), attr) in seen:
                continue
            seen.add((id(mod), attr))
            out.setdefault(id(p), []).append((mname, attr, mod))
    return out


def _unusable(t: Target) -> str:
    if parametrize.is_parametrized(t.module, t.tensor):
        return "already parametrized (by something other than pomfx); parametrizations are not stacked"
    w = t.weight
    if w is None:
        return "no weight"
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "lazy module not initialised: run one forward pass before converting"
    if not isinstance(w, nn.Parameter):
        return f"weight is a {type(w).__name__}, not a Parameter"
    if w.dim() < 2 or w.numel() == 0:
        return "weight has no (out, in) matrix"
    return ""


def validate(model, scheme, manifolds, group_size, include, exclude, overrides, tracer_options):
    """Every argument checked, nothing traced or changed; returns the parsed selectors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pomfx expects a torch.nn.Module, got {type(model).__name__}")
    check_scheme(scheme)
    parse_manifolds(manifolds)
    check_group_size(group_size)
    include, exclude = _as_list(include), _as_list(exclude)
    for s in include + exclude:
        check_selector(s)
    overrides = _check_overrides(overrides)
    tracer_kwargs(tracer_options)
    already = [_name(n, t) for n, _, t, _ in poms(model)]
    if already:
        raise ValueError(
            f"model is already converted by pomfx ({len(already)} weights, e.g. {already[0]!r}); "
            "converting twice would constrain ω itself: call pomfx.fold(model) first to convert it again"
        )
    return include, exclude, overrides


def _name(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


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
    tracer_options: dict | None = None,
) -> Plan:
    """The dry run of :func:`convert` with the same arguments: validates them, traces the model,
    builds every layout, and changes nothing. See the module docstring for the rules."""
    include, exclude, overrides = validate(
        model, scheme, manifolds, group_size, include, exclude, overrides, tracer_options
    )
    found = find_targets(model, tracer_options)
    places = _places(model)
    sels = include + exclude + [k for k, _ in overrides]
    used = [False] * len(sels)

    rows: list[PlanRow] = []
    named: set[int] = set()  # rows that include= names (rule 4 does not apply to them)
    for t in found.targets:
        row = _row(t, places)
        hit = [matches(s, t.name, t.module) for s in sels]
        used = [u or h for u, h in zip(used, hit)]
        inc, exc = hit[: len(include)], hit[len(include) : len(include) + len(exclude)]
        if any(exc):
            row.convert, row.reason = False, "excluded"
        elif include and not any(inc):
            row.convert, row.reason = False, "not selected by include"
        elif reason := _unusable(t):
            row.convert, row.reason = False, reason
        if any(inc):
            named.add(id(row))
        opts = {"scheme": scheme, "manifolds": manifolds, "group_size": group_size}
        for (_, o), h in zip(overrides, hit[len(include) + len(exclude) :]):
            if h:
                opts.update(o)
        row.scheme, row.group_size = opts["scheme"], opts["group_size"]
        row.manifolds = "+".join(parse_manifolds(opts["manifolds"]))
        rows.append(row)

    unused = [s for s, u in zip(sels, used) if not u]
    if unused:
        names = [r.name for r in rows]
        raise ValueError(
            f"selector {unused[0]!r} matches no conv/linear layer; layers: "
            + (", ".join(names[:20]) + (f" ... ({len(names)} in all)" if len(names) > 20 else "") or "none")
        )

    # rule 4: the output layer, unless the model has no other conv/linear layer
    others = any(not r.output_layer for r in rows)
    for r in rows:
        if r.convert and r.output_layer and id(r) not in named:
            if others:
                r.convert, r.reason = False, "output layer (classifier); name it in include= to convert it"
            else:
                r.note = _join_note(r.note, "output layer, converted: the model has no other layer")

    for r in rows:
        if not r.convert:
            r.scheme, r.manifolds, r.group_size = "", "", None
            continue
        r.layout = build_layout(
            r.name,
            r.shape,
            scheme=r.scheme,
            manifolds=r.manifolds,
            group_size=r.group_size,
            seed=seed,
            conv_groups=r.conv_groups,
            transposed=r.transposed,
        )
        for b in r.layout.buckets:
            r.groups[b.manifold] = r.groups.get(b.manifold, 0) + len(b.group_sizes)
        r.components = r.layout.n_components
    return Plan(rows, found.method, renorm, seed, dict(found.failures))


def _join_note(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _row(t: Target, places) -> PlanRow:
    w = t.weight
    shape = (
        tuple(w.shape)
        if isinstance(w, Tensor) and not isinstance(w, nn.parameter.UninitializedParameter)
        else ()
    )
    row = PlanRow(
        name=t.name,
        type=t.op,
        shape=shape,
        trace=t.trace,
        convert=True,
        params=w.numel() if shape else 0,
        output_layer=t.output_layer,
        module_name=t.module_name,
        tensor=t.tensor,
        transposed=t.transposed,
        conv_groups=t.conv_groups,
        functional=t.functional,
        note=t.note,
    )
    if t.functional:
        row.note = _join_note(row.note, "functional weight: no λ statistics (R = κγ)")
    if isinstance(w, nn.Parameter):
        row.tied = [(n, a) for n, a, m in places.get(id(w), []) if not (m is t.module and a == t.tensor)]
        if row.tied:
            row.note = _join_note(row.note, "tied with " + ", ".join(_name(n, a) for n, a in row.tied))
    return row


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
    tracer_options: dict | None = None,
) -> nn.Module:
    """Reparameterize the conv/linear weights of ``model`` as points of products of manifolds.

    Returns the user's own model (a deep copy unless ``inplace``): same class, methods and
    attributes, each converted weight now computed as ``W = R ⊙ ω`` by a
    :class:`~pomfx.parametrization.POM` parametrization; train it with :class:`pomfx.FGSGD`.

    - ``scheme`` (``"pi"``, ``"po"``, ``"pio"``), ``manifolds`` (``"sp+ob+st"``, ``"st"``, ...),
      ``group_size``, ``seed``, ``renorm``: see DESIGN §1 and :mod:`pomfx.layout`.
    - ``include`` / ``exclude`` / ``overrides``: per-layer selection and options, with the
      precedence documented in :mod:`passes.convert`. ``pomfx.plan`` shows the result.
    - ``tracer_options`` (keyword-only, pomfx's addition): ``{"leaf_modules": [selectors],
      "autowrap_functions": [functions], "autowrap_modules": [python modules]}`` for the
      torch.fx tracer (see :mod:`passes.trace`).
    - ``example_inputs`` is not needed: pomfx traces symbolically and never runs the model; it
      is accepted so that ``plan``/``convert``/``export_onnx`` calls can share arguments.
    - ``inplace``: convert ``model`` itself instead of a deep copy.

    Every argument is validated and every layout built before any module changes.
    """
    p = plan(
        model,
        scheme,
        manifolds=manifolds,
        group_size=group_size,
        seed=seed,
        renorm=renorm,
        include=include,
        exclude=exclude,
        overrides=overrides,
        tracer_options=tracer_options,
    )
    if not p.converted:
        why = sorted({r.reason for r in p.rows})
        warnings.warn(
            f"pomfx.convert: nothing to convert in {type(model).__name__} "
            + (
                f"({len(p.rows)} conv/linear weights, skipped: {'; '.join(why)})"
                if p.rows
                else "(no conv/linear weight)"
            )
            + "; the model is returned unchanged",
            stacklevel=2,
        )
        return model if inplace else copy.deepcopy(model)
    out = model if inplace else _copy_for(model, p)
    apply_plan(out, p)
    return out


def _copy_for(model: nn.Module, p: Plan) -> nn.Module:
    """A deep copy of ``model`` in which the weights about to be converted are not copied: each
    becomes a new Parameter on the same storage (registering the parametrization replaces it by
    ω, computed out of place, and never writes to the old weight), so the copy costs the
    model's other tensors only (a tenth of a second saved on ResNet-50)."""
    memo: dict = {}
    for row in p.converted:
        for name, attr in [(row.module_name, row.tensor), *row.tied]:
            w = getattr(model.get_submodule(name), attr)
            if type(w) is nn.Parameter and w.grad is None and not w._backward_hooks:
                memo[id(w)] = nn.Parameter(w.detach(), w.requires_grad)
    return copy.deepcopy(model, memo)


def apply_plan(model: nn.Module, p: Plan) -> None:
    """Register the plan's parametrizations on ``model`` (the planned model or a deep copy)."""
    for row in p.converted:
        module = model.get_submodule(row.module_name)
        hook = p.renorm and not row.functional
        tied = [(model.get_submodule(n), a) for n, a in row.tied]
        # untie first: registering on the first holder rewrites the shared Parameter in place
        for m, a in tied:
            m._parameters[a] = nn.Parameter(getattr(m, a).detach().clone(), getattr(m, a).requires_grad)
        pom = apply_layout(module, row.layout, p.renorm, tensor=row.tensor, hook=hook)
        original = module.parametrizations[row.tensor].original
        for m, a in tied:
            parametrize.register_parametrization(m, a, pom, unsafe=True)
            m.parametrizations[a].original = original
            make_portable(m)
            if hook and a == "weight" and is_target(m):  # every call of a tied layer feeds λ
                m.register_forward_pre_hook(lambda_hook)


def apply_layout(
    module: nn.Module, layout: Layout, renorm: bool, tensor: str = "weight", hook: bool = True
) -> POM:
    """Register the POM parametrization of ``layout`` on ``module.<tensor>``; with ``hook`` (and
    ``renorm``) also the forward pre-hook that keeps the λ statistics of its input."""
    w = getattr(module, tensor)
    pom = POM(layout, renorm, weight=w).to(w.device)  # calibrated: R = κγ
    # unsafe: no check forward (POM keeps the weight's shape and dtype; tests assert it)
    parametrize.register_parametrization(module, tensor, pom, unsafe=True)
    plist = module.parametrizations[tensor]
    plist.original = ComponentParameter(plist.original.data, pom, plist.original.requires_grad)
    make_portable(module)
    if renorm and hook:
        module.register_forward_pre_hook(lambda_hook)
    return pom
