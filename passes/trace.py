"""Finding the weights to convert: torch.fx first, then per-submodule tracing, then a module walk.

The traced graph is only used to *find* targets and the model's output layer; parametrizations
are registered on the user's own modules afterwards (``passes.convert``). A target is one weight:

- a conv or linear module (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear`` and their
  subclasses, dispatched on ``type_before_parametrizations``): its ``weight``;
- a Parameter read by a ``get_attr`` node that feeds, as the weight argument,
  ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` or ``F.linear`` in some module's forward: that
  attribute, on the module that owns it ("functional" targets).

How the model is searched (each target records which path found it, ``Target.trace``):

1. ``"fx"``: the whole model is traced by :class:`Tracer`, a ``torch.fx.Tracer`` whose leaf
   modules are conv/linear modules, torch.fx's defaults (``torch.nn`` modules) and the user's
   ``leaf_modules``, and which autowraps the user's ``autowrap_functions`` / ``autowrap_modules``.
2. ``"submodule fx"``: a module that cannot be traced (data-dependent control flow, a
   ``ModuleList`` without forward, ...) is not given up: each of its children is traced on its
   own, recursively. Leaf modules of a successful trace that hold weights (a user leaf module,
   ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) are searched the same way.
3. ``"module walk"``: a conv/linear module whose parent could not be traced is taken as found
   by walking the module tree; so is one that no trace reaches (not called in the traced
   forward, e.g. a branch only taken in another train/eval mode). Functional weights of an
   untraceable module cannot be found by a walk: they stay unconverted.

The model is traced in its current train/eval mode and is never run.

*Output layer* (skipped by default by ``convert``): a target whose output reaches the model's
output through no other target. Where the graph is known this is exact (several parallel heads
are all output layers). Where a module is untraceable it is a heuristic: only the last of its
children (in registration order) that holds targets can hold the output layer, and if the last
such children are conv/linear modules themselves, the trailing run of adjacent ones are output
layers (``box_predictor.cls_score`` and ``box_predictor.bbox_pred`` in torchvision's Faster
R-CNN). The plan shows the result; ``include``/``exclude`` override it.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "CONV_LINEAR",
    "TRACER_OPTIONS",
    "Discovery",
    "Target",
    "Tracer",
    "find_targets",
    "matches",
    "module_type",
]

CONV_LINEAR = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

# functional op -> (display name, spatial dims or 0 for linear, transposed)
FUNCTIONAL = {
    F.conv1d: ("F.conv1d", 1, False),
    F.conv2d: ("F.conv2d", 2, False),
    F.conv3d: ("F.conv3d", 3, False),
    F.conv_transpose1d: ("F.conv_transpose1d", 1, True),
    F.conv_transpose2d: ("F.conv_transpose2d", 2, True),
    F.conv_transpose3d: ("F.conv_transpose3d", 3, True),
    F.linear: ("F.linear", 0, False),
}
_GROUPS_ARG = 6  # position of ``groups`` in conv{n}d and conv_transpose{n}d

TRACER_OPTIONS = ("leaf_modules", "autowrap_functions", "autowrap_modules")

TRACE_PATHS = ("fx", "submodule fx", "module walk")


def module_type(m: nn.Module) -> type:
    return parametrize.type_before_parametrizations(m)


def is_target(m: nn.Module) -> bool:
    return issubclass(module_type(m), CONV_LINEAR)


def matches(sel, name: str, module: nn.Module) -> bool:
    """Whether a selector picks ``(name, module)``: a glob on the qualified name, a module type
    (the class before parametrization, subclasses included), or a callable ``(name, module)``."""
    if isinstance(sel, str):
        return fnmatch.fnmatchcase(name, sel)
    if isinstance(sel, type):
        return issubclass(module_type(module), sel)
    if callable(sel):
        return bool(sel(name, module))
    raise TypeError(
        "a selector is a qualified-name glob (str), a module type or a callable "
        f"(name, module) -> bool; got {sel!r}"
    )


def check_selector(sel) -> None:
    if not (isinstance(sel, (str, type)) or callable(sel)):
        matches(sel, "", nn.Module())  # raises the message


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


@dataclass
class Target:
    """One weight that could be converted."""

    name: str  # the row's name: the module's qualified name, or "<module>.<attr>" (functional)
    module_name: str  # qualified name of the module that owns the weight
    tensor: str  # attribute name of the weight on that module
    module: nn.Module
    op: str  # "Conv2d", "ConvTranspose2d", "Linear", "F.conv2d", ...
    transposed: bool  # weight is (C_in, C_out/groups, *k)
    conv_groups: int
    output_layer: bool
    trace: str  # one of TRACE_PATHS
    functional: bool = False
    note: str = ""

    @property
    def weight(self):
        return getattr(self.module, self.tensor)


@dataclass
class Discovery:
    """What :func:`find_targets` found: targets in graph order, the path(s) taken, and where
    torch.fx failed (qualified module name -> reason)."""

    targets: list[Target]
    method: str
    failures: dict[str, str] = field(default_factory=dict)


class Tracer(torch.fx.Tracer):
    """torch.fx's tracer with conv/linear modules and user-chosen modules as leaves.

    ``leaf_modules``: selectors (qualified-name glob, module type or callable) of modules kept as
    single calls; their own weights are then searched by tracing them separately.
    ``autowrap_functions`` / ``autowrap_modules``: passed to ``torch.fx.Tracer`` (functions that
    are recorded as calls instead of traced through, e.g. ones with data-dependent control flow).
    """

    def __init__(
        self,
        leaf_modules: Iterable = (),
        autowrap_functions: Iterable[Callable] = (),
        autowrap_modules: Iterable = (math,),
        prefix: str = "",
    ):
        super().__init__(
            autowrap_modules=tuple(autowrap_modules), autowrap_functions=tuple(autowrap_functions)
        )
        self.leaf_selectors = list(leaf_modules)
        self.prefix = prefix

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_target(m):
            return True
        name = _join(self.prefix, module_qualified_name)
        if any(matches(s, name, m) for s in self.leaf_selectors):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def tracer_kwargs(options: dict | None) -> dict:
    """Validated :class:`Tracer` keyword arguments from a user's ``tracer_options`` dict."""
    options = dict(options or {})
    bad = set(options) - set(TRACER_OPTIONS)
    if bad:
        raise ValueError(f"unknown tracer option {sorted(bad)[0]!r}; valid: {', '.join(TRACER_OPTIONS)}")
    out = {}
    for key, value in options.items():
        value = [value] if not isinstance(value, (list, tuple, set)) else list(value)
        if key == "leaf_modules":
            for s in value:
                check_selector(s)
        elif key == "autowrap_functions" and not all(callable(f) for f in value):
            raise TypeError(f"tracer_options['autowrap_functions'] must be functions, got {value!r}")
        out[key] = value
    return out


