"""The ``pomfx`` command line (run in-process through ``pomfx.cli.main``) and the digits demo."""

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from pomfx.cli import Progress, main

SUBCOMMANDS = ("demo", "plan", "convert", "report", "bench")  # export: tested with pomfx.export_cli


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *words):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


# -- help and errors -----------------------------------------------------------------------------
def test_top_level_help_lists_every_command(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for cmd in (*SUBCOMMANDS, "export"):
        assert cmd in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(capsys, cmd):
    rc, out, _ = run(capsys, cmd, "--help")
    assert rc == 0 and "usage" in out.lower() and cmd in out


def test_no_command_prints_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2 and "COMMAND" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["frobnicate"], ["invalid choice"]),
        (["plan"], ["--model"]),
        (["plan", "--model", "torchvision:no_such_net"], ["no_such_net"]),
        (["plan", "--model", "/nonexistent/model.pt"], ["no such model file"]),
        (["plan", "--model", "torchvision:resnet18", "--scheme", "pp"], ["pp"]),
        (["plan", "--model", "torchvision:resnet18", "--manifolds", "sp+xx"], ["xx", "valid"]),
        (["plan", "--model", "torchvision:resnet18", "--group-size", "0"], ["positive integer"]),
        (["plan", "--model", "torchvision:resnet18", "--bogus"], ["--bogus"]),
        (["demo", "--methods", "plain,nope"], ["nope"]),
        (["demo", "--epochs", "0"], [">= 1"]),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, argv, words):
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, *words)


def test_state_dict_file_is_refused(capsys, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(small_model().state_dict(), path)
    rc, _, err = run(capsys, "report", "--model", str(path))
    assert_one_line_error(rc, err, "state_dict")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    rc, _, err = run(capsys, "plan", "--model", str(tmp_path / "junk.pt"))
    assert_one_line_error(rc, err, "torch.load")


# -- plan, convert, report -----------------------------------------------------------------------
def test_plan_torchvision(capsys):
    rc, out, _ = run(capsys, "plan", "--model", "torchvision:resnet18", "--manifolds", "sp+st", "--seed", "3")
    assert rc == 0 and "layer1.0.conv1" in out and "skipped" in out and "fc" in out
    rc, out, _ = run(capsys, "plan", "--model", "torchvision:resnet18", "--json", "--group-size", "8")
    d = json.loads(out)
    assert rc == 0 and any(r["convert"] and r["group_size"] == 8 for r in d["layers"])


def test_convert_then_report(capsys, tmp_path):
    src, dst = tmp_path / "plain.pt", tmp_path / "conv.pt"
    torch.save(small_model(), src)
    rc, out, _ = run(
        capsys, "convert", "--model", str(src), "-o", str(dst), "--manifolds", "st", "--scheme", "po"
    )
    assert rc == 0 and dst.exists() and "saved to" in out
    rc, _, err = run(capsys, "convert", "--model", str(dst), "-o", str(tmp_path / "again.pt"))
    assert_one_line_error(rc, err, "already converted")
    rc, out, _ = run(capsys, "report", "--model", str(dst), "--n-samples", "1000")
    assert (
        rc == 0
        and "residual" in out
        and "st:" in out
        and "Bartlett" in out
        and "not converted" not in out.split("\n")[0]
    )
    rc, out, _ = run(capsys, "report", "--model", str(dst), "--json", "--n-samples", "1000")
    d = json.loads(out)
    assert d["report"]["max_residual"] <= 1e-5 and all(
        math.isfinite(v) for v in d["bounds"]["log10"].values()
    )
    assert all(layer["scheme"] == "po" for layer in d["report"]["layers"])


def test_report_converts_a_plain_model_first(capsys, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_model(), path)
    rc, out, _ = run(capsys, "report", "--model", str(path), "--scheme", "pi")
    assert rc == 0 and "is not converted: converted now with scheme=pi" in out and "not converted: 7" in out


def test_bench_builtin(capsys):
    rc, out, err = run(capsys, "bench", "--builtin", "--steps", "5", "--threads", "1")
    assert rc == 0 and "ratio" in out and "bench [" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "pomfx.cli", "plan", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--group-size" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "pomfx.cli", "plan", "--model", "x.pt"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- progress bar ------------------------------------------------------------------------------
class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar():
    s = io.StringIO()  # not a terminal: a line at most every few seconds and one at the end
    with Progress(4, "work", stream=s, every=3600) as bar:
        for _ in range(4):
            bar.update()
    lines = s.getvalue().strip().splitlines()
    assert lines[-1].startswith("work [########################] 4/4")
    assert len(lines) == 1
    t = _TTY()
    with Progress(3, "tty", stream=t) as bar:
        bar.update(3)
    assert "\r" in t.getvalue() and t.getvalue().endswith("\n") and "3/3" in t.getvalue()
    q = io.StringIO()
    with Progress(3, "quiet", stream=q, enabled=False) as bar:
        bar.update()
    assert q.getvalue() == ""


# -- the demo ----------------------------------------------------------------------------------
def test_demo_tiny(capsys, tmp_path):
    """1 seed, 2 epochs, in-process: the table, the bounds side by side, the PNG, the JSON, ONNX."""
    rc, out, _ = run(
        capsys,
        "demo",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--methods",
        "plain,pomfx",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
        "--docs",
        str(tmp_path / "docs"),
    )
    assert rc == 0, out
    assert (
        "plain SGD" in out
        and "pomfx pio sp+ob+st + FGSGD (default)" in out
        and "N15 (F)" in out
        and "B17 per unit" in out
    )
    assert "per-layer norms" in out and "verified" in out
    assert (tmp_path / "digits_demo.png").stat().st_size > 10_000
    assert (tmp_path / "digits_pomfx.onnx").exists() and (tmp_path / "digits_plain.onnx").exists()
    rec = json.loads((tmp_path / "digits_demo.json").read_text())
    for m in ("plain", "pomfx"):
        s = rec["summary"][m]
        assert 0 <= s["test_error_mean"] < 50 and all(math.isfinite(v) for v in s["bounds_log10"].values())
    run0 = rec["runs"][1]
    assert len(run0["history"]["test_error"]) == 3 and len(run0["history"]["spectral"]) == 3
    md = (tmp_path / "docs" / "demo.md").read_text()
    assert "demo.png" in md and "N15 (F)" in md and (tmp_path / "docs" / "demo.png").exists()


@pytest.mark.slow
def test_demo_full(capsys, tmp_path):
    """``make demo``: 3 seeds × 12 epochs × 5 methods; pomfx's default within one std of plain SGD."""
    rc, out, _ = run(capsys, "demo", "--out", str(tmp_path), "--no-progress")
    assert rc == 0, out
    rec = json.loads((tmp_path / "digits_demo.json").read_text())["summary"]
    plain, pom = rec["plain"], rec["pomfx"]
    assert pom["test_error_mean"] <= plain["test_error_mean"] + plain["test_error_std"]
    for s in rec.values():
        assert all(math.isfinite(v) for v in s["bounds_log10"].values())
    assert (tmp_path / "digits_demo.png").exists() and (tmp_path / "digits_pomfx.onnx").exists()
