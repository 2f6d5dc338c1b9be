"""Deployment: fold a copy, export it to ONNX, check the file with onnxruntime.

:func:`export_onnx` never leaves a half-written file: everything is written into a fresh
temporary directory beside ``path`` and moved into place (``os.replace``, atomic on one file
system) only once the export and, with ``verify``, the onnxruntime check succeeded; on any
failure, interruption included, the temporary directory is removed and ``path`` is untouched.

Exporters: torch.onnx's dynamo exporter (``torch.export``) first; when it fails, the TorchScript
exporter with a warning. A Python ``if`` on a tensor's value cannot be captured by either: the
dynamo exporter refuses it, and the TorchScript tracer would silently record the branch the
example took, so its "Converting a tensor to a Python boolean" warning is made an error here.
Both failures are reported together in one :class:`OnnxExportError`.

File layout: one self-contained ``.onnx`` file by default. Protobuf cannot hold more than
2 GB, so bigger models (vit_h_14, regnet_y_128gf) get their weights in a sidecar
``<name>.onnx.data`` beside the file, with a warning; ``external_data=True`` asks for the
sidecar whatever the size. The report's ``file_size`` counts both files.

Verification: onnxruntime runs the example inputs and the outputs are compared with the
folded model's in torch (eval mode, TF32 off). With ``dynamic_batch`` a second batch size
(the example plus its first sample) is checked too, so a batch size baked into the graph is
caught. The relative error is, per output tensor, ``max|onnxruntime - torch| / max|torch|``
(the largest absolute difference over the largest magnitude of that output), and the report
gives the largest over all outputs and checked batch sizes; above ``rtol`` it raises.
The CUDA provider is used only when torch sees a usable GPU (onnxruntime-gpu lists
CUDAExecutionProvider even on machines without one) and with TF32 off; the report lists the
providers the session really used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pomfx.manifolds import ieee_matmuls
from pomfx.passes.fold import fold

__all__ = ["ExportReport", "OnnxExportError", "export_onnx", "ort_providers", "rel_error"]

_PROTOBUF_LIMIT = 2**31 - 2**24  # a little under protobuf's 2 GiB, for the graph itself


class OnnxExportError(RuntimeError):
    """The model could not be exported or the exported file failed verification."""


@dataclass
class ExportReport:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int | None
    max_abs_error: float | None  # None when not verified
    max_rel_error: float | None  # per output max|diff| / max|torch|, the max over outputs
    providers: list[str]  # the onnxruntime providers the check ran on
    nodes: int
    op_counts: dict[str, int]
    file_size: int  # bytes, the external data file included
    external_data: str | None = None  # the sidecar weights file, None for a single file
    batch_sizes: list[int] = field(default_factory=list)  # the batch sizes verified

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if self.max_abs_error is None:
            err = "not verified"
        else:
            err = (
                f"max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} "
                f"(batch sizes {', '.join(map(str, self.batch_sizes))})"
            )
        sidecar = f" + {Path(self.external_data).name}" if self.external_data else ""
        return (
            f"{self.path}{sidecar}: {self.nodes} nodes, {self.file_size / 1e6:.2f} MB, opset {self.opset}, "
            f"exporter {self.exporter}; onnxruntime ({', '.join(self.providers)}): {err}"
        )


def ort_providers() -> list[str]:
    """CUDA only when a GPU is really usable (onnxruntime-gpu lists it regardless)."""
    import onnxruntime as ort

    usable = (
        torch.cuda.is_available()
        and torch.cuda.device_count() > 0
        and "CUDAExecutionProvider" in ort.get_available_providers()
    )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if usable else ["CPUExecutionProvider"]


def rel_error(got, expected) -> tuple[float, float]:
    """``(max abs error, max rel error)`` of ``got`` against ``expected`` (sequences of arrays).

    The relative error of one output is ``max|got - expected| / max|expected|``; the result is
    the largest over the outputs (NaN anywhere gives NaN, which fails any ``<=`` check).
    """
    abs_err = rel_err = 0.0
    for g, e in zip(got, expected):
        e = torch.as_tensor(e).detach().cpu().double()
        g = torch.as_tensor(g).detach().cpu().double()
        if g.shape != e.shape:
            raise OnnxExportError(f"onnxruntime output of shape {tuple(g.shape)}, torch {tuple(e.shape)}")
        if e.numel() == 0:
            continue
        diff, scale = (g - e).abs().max().item(), e.abs().max().item()
        abs_err = _worst(abs_err, diff)
        rel_err = _worst(rel_err, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return abs_err, rel_err


def _worst(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-5,
    external_data: bool = False,
    providers: list[str] | None = None,
) -> ExportReport:
    """Fold a copy of ``model``, export it to ``path`` and check it with onnxruntime.

    ``example_inputs``: a tensor or a tuple of tensors, the positional inputs of the model
    (dim 0 is the batch when ``dynamic_batch``). The model is exported in eval mode; ``model``
    itself is not changed. ``opset`` None takes the exporter's default. With ``verify``,
    onnxruntime (``providers``, default :func:`ort_providers`) runs the example inputs and the
    report gives the max abs and rel error against torch (see the module docstring); a relative
    error above ``rtol`` raises :class:`OnnxExportError` and writes no file.
    ``external_data``: False writes one file unless the weights exceed protobuf's 2 GB
    (then they go to ``<path>.data``, with a warning); True always writes them there.

    Raises ``FileNotFoundError`` (missing directory), ``ValueError`` (bad arguments, inputs the
    model cannot run on), :class:`OnnxExportError` (both exporters failed, or verification did).
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory; give a file name")
    if opset is not None and not (isinstance(opset, int) and 7 <= opset <= onnx.defs.onnx_opset_version()):
        raise ValueError(
            f"opset must be an int in [7, {onnx.defs.onnx_opset_version()}] or None, got {opset!r}"
        )
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    args = _check_inputs(example_inputs, dynamic_batch)

    plain = fold(model).eval()
    batches = [args]
    if dynamic_batch and _batch(args) is not None:  # a second batch size: one sample more
        batches.append(tuple(torch.cat([a, a[:1]]) if a.dim() else a for a in args))
    expected = [_run_torch(plain, b) for b in (batches if verify else batches[:1])]
    if verify and any(not e.any() for e in expected[0]):
        warnings.warn(
            "pomfx.export_onnx: an output of the model is all zeros on the example inputs (a "
            "zero-initialised classifier?): the onnxruntime check cannot see errors in it",
            stacklevel=2,
        )
    # torch.export specializes a dim of size 1: export with a batch of at least two
    export_args = batches[-1] if _batch(args) == 1 else args
    names = [f"input_{i}" for i in range(len(args))]
    out_names = [f"output_{i}" for i in range(len(expected[0]))]

    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OSError(f"cannot write into {str(path.parent)!r}: {e}") from e
    tmp = tmpdir / path.name
    try:
        exporter = _export_any(plain, export_args, tmp, names, out_names, dynamic_batch, opset, external_data)
        sidecar = _layout_files(tmp, external_data)
        if sidecar and not external_data:
            warnings.warn(
                f"pomfx.export_onnx: the weights exceed protobuf's 2 GB limit; they are written to "
                f"{sidecar} beside {path.name} (keep the two files together)",
                stacklevel=2,
            )
        proto = onnx.load(str(tmp), load_external_data=False)
        ops: dict[str, int] = {}
        for node in proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        abs_err = rel_err = None
        used = list(providers or ort_providers())
        if verify:
            abs_err, rel_err, used = _verify(tmp, names, batches, expected, used)
            if not rel_err <= rtol:
                raise OnnxExportError(
                    f"onnxruntime output differs from torch: max rel error {rel_err:.3g} > rtol {rtol:g} "
                    f"(max abs {abs_err:.3g}, exporter {exporter}); no file written"
                )
        size = sum(f.stat().st_size for f in tmpdir.iterdir())
        if sidecar is not None:
            os.replace(tmpdir / sidecar, path.parent / sidecar)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportReport(
        str(path),
        exporter,
        used_opset,
        abs_err,
        rel_err,
        used,
        len(proto.graph.node),
        ops,
        size,
        str(path.parent / sidecar) if sidecar else None,
        [n for b in batches if verify and (n := _batch(b)) is not None],
    )