class _Finder:
    def __init__(self, model: nn.Module, options: dict):
        self.model = model
        self.options = options
        self.targets: list[Target] = []
        self.failures: dict[str, str] = {}
        self.seen: set[int] = set()  # ids of weights already taken (tied weights: once)
        self._holds: dict[int, bool] = {}

    # -- helpers ----------------------------------------------------------------------------
    def holds_weights(self, m: nn.Module) -> bool:
        """Whether a module may hold a target: a conv/linear inside, or a parameter of dim >= 2."""
        key = id(m)
        if key not in self._holds:
            self._holds[key] = any(is_target(s) for s in m.modules()) or any(
                p.dim() >= 2 for p in m.parameters()
            )
        return self._holds[key]

    def add_module(self, name: str, m: nn.Module, output: bool, trace: str, note: str = "") -> None:
        w = getattr(m, "weight", None)
        if w is not None:
            if id(w) in self.seen:
                return
            self.seen.add(id(w))
        t = module_type(m)
        transposed = bool(getattr(m, "transposed", False))
        groups = int(getattr(m, "groups", 1)) if not issubclass(t, nn.Linear) else 1
        self.targets.append(
            Target(name, name, "weight", m, t.__name__, transposed, groups, output, trace, note=note)
        )

    # -- the three paths --------------------------------------------------------------------
    def visit(self, m: nn.Module, prefix: str, output: bool, top: bool) -> None:
        if is_target(m):
            self.add_module(prefix, m, output, "fx" if top else "module walk")
            return
        try:
            tracer = Tracer(prefix=prefix, **self.options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(m)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: fall back
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failures[prefix or "(model)"] = f"{type(e).__name__}: {msg.split('. ')[0]}"[:200]
            self.walk_children(m, prefix, output)
            return
        self.use_graph(m, prefix, graph, output, "fx" if top else "submodule fx")

    def walk_children(self, m: nn.Module, prefix: str, output: bool) -> None:
        kids = [(n, c) for n, c in m.named_children() if self.holds_weights(c)]
        # heuristic output layer: the last child holding weights; or the trailing run of adjacent
        # conv/linear children, when the last ones are conv/linear themselves
        all_kids = list(m.named_children())
        last = set()
        if kids and output:
            i = [n for n, _ in all_kids].index(kids[-1][0])
            while i >= 0 and is_target(all_kids[i][1]):
                last.add(all_kids[i][0])
                i -= 1
            last = last or {kids[-1][0]}
        for n, c in kids:
            name = _join(prefix, n)
            if is_target(c):
                self.add_module(name, c, n in last, "module walk")
            else:
                self.visit(c, name, n in last, top=False)

    def use_graph(self, m: nn.Module, prefix: str, graph: torch.fx.Graph, output: bool, path: str) -> None:
        units = {}  # node -> (kind, qualified name relative to m, module or call node)
        for n in graph.nodes:
            if n.op == "call_module":
                sub = m.get_submodule(n.target)
                if is_target(sub):
                    units[n] = ("module", n.target, sub)
                elif self.holds_weights(sub):
                    units[n] = ("container", n.target, sub)
            elif n.op == "call_function" and n.target in FUNCTIONAL:
                w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
                if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                    units[n] = ("functional", w.target, n)
        reach = _reaches_output(graph, set(units))
        # a module called several times: one target, an output layer if any call reaches the output
        merged: dict = {}
        for n, (kind, qual, obj) in units.items():
            key = (kind, qual) if kind != "functional" else (kind, qual, n)
            hit = merged.get(key, (kind, qual, obj, False))[3] or reach[n]
            merged[key] = (kind, qual, obj, hit)
        for kind, qual, obj, hit in merged.values():
            name, out = _join(prefix, qual), output and hit
            if kind == "module":
                self.add_module(name, obj, out, path)
            elif kind == "container":
                self.visit(obj, name, out, top=False)
            else:
                self.add_functional(m, prefix, qual, obj, out, path)

    def add_functional(self, m, prefix, attr_path, node, output, path) -> None:
        owner_path, _, attr = attr_path.rpartition(".")
        owner = m.get_submodule(owner_path)
        w = getattr(owner, attr, None)
        if not isinstance(w, nn.Parameter) or id(w) in self.seen:
            return
        op, spatial, transposed = FUNCTIONAL[node.target]
        if w.dim() != spatial + 2:
            return
        groups = node.args[_GROUPS_ARG] if len(node.args) > _GROUPS_ARG else node.kwargs.get("groups", 1)
        if spatial == 0:
            groups = 1
        if not isinstance(groups, int) or groups < 1:
            return  # groups computed at run time: the weight's layout is unknown
        if w.shape[0] % groups:  # out channels (conv) or in channels (transposed) per group
            return
        self.seen.add(id(w))
        mname = _join(prefix, owner_path)
        self.targets.append(
            Target(
                _join(mname, attr), mname, attr, owner, op, transposed, groups, output, path, functional=True
            )
        )

    def unreached(self) -> None:
        for name, m in self.model.named_modules():
            if is_target(m) and isinstance(getattr(m, "weight", None), nn.Parameter):
                self.add_module(name, m, False, "module walk", note="not called in the traced forward")


_METADATA_METHODS = {"size", "dim", "numel", "nelement"}
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}


