"""``pomfx export``: write a trained model to ONNX and print the onnxruntime verification report.

Two ways to give the model::

    # 1. a whole model saved with torch.save(model) (converted or not)
    pomfx export model.pt --input-shape 1,3,224,224 --out model.onnx

    # 2. the architecture and a checkpoint: the model is rebuilt, converted with the same
    #    options it was trained with (the layout is seeded, so it comes out identical; pomfx
    #    refuses a checkpoint whose saved layout differs), and the checkpoint is loaded
    pomfx export --model torchvision:resnet18 --num-classes 10 --checkpoint ckpt.pt \\
        --scheme pio --manifolds sp+ob+st --seed 0 --input-shape 1,3,224,224 --out model.onnx

``--model`` is ``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None)``),
``package.module:factory`` or ``path/to/file.py:factory``; ``--num-classes`` and
``--model-kwargs '{"key": value}'`` are passed to the factory. The checkpoint is a state_dict,
or a dict holding one under ``state_dict``, ``model_state_dict`` or ``model`` (a ``module.``
prefix from DistributedDataParallel is dropped). A state_dict of a converted model (its keys
contain ``parametrizations``) is loaded into the rebuilt model converted with ``--scheme``,
``--manifolds``, ``--group-size``, ``--seed``, ``--no-renorm``, ``--include``, ``--exclude``
(these must match the training run); a state_dict of a plain model is loaded as it is and
exported without conversion. Without ``--checkpoint`` the freshly built model is converted and
exported (a smoke test of the deployment path).

Loading ``model.pt`` unpickles Python objects: only load files you trust. The checkpoint is
read with ``weights_only=True`` first.

Exit status: 0 when the file is written and verified; 1 with a one-line ``error:`` message on
stderr otherwise (nothing is written); 2 for unusable command-line arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["add_arguments", "build_model", "export_main", "run"]

PROG = "pomfx export"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``pomfx export`` (for a subcommand parser of ``pomfx``)."""
    p.description = "Fold a (converted) model, export it to ONNX and verify the file with onnxruntime."
    src = p.add_argument_group("the model (a saved model, or --model with an optional --checkpoint)")
    src.add_argument("saved", nargs="?", metavar="MODEL.pt", help="a model saved with torch.save(model)")
    src.add_argument(
        "--model",
        metavar="SPEC",
        help="architecture to rebuild: torchvision:NAME, package.module:factory or file.py:factory",
    )
    src.add_argument("--num-classes", type=int, metavar="N", help="passed to the factory as num_classes")
    src.add_argument("--model-kwargs", metavar="JSON", default="{}", help="more factory keyword arguments")
    src.add_argument("--checkpoint", metavar="CKPT.pt", help="state_dict to load into the rebuilt model")
    conv = p.add_argument_group("conversion options of the checkpoint's model (as at training)")
    conv.add_argument("--scheme", default="pio", help="pi, po or pio (default pio)")
    conv.add_argument("--manifolds", default="sp+ob+st", help="default sp+ob+st")
    conv.add_argument("--group-size", type=int, default=None)
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--no-renorm", dest="renorm", action="store_false")
    conv.add_argument("--include", action="append", metavar="GLOB", help="layers to convert (repeatable)")
    conv.add_argument("--exclude", action="append", metavar="GLOB", help="layers to skip (repeatable)")
    out = p.add_argument_group("export")
    out.add_argument(
        "--input-shape",
        action="append",
        metavar="N,C,H,W",
        help="shape of the example input, repeat for several inputs (default 1,3,224,224)",
    )
    out.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    out.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    out.add_argument(
        "--no-dynamic-batch", dest="dynamic_batch", action="store_false", help="fix the batch size"
    )
    out.add_argument("--no-verify", dest="verify", action="store_false", help="skip the onnxruntime check")
    out.add_argument(
        "--rtol", type=float, default=1e-5, help="largest relative error accepted (default 1e-5)"
    )
    out.add_argument(
        "--external-data", action="store_true", help="weights in FILE.onnx.data whatever the size"
    )
    out.add_argument("--device", default="cpu", help="torch device for the export (default cpu)")
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """Run ``pomfx export`` with ``argv`` (without the program and command names)."""
    parser = add_arguments(argparse.ArgumentParser(prog=PROG))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message
        return int(e.code or 0)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """``pomfx export`` on parsed arguments: prints the report, returns the exit status."""
    try:
        report = _run(args)
    except Exception as e:  # noqa: BLE001 - every failure is one line for the user
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _run(args: argparse.Namespace):
    import torch

    from pomfx.export import export_onnx

    if (args.saved is None) == (args.model is None):
        raise ValueError("give either a saved model file (MODEL.pt) or --model SPEC (with --checkpoint)")
    if args.saved is not None and args.checkpoint is not None:
        raise ValueError("--checkpoint goes with --model; a saved model file already holds its weights")
    shapes = [_shape(s) for s in (args.input_shape or ["1,3,224,224"])]
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {args.out!r}: directory {str(out.parent)!r} does not exist")
    device = torch.device(args.device)
    model = _load_saved(args.saved) if args.saved is not None else build_model(args)
    model = model.to(device).eval()
    inputs = tuple(torch.randn(*s, device=device) for s in shapes)
    return export_onnx(
        model,
        out,
        inputs,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        verify=args.verify,
        rtol=args.rtol,
        external_data=True if args.external_data else None,
    )


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            f"--input-shape {text!r}: expected positive integers joined by commas, e.g. 1,3,224,224"
        )
    return shape


def _load_saved(path: str):
    import torch
    from torch import nn

    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {path!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping):
        raise ValueError(
            f"{path!r} holds a state_dict, not a model: give the architecture with --model SPEC "
            f"and the file with --checkpoint {path}"
        )
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _factory(spec: str):
    if ":" not in spec:
        raise ValueError(
            f"--model {spec!r}: expected torchvision:NAME, package.module:factory or file.py:factory"
        )
    where, name = spec.rsplit(":", 1)
    if where == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"--model {spec!r}: torchvision has no model {name!r}")
        return lambda **kw: torchvision.models.get_model(name, weights=None, **kw)
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"--model {spec!r}: file {where!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {where} has no callable {name!r}")
    return fn


def build_model(args: argparse.Namespace):
    """The model of ``--model``: built, converted when the checkpoint is of a converted model
    (or when there is no checkpoint), with the checkpoint loaded."""
    import torch
    from torch import nn

    import pomfx

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs is not JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object")
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = _factory(args.model)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {args.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    state = _load_checkpoint(args.checkpoint) if args.checkpoint else None
    converted = state is None or any(
        k.startswith("parametrizations.") or ".parametrizations." in k for k in state
    )
    if converted:
        model = pomfx.convert(
            model,
            args.scheme,
            manifolds=args.manifolds,
            group_size=args.group_size,
            seed=args.seed,
            renorm=args.renorm,
            include=args.include,
            exclude=args.exclude,
            inplace=True,
        )
    if state is not None:
        with torch.no_grad():
            model.load_state_dict(state)
    return model


def _load_checkpoint(path: str) -> Mapping:
    import pickle

    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if isinstance(obj, torch.nn.Module):
        raise ValueError(
            f"{path!r} holds a whole model, not a checkpoint: pass it as MODEL.pt, without --model"
        )
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"checkpoint {path!r} holds no state_dict (a dict of tensors by parameter name)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj
