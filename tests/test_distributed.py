"""Issue 7, DDP and FSDP: two processes under torchrun (gloo on CPU; NCCL on GPUs when there are
enough of them), launched once per module; see tests/ddp_worker.py for what each rank does.

- every rank builds the same layout, whatever its torch seed;
- DDP + FGSGD: after the steps, the parameters are identical on all ranks and equal (to fp
  tolerance) to one process training on the global batch;
- ``update_scales`` all-reduces λ: R is identical on all ranks;
- checkpoint mid-epoch (rank 0 saves), reload on every rank, continue: bitwise equal to the
  uninterrupted run, parameters, buffers and optimizer state;
- FSDP2 ``fully_shard``: FGSGD refuses the sharded weights with a clear TypeError.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pomfx

HERE = Path(__file__).resolve().parent
WORLD = 2

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def _worker_module():
    spec = importlib.util.spec_from_file_location("pomfx_ddp_worker", HERE / "ddp_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def launch(out_dir: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run the worker on WORLD processes with torchrun; the per-rank result dicts."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        str(HERE / "ddp_worker.py"), str(out_dir), *args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # the workers dump their stacks before this
        pytest.fail(f"torchrun ran past {timeout} s:\n{e.stdout}\n{e.stderr}")
    files = [out_dir / f"rank{r}.pt" for r in range(WORLD)]
    if proc.returncode != 0 or not all(f.is_file() for f in files):
        pytest.fail(
            f"torchrun failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp"))


def _no_error(ranks, check):
    for r in ranks:
        assert check not in r["errors"], f"rank {r['rank']}, check {check!r}:\n{r['errors'][check]}"


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), (
                f"{what}: {k} differs (max {(a[k] - b[k]).abs().max().item():.3g})"
            )
        else:
            assert a[k] == b[k], f"{what}: {k} differs"


def test_every_rank_builds_the_same_layout(ranks):
    _no_error(ranks, "ddp")
    assert ranks[0]["layouts"], "nothing was converted"
    for r in ranks[1:]:
        assert r["layouts"] == ranks[0]["layouts"]


def test_ddp_matches_one_process_on_the_global_batch(ranks, one_thread):
    _no_error(ranks, "ddp")
    for r in ranks[1:]:
        _assert_same(r["params"], ranks[0]["params"], f"rank {r['rank']} vs rank 0 after DDP steps")
    assert max(ranks[0]["constraint_error"].values()) <= 1e-5

    w = _worker_module()
    model = w.build_model()
    opt = pomfx.FGSGD(model.parameters(), **w.HP)
    w.train_steps(model, opt, w.STEPS, "cpu")  # one process, the whole global batch
    for name, p in model.named_parameters():
        ddp = ranks[0]["params"][name]
        assert torch.allclose(ddp, p.detach(), rtol=1e-5, atol=1e-6), (
            f"{name}: DDP vs single process, max diff {(ddp - p.detach()).abs().max().item():.3g}"
        )


def test_update_scales_all_reduces_lambda(ranks):
    _no_error(ranks, "ddp")
    assert all(r["committed"] > 0 for r in ranks)
    mean = {
        k: sum(r["running_var_before"][k] for r in ranks) / len(ranks) for k in ranks[0]["running_var_before"]
    }
    differs = any(
        not torch.equal(ranks[0]["running_var_before"][k], ranks[1]["running_var_before"][k]) for k in mean
    )
    assert differs, "the ranks saw the same statistics: the test would not show the all-reduce"
    for r in ranks:
        for k in mean:
            torch.testing.assert_close(r["running_var_after"][k], mean[k], rtol=1e-6, atol=0)
    for r in ranks[1:]:
        _assert_same(r["scale_after"], ranks[0]["scale_after"], f"R on rank {r['rank']} vs rank 0")
    assert any(not torch.equal(ranks[0]["scale_after"][k], ranks[0]["scale_before"][k]) for k in mean)


def test_ddp_checkpoint_resume_is_bitwise(ranks):
    _no_error(ranks, "resume")
    for r in ranks:
        _assert_same(r["resumed"], r["straight"], f"rank {r['rank']}: resumed vs uninterrupted state_dict")
        _assert_same(
            r["resumed_opt"], r["straight_opt"], f"rank {r['rank']}: resumed vs uninterrupted optimizer"
        )
    _assert_same(ranks[1]["resumed"], ranks[0]["resumed"], "rank 1 vs rank 0 after resume")


def test_fsdp_fully_shard_is_refused_with_a_clear_error(ranks):
    """A Stiefel (or sphere, oblique) component needs its whole block for its retraction; FSDP
    shards the flat ω across ranks, and FGSGD would step each shard as a Euclidean tensor."""
    _no_error(ranks, "fsdp")
    for r in ranks:
        assert "DTensor" in r["fsdp_param_types"]
        err = r["fsdp_error"]
        assert err is not None, (
            "FGSGD accepted FSDP-sharded constrained weights and stepped them as plain tensors "
            "(the weights leave their manifolds); it must raise a TypeError"
        )
        _assert_refusal(err)
        for key in ("fsdp1_error_orig0", "fsdp1_error_orig1"):  # FSDP1: FlatParameter, and views
            assert r[key] is not None, f"FGSGD accepted FSDP1-sharded weights ({key})"
            _assert_refusal(r[key])


def _assert_refusal(err):
    kind, msg = err
    assert kind == "TypeError", err
    for word in ("FSDP", "DistributedDataParallel", "Stiefel"):
        assert word in msg, f"the error should mention {word!r}: {msg}"


@pytest.mark.slow
def test_ddp_around_a_compiled_model(tmp_path):
    """``DistributedDataParallel(torch.compile(model))``: no graph break, same training as one
    process. (``torch.compile(ddp)`` also trains correctly, but graph-breaks inside torch's DDP
    wrapper itself and splits the graph at DDP's buckets.)"""
    ranks = launch(tmp_path, "--checks", "compile")
    _no_error(ranks, "compile")
    for r in ranks:
        assert r["compile_graph_breaks"] == {}, r["compile_graph_breaks"]
    _assert_same(ranks[1]["compile_params"], ranks[0]["compile_params"], "rank 1 vs rank 0 (compiled)")
    w = _worker_module()
    model = w.build_model()
    opt = pomfx.FGSGD(model.parameters(), **w.HP)
    w.train_steps(model, opt, w.STEPS, "cpu")
    for name, p in model.named_parameters():
        assert torch.allclose(ranks[0]["compile_params"][name], p.detach(), rtol=1e-5, atol=1e-6), name


@pytest.mark.cuda
def test_ddp_on_cuda(tmp_path):
    """Same checks on GPUs: NCCL with a GPU per rank when there are two, else gloo on cuda:0."""
    ranks = launch(tmp_path, "--device", "cuda", "--checks", "ddp,resume")
    _no_error(ranks, "ddp")
    _no_error(ranks, "resume")
    assert all(r["device"].startswith("cuda") for r in ranks)
    for r in ranks[1:]:
        _assert_same(r["params"], ranks[0]["params"], "rank 1 vs rank 0 after DDP steps (cuda)")
        _assert_same(r["scale_after"], ranks[0]["scale_after"], "R on rank 1 vs rank 0 (cuda)")
    for r in ranks:
        _assert_same(r["resumed"], r["straight"], f"rank {r['rank']}: resumed vs uninterrupted (cuda)")
    assert max(ranks[0]["constraint_error"].values()) <= 1e-5


# -- examples/train_imagefolder.py ---------------------------------------------------------------
EXAMPLE = HERE.parent / "examples" / "train_imagefolder.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("pomfx_train_imagefolder", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_imagefolder(root: Path, classes=("cat", "dog"), train=8, val=2, size=32) -> Path:
    """A tiny ImageFolder of random PNGs: root/train/<class>/*.png and root/val/<class>/*.png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes if n else ():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


EXAMPLE_ARGS = [
    "--model", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "4", "--workers", "0",
    "--lr", "0.01", "--schedule", "constant",
]  # fmt: skip


def _model_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_train_imagefolder_two_epochs_then_resume_a_third(tmp_path, monkeypatch, one_thread):
    """2 epochs, then ``--resume`` for a 3rd (and the ONNX export): the same weights, bit for bit,
    as 3 epochs in one go; every epoch on the manifolds; the checkpoint written atomically."""
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ex = _example_module()
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "run"

    first = ex.main([str(data), *EXAMPLE_ARGS, "--epochs", "2", "--out", str(out), "--no-export"])
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["classes"] == ["cat", "dog"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "summary.json"]  # no temp left

    resumed = ex.main([str(data), *EXAMPLE_ARGS, "--epochs", "3", "--out", str(out), "--resume"])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]
    assert all(h["constraint_error"] <= 1e-5 for h in resumed["history"]), resumed["history"]
    assert (out / "model.onnx").is_file() and resumed["onnx_max_rel_error"] <= 1e-5

    straight = ex.main(
        [str(data), *EXAMPLE_ARGS, "--epochs", "3", "--out", str(tmp_path / "straight"), "--no-export"]
    )
    assert straight["history"] == resumed["history"]
    _assert_same(_model_state(out / "checkpoint.pt"), _model_state(tmp_path / "straight" / "checkpoint.pt"),
                 "resumed vs uninterrupted example run")  # fmt: skip


def test_train_imagefolder_refuses_a_mismatched_resume(tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ex = _example_module()
    data = make_imagefolder(tmp_path / "data", train=2, val=0)
    out = tmp_path / "run"
    ex.main([str(data), *EXAMPLE_ARGS, "--epochs", "1", "--out", str(out), "--no-export"])
    with pytest.raises(SystemExit, match="scheme"):
        ex.main([str(data), *EXAMPLE_ARGS, "--scheme", "po", "--epochs", "2", "--out", str(out), "--resume"])


@pytest.mark.slow
def test_train_imagefolder_under_torchrun(tmp_path):
    """The example on 2 processes (gloo on CPU): 1 epoch, then --resume for a 2nd; rank 0 writes."""
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    base = [*torchrun, str(EXAMPLE), str(data), *EXAMPLE_ARGS, "--out", str(out), "--device", "cpu"]
    for extra in (["--epochs", "1", "--no-export"], ["--epochs", "2", "--resume"]):
        proc = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["rng"]) == WORLD
    assert "resumed from" in proc.stdout
    assert (out / "model.onnx").is_file()
