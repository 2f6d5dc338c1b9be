"""A report of a converted model: layouts, manifolds, scales and residuals, layer by layer.

Per converted tensor (``pomfx report`` prints it):

- the layout: scheme, manifold names, groups per manifold type, components and their shape;
- the scales of stage (ii) of the renormalization, ``R = κ·γ/λ̂``: κ (the layer's calibrated
  scale), the min / mean / max of R over the weight's (out, in) entries, and of the committed
  λ̂ = κγ/R (the input channels' relative std; 1 before the first ``update_scales``; "-" with
  ``renorm=False``, where R = 1), and how many training batches the running λ has seen;
- the residual: the largest distance of a component from its manifold
  (what :func:`pomfx.constraint_error` reports; ≈ 1e-7 in fp32 after training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .renorm import poms

__all__ = ["LayerReport", "Report", "report"]


@dataclass
class LayerReport:
    name: str
    type: str
    shape: tuple[int, ...]
    scheme: str
    manifolds: str
    group_size: int | None
    groups: dict[str, int]
    components: int
    component_shapes: list[str]
    renorm: bool
    kappa: float
    scale: tuple[float, float, float]  # R: min, mean, max
    lambda_hat: tuple[float, float, float] | None  # committed λ̂: min, mean, max
    batches: int
    residual: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        d["scale"] = dict(zip(("min", "mean", "max"), self.scale))
        d["lambda_hat"] = dict(zip(("min", "mean", "max"), self.lambda_hat)) if self.lambda_hat else None
        return d


@dataclass
class Report:
    """What :func:`report` returns: prints as a table, ``.to_dict()`` for JSON."""

    model: str
    layers: list[LayerReport]
    params: int
    params_converted: int
    skipped: list[str] = field(default_factory=list)

    @property
    def max_residual(self) -> float:
        return max((r.residual for r in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "params": self.params,
            "params_converted": self.params_converted,
            "max_residual": self.max_residual,
            "unconverted_layers": list(self.skipped),
            "layers": [r.to_dict() for r in self.layers],
        }

    def __str__(self) -> str:
        head = (
            "layer",
            "type",
            "shape",
            "scheme",
            "groups",
            "comps",
            "κ",
            "R min/mean/max",
            "λ̂ min/mean/max",
            "batches",
            "residual",
        )
        body = []
        for r in self.layers:
            lam = "-" if r.lambda_hat is None else "/".join(f"{v:.3g}" for v in r.lambda_hat)
            body.append(
                (
                    r.name,
                    r.type,
                    "×".join(map(str, r.shape)),
                    r.scheme + ("" if r.renorm else " (renorm off)"),
                    " ".join(f"{k}:{v}" for k, v in r.groups.items()),
                    f"{r.components} × {'/'.join(r.component_shapes)}",
                    f"{r.kappa:.3g}",
                    "/".join(f"{v:.3g}" for v in r.scale),
                    lam,
                    str(r.batches),
                    f"{r.residual:.1e}",
                )
            )
        lines = [f"pomfx report of {self.model}"]
        if body:
            widths = [max(len(x) for x in col) for col in zip(head, *body)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
            lines += [fmt.format(*row).rstrip() for row in body]
        share = 100.0 * self.params_converted / max(self.params, 1)
        lines.append(
            f"{len(self.layers)} converted tensors, {self.params_converted:,} of {self.params:,} parameters "
            f"({share:.1f} %) on manifolds; max residual (distance from the manifold) {self.max_residual:.2e}"
        )
        if self.skipped:
            more = f" (+{len(self.skipped) - 8} more)" if len(self.skipped) > 8 else ""
            lines.append("not converted: " + ", ".join(self.skipped[:8]) + more)
        return "\n".join(lines)


def _stats(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.detach().double()
    return float(x.min()), float(x.mean()), float(x.max())


@torch.no_grad()
def report(model: nn.Module) -> Report:
    """Layouts, manifolds, scales (κ, R, λ̂) and residuals of every converted tensor of ``model``.

    A model with no converted layer gives an empty report (its ``layers`` list is empty).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pomfx.report expects a torch.nn.Module, got {type(model).__name__}")
    layers = []
    converted_ids = set()
    for name, module, t, pom in poms(model):
        omega = module.parametrizations[t].original
        converted_ids.add(id(omega))
        lay = pom.layout
        opts = lay.options
        groups: dict[str, int] = {}
        for b in lay.buckets:
            groups[b.manifold] = groups.get(b.manifold, 0) + len(b.group_sizes)
        shapes = list(dict.fromkeys(f"{b.rows}×{b.cols}" for b in lay.buckets))
        scale = pom.scale.detach()
        lam = None
        if pom.renorm:
            lam = _stats(pom.kappa * pom.gamma / scale)
        layers.append(
            LayerReport(
                name=name if t == "weight" else f"{name}.{t}",
                type=parametrize.type_before_parametrizations(module).__name__,
                shape=tuple(lay.weight_shape),
                scheme=str(opts.get("scheme", "")),
                manifolds=str(opts.get("manifolds", "")),
                group_size=opts.get("group_size"),
                groups=groups,
                components=lay.n_components,
                component_shapes=shapes,
                renorm=bool(pom.renorm),
                kappa=float(pom.kappa),
                scale=_stats(scale),
                lambda_hat=lam,
                batches=int(pom.num_batches_tracked),
                residual=pom.constraint_error(omega),
            )
        )
    params = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for p in model.parameters() if id(p) in converted_ids)
    skipped = []
    for name, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
        if issubclass(cls, (nn.Linear, nn.modules.conv._ConvNd)) and not parametrize.is_parametrized(
            module, "weight"
        ):
            skipped.append(name)
    return Report(type(model).__name__, layers, params, conv, skipped)