def _metadata(node: torch.fx.Node) -> bool:
    """A node that reads only a tensor's metadata (``x.size(0)``, ``x.shape``): no values flow."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _METADATA_ATTRS
    return False


def _reaches_output(graph: torch.fx.Graph, units: set) -> dict:
    """For each unit node: whether its values reach the graph's output through no other unit."""
    out = {}
    for node in units:
        stack, seen, hit = list(node.users), set(), False
        while stack and not hit:
            u = stack.pop()
            if u in seen or _metadata(u):
                continue
            seen.add(u)
            if u.op == "output":
                hit = True
            elif u not in units:
                stack.extend(u.users)
        out[node] = hit
    return out


def find_targets(model: nn.Module, tracer_options: dict | None = None) -> Discovery:
    """Every conv/linear weight of ``model``, in graph order, with the path that found it.

    ``tracer_options``: ``{"leaf_modules": [...], "autowrap_functions": [...],
    "autowrap_modules": [...]}`` for :class:`Tracer`. Warns when torch.fx cannot trace the whole
    model (the fallback paths are then used, see the module docstring).
    """
    finder = _Finder(model, tracer_kwargs(tracer_options))
    finder.visit(model, "", output=True, top=True)
    finder.unreached()
    paths = [p for p in TRACE_PATHS if any(t.trace == p for t in finder.targets)]
    method = " + ".join(paths) if paths else ("fx" if "(model)" not in finder.failures else "module walk")
    if "(model)" in finder.failures:
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({finder.failures['(model)']}); "
            f"its parts were searched by {method} (see the plan's 'trace' column)",
            stacklevel=3,
        )
    return Discovery(finder.targets, method, finder.failures)
