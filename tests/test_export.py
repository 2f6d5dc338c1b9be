"""pomfx.export_onnx and `pomfx export` (issue 5): exact, verified, and nothing half-written.

The default run exports resnet18 and mobilenet_v3_small (converted and plain) and a few tiny
models; the whole torchvision classification zoo runs with ``-m zoo`` (make test-zoo).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import pomfx
import pomfx.export as export_mod
from pomfx.export import OnnxExportError, export_onnx, ort_providers, rel_error
from pomfx.export_cli import add_arguments, build_model, export_main

CPU = ["CPUExecutionProvider"]


def _ort(path, *xs: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=CPU)
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})


def _torch(model: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*xs)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.point(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


class DataDependent(Tiny):
    """A Python `if` on a tensor's value: no exporter can capture it."""

    def forward(self, x):
        y = super().forward(x)
        if x.sum() > 0:
            return y
        return -y


def tiny(seed: int = 0) -> Tiny:
    """Factory for the CLI's file.py:factory form."""
    torch.manual_seed(seed)
    return Tiny()


@pytest.fixture(scope="module")
def tiny_converted() -> Tiny:
    return pomfx.convert(tiny(), include=["conv", "point", "fc"]).eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).eval()
    return plain, pomfx.convert(plain).eval()


@pytest.fixture(scope="module")
def resnet18_export(resnet18, tmp_path_factory):
    """The converted resnet18 exported once from a batch-1 example (dynamic batch)."""
    _, converted = resnet18
    before = {k: v.clone() for k, v in converted.state_dict().items() if isinstance(v, torch.Tensor)}
    folder = tmp_path_factory.mktemp("resnet18")
    report = export_onnx(converted, folder / "resnet18.onnx", torch.randn(1, 3, 64, 64))
    return folder, report, before


# -- the must-shows ------------------------------------------------------------------------------
def test_resnet18_batch_1_and_7_from_one_file(resnet18, resnet18_export):
    _, converted = resnet18
    folder, report, _ = resnet18_export
    for batch in (1, 7):
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        (got,) = _ort(report.path, x)
        assert got.shape == (batch, 10)
        assert rel_error([got], [_torch(converted, x)])[1] <= 1e-5


def test_resnet18_report_and_files(resnet18, resnet18_export):
    _, converted = resnet18
    folder, report, before = resnet18_export
    assert os.listdir(folder) == ["resnet18.onnx"]  # one file, no temporary left
    assert report.exporter == "dynamo" and report.external_data is None
    assert report.max_rel_error <= 1e-5 and report.max_abs_error >= 0
    assert report.batch_sizes == [1, 2]
    assert report.file_size == os.path.getsize(report.path)
    proto = onnx.load(report.path)
    assert report.nodes == len(proto.graph.node) == sum(report.op_counts.values())
    assert report.opset >= 18
    if not torch.cuda.is_available():
        assert report.providers == CPU
    assert "max rel error" in str(report) and report.to_dict()["nodes"] == report.nodes
    # export changed nothing in the user's model
    after = converted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert converted.conv1.parametrizations.weight[0] is not None and not converted.training


def test_resnet18_graph_equals_the_plain_export(resnet18, resnet18_export, tmp_path):
    plain, _ = resnet18
    _, report, _ = resnet18_export
    plain_report = export_onnx(plain, tmp_path / "plain.onnx", torch.randn(1, 3, 64, 64))
    assert report.op_counts == plain_report.op_counts  # no leftover normalization math
    assert report.nodes == plain_report.nodes


def _zoo_check(name: str, folder) -> None:
    """Convert, fold, export and verify one torchvision model; its graph equals the plain one's."""
    torch.manual_seed(0)
    plain = torchvision.models.get_model(name, weights=None).eval()
    for m in plain.modules():  # ViT's zero-initialised head would make the check compare zeros
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.01)
    try:
        converted = pomfx.convert(plain)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{name} does not convert: {e}")
    if not pomfx.constraint_error(converted):
        pytest.skip(f"{name}: nothing to convert")
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
    report = export_onnx(converted.eval(), folder / f"{name}.onnx", x)
    plain_report = export_onnx(plain, folder / f"{name}_plain.onnx", x)
    assert report.max_rel_error <= 1e-5
    assert report.op_counts == plain_report.op_counts


def test_zoo_fast_mobilenet_v3_small(tmp_path):
    _zoo_check("mobilenet_v3_small", tmp_path)


ZOO = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ZOO)
def test_zoo(name, tmp_path):
    _zoo_check(name, tmp_path)


# -- bad input: a clear error and no file ---------------------------------------------------------
def test_missing_directory(tiny_converted, tmp_path):
    with pytest.raises(FileNotFoundError, match="directory .*missing.* does not exist"):
        export_onnx(tiny_converted, tmp_path / "missing" / "m.onnx", torch.randn(2, 3, 16, 16))
    assert os.listdir(tmp_path) == []