# -- inputs and the torch reference -------------------------------------------------------------
def _check_inputs(example_inputs, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        kinds = ", ".join(type(a).__name__ for a in args) or "nothing"
        raise ValueError(f"example_inputs must be a tensor or a tuple of tensors, got {kinds}")
    if any(a.dtype == torch.bfloat16 for a in args):
        raise ValueError("onnxruntime takes no bfloat16 inputs: export the model in float32 or float16")
    args = tuple(a.detach() for a in args)
    sizes = {a.shape[0] for a in args if a.dim()}
    if dynamic_batch and len(sizes) > 1:
        raise ValueError(
            f"dynamic_batch takes dim 0 of every input as the batch, but the inputs have shapes "
            f"{[tuple(a.shape) for a in args]}; pass dynamic_batch=False"
        )
    if dynamic_batch and 0 in sizes:
        raise ValueError("example inputs have an empty batch (dim 0 of size 0)")
    return args


def _batch(args) -> int | None:
    return next((a.shape[0] for a in args if a.dim()), None)


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    raise ValueError(
        f"the model returns a {type(out).__name__}; ONNX export needs tensors (or tuples/dicts of them)"
    )


@contextlib.contextmanager
def _exact_math():
    """TF32 off on CUDA while computing references (on by default for cuDNN convs)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with ieee_matmuls():
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _run_torch(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    try:
        with torch.no_grad(), _exact_math():
            return [t.detach().cpu() for t in _flat_outputs(model(*args))]
    except Exception as e:  # noqa: BLE001 - any failure here is bad input
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise ValueError(
            f"{type(model).__name__} does not run on example inputs of shape {shapes}: "
            f"{type(e).__name__}: {e}"
        ) from e


# -- exporters ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs graphs and guards at WARNING when it fails: keep them off the console."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def _summary(e: BaseException) -> str:
    """One line of an exporter's (often very long) error message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:400]
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"


def _export_dynamo(model, args, path, names, out_names, dynamic_batch, opset, external_data) -> None:
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if a.dim() else None for a in args)
    # torch.export prints the partial graph of a failure to stderr: the error says enough
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), _quiet_torch_logs(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            input_names=names,
            output_names=out_names,
            opset_version=opset,
            dynamic_shapes=shapes,
            external_data=external_data,  # False: torch still switches to a sidecar above 2 GB
            verbose=False,
        )


