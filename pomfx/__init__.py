"""pomfx: train deep networks with weights on products of manifolds (Ozay, NeurIPS 2019).

Typical use::

    model = pomfx.convert(model, scheme="pio")
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
    ...train, calling pomfx.update_scales(model) once per epoch...
    pomfx.export_onnx(model, "model.onnx", (x,))
"""

from __future__ import annotations

from torch import nn

from .bounds import Bounds, bounds  # noqa: E402
from .checkpoint import load_plain_state_dict
from .export import ExportReport, export_onnx  # noqa: E402
from .optim import FGSGD
from .passes.convert import Plan, convert, plan  # noqa: E402  (the facade imports passes last)
from .passes.fold import fold  # noqa: E402
from .renorm import poms as _poms
from .renorm import update_scales
from .report import Report, report  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "convert",
    "plan",
    "Plan",
    "FGSGD",
    "update_scales",
    "constraint_error",
    "fold",
    "export_onnx",
    "ExportReport",
    "load_plain_state_dict",
    "bounds",
    "Bounds",
    "report",
    "Report",
]


def constraint_error(model: nn.Module) -> dict[str, float]:
    """Per converted layer, the largest distance of a component from its manifold."""
    out = {}
    for name, module, t, pom in _poms(model):
        out[name] = pom.constraint_error(module.parametrizations[t].original)
    return out