def test_wrong_input_shape(resnet18, tmp_path):
    _, converted = resnet18
    with pytest.raises(ValueError, match=r"does not run on example inputs of shape \(1, 3, 8\)"):
        export_onnx(converted, tmp_path / "m.onnx", torch.randn(1, 3, 8))
    assert os.listdir(tmp_path) == []


def test_untraceable_control_flow(tmp_path):
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        model = pomfx.convert(DataDependent(), include=["conv", "point"]).eval()
    with pytest.warns(UserWarning, match="dynamo exporter failed"):
        with pytest.raises(OnnxExportError, match="data-dependent control flow"):
            export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 16, 16))
    assert os.listdir(tmp_path) == []


def test_failed_verification_keeps_the_old_file(tiny_converted, tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"old")
    monkeypatch.setattr(export_mod, "rel_error", lambda got, exp: (1.0, 0.5))
    monkeypatch.setattr(export_mod, "_export_dynamo", export_mod._export_torchscript)  # fast
    with pytest.raises(OnnxExportError, match="max rel error 0.5 > rtol 1e-05"):
        export_onnx(tiny_converted, tmp_path / "m.onnx", torch.randn(2, 3, 16, 16))
    assert os.listdir(tmp_path) == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"old"


def test_interrupted_export_leaves_nothing(tiny_converted, tmp_path, monkeypatch):
    def half_written(model, args, path, *rest):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_export_dynamo", half_written)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_converted, tmp_path / "m.onnx", torch.randn(2, 3, 16, 16))
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tiny_converted, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny_converted, tmp_path / "m.onnx", x, opset=3)
    with pytest.raises(IsADirectoryError):
        export_onnx(tiny_converted, tmp_path, x)
    with pytest.raises(ValueError, match="tensor or a tuple of tensors"):
        export_onnx(tiny_converted, tmp_path / "m.onnx", [x, "mask"])
    with pytest.raises(ValueError, match="dim 0 of every input"):
        export_onnx(tiny_converted, tmp_path / "m.onnx", (x, torch.randn(3, 1)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_onnx(lambda x: x, tmp_path / "m.onnx", x)
    assert os.listdir(tmp_path) == []


# -- options, fallback, providers -----------------------------------------------------------------
def test_torchscript_fallback(tiny_converted, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(export_mod, "_export_dynamo", broken)
    with pytest.warns(UserWarning, match=r"dynamo exporter failed \(RuntimeError: boom\)"):
        report = export_onnx(tiny_converted, tmp_path / "m.onnx", torch.randn(2, 3, 16, 16))
    assert report.exporter == "torchscript" and report.max_rel_error <= 1e-5
    assert report.batch_sizes == [2, 3]
    x = torch.randn(5, 3, 16, 16)
    assert rel_error(_ort(report.path, x), [_torch(tiny_converted, x)])[1] <= 1e-5
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_opset_static_batch_and_external_data(tiny_converted, tmp_path):
    report = export_onnx(
        tiny_converted,
        tmp_path / "m.onnx",
        torch.randn(2, 3, 16, 16),
        opset=18,
        dynamic_batch=False,
        external_data=True,
    )
    assert report.opset == 18 and report.batch_sizes == [2]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert report.external_data == str(tmp_path / "m.onnx.data")
    assert report.file_size == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    (dim,) = onnx.load(report.path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[:1]
    assert dim.dim_value == 2  # the batch is fixed
    x = torch.randn(2, 3, 16, 16)
    assert rel_error(_ort(report.path, x), [_torch(tiny_converted, x)])[1] <= 1e-5


def test_ort_providers_need_a_usable_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ort_providers() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *CPU])
    assert ort_providers() == ["CUDAExecutionProvider", *CPU]


def test_rel_error_definition():
    """Per output max|got - expected| / max|expected|; the largest over the outputs."""
    a, r = rel_error(
        [np.array([1.5, -4.0]), np.array([0.0, 2.0])], [torch.tensor([1.0, -4.0]), torch.tensor([0.0, 1.0])]
    )
    assert (a, r) == (1.0, 1.0)
    assert rel_error([np.array([1.5, -4.0])], [torch.tensor([1.0, -4.0])]) == (0.5, 0.125)
    assert np.isnan(rel_error([np.array([np.nan, 1.0])], [torch.tensor([1.0, 1.0])])[1])
    with pytest.raises(OnnxExportError, match="shape"):
        rel_error([np.zeros(3)], [torch.zeros(4)])


# -- pomfx export ---------------------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pomfx export: error: "), err
    return err[0]


def test_cli_saved_model(tiny_converted, tmp_path, capsys):
    torch.save(tiny_converted, tmp_path / "model.pt")
    out = tmp_path / "model.onnx"
    assert export_main([str(tmp_path / "model.pt"), "--input-shape", "2,3,16,16", "--out", str(out)]) == 0
    assert "max rel error" in capsys.readouterr().out
    x = torch.randn(3, 3, 16, 16)
    assert rel_error(_ort(out, x), [_torch(tiny_converted, x)])[1] <= 1e-5


def test_cli_torchvision_checkpoint(resnet18, tmp_path, capsys):
    _, converted = resnet18
    torch.save({"epoch": 3, "state_dict": converted.state_dict()}, tmp_path / "ckpt.pt")
    out = tmp_path / "r18.onnx"
    argv = [
        "--model",
        "torchvision:resnet18",
        "--num-classes",
        "10",
        "--checkpoint",
        str(tmp_path / "ckpt.pt"),
    ]
    assert export_main([*argv, "--input-shape", "1,3,64,64", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_rel_error"] <= 1e-5 and report["path"] == str(out)
    x = torch.randn(2, 3, 64, 64)
    assert rel_error(_ort(out, x), [_torch(converted, x)])[1] <= 1e-5  # the checkpoint's weights


def test_cli_model_file_and_checkpoints(tiny_converted, tmp_path, capsys):
    parser = add_arguments(argparse.ArgumentParser())
    model_args = ["--model", f"{__file__}:tiny", "--out", str(tmp_path / "m.onnx")]
    torch.save(tiny().state_dict(), tmp_path / "plain.pt")
    model = build_model(parser.parse_args([*model_args, "--checkpoint", str(tmp_path / "plain.pt")]))
    assert not pomfx.constraint_error(model)  # a plain checkpoint is loaded as it is, not converted
    torch.save(tiny_converted.state_dict(), tmp_path / "conv.pt")
    converted_args = [*model_args, "--checkpoint", str(tmp_path / "conv.pt")]
    converted_args += ["--include", "conv", "--include", "point", "--include", "fc"]
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(
        _torch(build_model(parser.parse_args(converted_args)).eval(), x), _torch(tiny_converted, x)
    )
    # options other than the training run's: a clear error, no file
    assert export_main([*converted_args, "--seed", "1"]) == 1
    assert "layout of 'conv' differs" in _one_line_error(capsys)
    assert export_main([*model_args, "--checkpoint", str(tmp_path / "conv.pt")]) == 1  # fc not included
    assert "Unexpected key(s)" in _one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["conv.pt", "plain.pt"]


@pytest.mark.parametrize(
    "argv",
    [
        ["{saved}", "--out", "{dir}/missing/m.onnx"],
        ["{saved}", "--input-shape", "2,3", "--out", "{dir}/m.onnx"],
        ["{saved}", "--input-shape", "2,x,3", "--out", "{dir}/m.onnx"],
        ["{saved}", "--model", "torchvision:resnet18", "--out", "{dir}/m.onnx"],
        ["{state}", "--out", "{dir}/m.onnx"],
        ["{dir}/nothing.pt", "--out", "{dir}/m.onnx"],
        ["--model", "torchvision:resnet_nope", "--out", "{dir}/m.onnx"],
        ["--model", "resnet18", "--out", "{dir}/m.onnx"],
        ["--out", "{dir}/m.onnx"],
    ],
)
def test_cli_bad_input(argv, tiny_converted, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("cli")
    saved, state = folder / "model.pt", folder / "state.pt"
    torch.save(tiny_converted, saved)
    torch.save(tiny_converted.state_dict(), state)
    argv = [a.format(saved=saved, state=state, dir=folder) for a in argv]
    assert export_main(argv) == 1
    _one_line_error(capsys)
    assert sorted(os.listdir(folder)) == ["model.pt", "state.pt"]


def test_cli_usage_error(capsys):
    assert export_main(["model.pt"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("enable", ["new api", "legacy"])
def test_reference_math_turns_tf32_off_through_the_users_api(enable):
    """The export's torch reference runs without TF32 whichever of torch's APIs enabled it, and
    leaves the setting readable as the user set it (torch refuses reads once both APIs wrote)."""
    import subprocess
    import sys

    code = f"""
import torch, warnings
warnings.simplefilter("ignore")
from pomfx.export import _exact_math
m = torch.backends.cuda.matmul
if {enable!r} == "new api":
    m.fp32_precision = "tf32"
else:
    m.allow_tf32 = True
with _exact_math():
    assert m.fp32_precision == "ieee" and not torch.backends.cudnn.allow_tf32
assert m.fp32_precision == "tf32" and torch.backends.cudnn.allow_tf32
if {enable!r} == "legacy":
    assert m.allow_tf32
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
