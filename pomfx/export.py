"""Deployment: fold a copy, export it to ONNX, check the file with onnxruntime.

The file is written to a temporary name beside ``path`` and moved into place only once the
export (and, with ``verify``, the onnxruntime check) succeeded: a failed export leaves nothing.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pomfx.passes.fold import fold

__all__ = ["ExportReport", "export_onnx", "ort_providers"]


@dataclass
class ExportReport:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int | None
    max_abs_error: float | None
    max_rel_error: float | None
    providers: list[str]
    nodes: int
    op_counts: dict[str, int]
    file_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        err = (
            f"max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}"
            if self.max_abs_error is not None
            else "not verified"
        )
        return (
            f"{self.path}: {self.nodes} nodes, {self.file_size / 1e6:.2f} MB, exporter {self.exporter}, "
            f"onnxruntime ({', '.join(self.providers)}): {err}"
        )


def ort_providers() -> list[str]:
    """CUDA only when a GPU is really usable (onnxruntime-gpu lists it regardless)."""
    import onnxruntime as ort

    usable = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if usable else ["CPUExecutionProvider"]


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat_outputs(o)]


def _export(model, args, path, dynamic_batch, opset, dynamo) -> None:
    names = [f"input_{i}" for i in range(len(args))]
    kwargs: dict[str, Any] = dict(input_names=names, opset_version=opset, dynamo=dynamo)
    if dynamo:
        if dynamic_batch:
            batch = torch.export.Dim("batch")
            kwargs["dynamic_shapes"] = tuple({0: batch} if a.dim() else None for a in args)
        kwargs["external_data"] = False
        kwargs["verbose"] = False
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
    torch.onnx.export(model, args, path, **kwargs)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-5,
) -> ExportReport:
    """Fold a copy of ``model``, export it to ``path`` and check it with onnxruntime.

    torch.onnx's dynamo exporter first, the TorchScript exporter as a fallback (with a warning).
    With ``verify``, onnxruntime runs the example inputs and the report gives the max abs and
    rel error against torch; a relative error above ``rtol`` raises and writes no file.
    """
    import onnx

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
    args = tuple(a.detach() for a in _as_tuple(example_inputs))
    plain = fold(model).eval()
    with torch.no_grad():
        try:
            expected = _flat_outputs(plain(*args))
        except Exception as e:
            raise ValueError(f"the model does not run on the example inputs: {e}") from e
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.stem}-")
    os.close(fd)
    try:
        exporter = "dynamo"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _export(plain, args, tmp, dynamic_batch, opset, dynamo=True)
        except Exception as e:  # noqa: BLE001 - fall back to the TorchScript exporter
            warnings.warn(f"dynamo ONNX export failed ({type(e).__name__}: {e}); using TorchScript", stacklevel=2)
            exporter = "torchscript"
            _export(plain, args, tmp, dynamic_batch, opset, dynamo=False)
        proto = onnx.load(tmp)
        ops: dict[str, int] = {}
        for node in proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        abs_err = rel_err = None
        providers = ort_providers()
        if verify:
            abs_err, rel_err = _check(tmp, args, expected, providers)
            if not rel_err <= rtol:
                raise RuntimeError(
                    f"onnxruntime output differs from torch: max rel error {rel_err:.3g} > {rtol:g} "
                    f"(max abs {abs_err:.3g}); no file written"
                )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return ExportReport(
        str(path), exporter, used_opset, abs_err, rel_err, providers, len(proto.graph.node), ops, path.stat().st_size
    )


def _check(path: str, args: tuple, expected: list[torch.Tensor], providers: list[str]) -> tuple[float, float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=providers)
    feeds = {i.name: a.cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)
    if len(got) != len(expected):
        raise RuntimeError(f"onnxruntime gave {len(got)} outputs, torch {len(expected)}")
    abs_err = rel_err = 0.0
    for g, e in zip(got, expected):
        e = e.detach().cpu().double()
        diff = (torch.as_tensor(g).double() - e).abs().max().item()
        abs_err = max(abs_err, diff)
        rel_err = max(rel_err, diff / max(e.abs().max().item(), 1e-30))
    return abs_err, rel_err