def _export_torchscript(model, args, path, names, out_names, dynamic_batch, opset, external_data) -> None:
    axes = {n: {0: "batch"} for n in names + out_names} if dynamic_batch else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=out_names,
            opset_version=opset,
            dynamic_axes=axes,
        )
    # the tracer records only the branch the example takes: refuse such a graph
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and "Python boolean" in str(w.message):
            raise OnnxExportError(f"the trace depends on a tensor's value: {str(w.message).splitlines()[0]}")


def _export_any(model, args, path, names, out_names, dynamic_batch, opset, external_data) -> str:
    """Export with dynamo, else TorchScript (with a warning); returns the exporter used."""
    try:
        _export_dynamo(model, args, path, names, out_names, dynamic_batch, opset, external_data)
        return "dynamo"
    except Exception as e:  # noqa: BLE001 - any dynamo failure: fall back
        first = e
    _clear(path.parent)
    warnings.warn(
        f"pomfx.export_onnx: the dynamo exporter failed ({_summary(first)}); using the TorchScript exporter",
        stacklevel=3,
    )
    try:
        _export_torchscript(model, args, path, names, out_names, dynamic_batch, opset, external_data)
        return "torchscript"
    except Exception as e:  # noqa: BLE001
        second = e
    data_dependent = "data-dependent" in str(first) or "Python boolean" in str(second)
    hint = (
        "the model has data-dependent control flow (a Python `if` or loop on a tensor's value), "
        "which ONNX export cannot capture; express it with tensor ops (torch.where) or torch.cond. "
        if data_dependent
        else ""
    )
    raise OnnxExportError(
        f"ONNX export of {type(model).__name__} failed with both exporters: {hint}\n"
        f"  dynamo: {_summary(first)}\n  torchscript: {_summary(second)}\nno file written"
    ) from second


def _clear(directory: Path) -> None:
    for f in directory.iterdir():
        f.unlink()


def _layout_files(tmp: Path, external_data: bool) -> str | None:
    """Leave ``tmp`` alone or with one ``<name>.data`` sidecar; returns the sidecar's name.

    The dynamo exporter writes that layout itself; the TorchScript one may write one file per
    tensor (above 2 GB) and has no option for a sidecar: re-save its output when needed.
    """
    import onnx

    sidecar = tmp.name + ".data"
    others = sorted(f.name for f in tmp.parent.iterdir() if f != tmp)
    if others == [sidecar] or (not others and not external_data):
        return sidecar if others else None
    proto = onnx.load(str(tmp))  # with its external data
    for name in others:
        (tmp.parent / name).unlink()
    big = sum(t.ByteSize() for t in proto.graph.initializer) > _PROTOBUF_LIMIT
    if not (external_data or big):
        onnx.save_model(proto, str(tmp))
        return None
    kw = dict(save_as_external_data=True, all_tensors_to_one_file=True, location=sidecar)
    onnx.save_model(proto, str(tmp), **kw)
    return sidecar if (tmp.parent / sidecar).exists() else None


# -- onnxruntime --------------------------------------------------------------------------------
def _session(path: Path, providers: list[str]):
    import onnxruntime as ort

    opts = [{"use_tf32": "0"} if p == "CUDAExecutionProvider" else {} for p in providers]
    try:
        return ort.InferenceSession(str(path), providers=providers, provider_options=opts)
    except Exception as e:  # noqa: BLE001
        raise OnnxExportError(f"onnxruntime cannot load the exported model: {_summary(e)}") from e


def _verify(path: Path, names, batches, expected, providers) -> tuple[float, float, list[str]]:
    sess = _session(path, providers)
    inputs = {i.name for i in sess.get_inputs()}
    abs_err = rel_err = 0.0
    for args, exp in zip(batches, expected):
        feeds = {n: a.cpu().numpy() for n, a in zip(names, args) if n in inputs}
        try:
            got = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(
                f"onnxruntime fails on inputs of shape {[tuple(a.shape) for a in args]}: {_summary(e)}"
            ) from e
        if len(got) != len(exp):
            raise OnnxExportError(f"onnxruntime gave {len(got)} outputs, torch {len(exp)}")
        a, r = rel_error(got, exp)
        abs_err, rel_err = _worst(abs_err, a), _worst(rel_err, r)
    return abs_err, rel_err, list(sess.get_providers())
