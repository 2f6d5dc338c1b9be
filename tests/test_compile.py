"""Issue 7, torch.compile: a converted model compiles with no graph break, forward and backward,
in training mode (the λ statistics hooks included) and in eval mode, and computes what the eager
model computes; training it (FGSGD steps, update_scales) recompiles nothing. FGSGD's step is not
traced: it runs eagerly under torch.compile and gives the eager result (docs/scaling.md).

Graph breaks are counted with ``torch._dynamo.utils.counters["graph_break"]``. The default tests
use the ``aot_eager`` backend (dynamo + AOTAutograd, the whole capture, without code generation:
seconds); the inductor runs (C++ code generation on CPU, about a minute) are marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import pomfx

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _model() -> nn.Module:
    """Kernel layouts (3×3 and a wide 1×3 conv), a block layout (1×1 conv), a grouped conv, a
    hidden Linear (block layout), BatchNorm; the classifier stays plain (the default)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, (1, 3), padding=(0, 1), bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )
    return pomfx.convert(model, scheme="pio")


def _breaks() -> dict:
    return dict(counters["graph_break"])


def _fresh():
    torch._dynamo.reset()
    counters.clear()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, scale: float | None = None):
    """Close to rtol relative to ``scale`` (default: the largest entry of ``b``)."""
    scale = scale or b.abs().max().item() or 1.0
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * scale), (
        f"{what}: max diff {(a - b).abs().max().item():.3g}"
    )


def _check_compiled_training(backend: str, rtol: float):
    _fresh()
    model = _model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(6, 3, 8, 8)
    opts = [pomfx.FGSGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, eager)]

    for step in range(3):
        outs = []
        for net, opt in zip((compiled, eager), opts):
            opt.zero_grad(set_to_none=True)
            out = net(x)
            out.square().mean().backward()
            outs.append(out.detach())
        _close(outs[0], outs[1], f"step {step}: compiled vs eager output", rtol)
        grads = dict(eager.named_parameters())
        top = max(g.grad.abs().max().item() for g in grads.values())  # (a bias before BN has ~0)
        for name, p in model.named_parameters():
            _close(p.grad, grads[name].grad, f"step {step}: gradient of {name}", rtol, scale=top)
        for opt in opts:
            opt.step()
        pomfx.update_scales(model)
        pomfx.update_scales(eager)
        assert _breaks() == {}, f"graph breaks in the training forward/backward: {_breaks()}"
        assert counters["stats"]["unique_graphs"] == 1, "training recompiled"

    # the λ hooks ran inside the graph: the same running statistics as eager
    buffers = dict(eager.named_buffers())
    for name, b in model.named_buffers():
        if b.is_floating_point():
            _close(b, buffers[name], f"buffer {name}", rtol)
        else:
            assert torch.equal(b, buffers[name]), name
    assert max(pomfx.constraint_error(model).values()) <= 1e-5

    model.eval()
    eager.eval()
    with torch.no_grad():
        _close(compiled(x), eager(x), "eval output", rtol)
    assert _breaks() == {}, f"graph breaks in eval mode: {_breaks()}"


def test_compiled_model_has_no_graph_breaks_and_matches_eager():
    _check_compiled_training("aot_eager", rtol=1e-5)


def test_torch_dynamo_explain_counts_zero_breaks():
    """The same count, from ``torch._dynamo.explain`` (what a user would run)."""
    _fresh()
    model = _model()
    report = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_fgsgd_step_under_torch_compile_runs_eagerly():
    """``torch.compile(opt.step)`` (or a compiled function that calls it) must not trace FGSGD:
    traced, it lost track of the constrained weights and stepped them as plain tensors, off
    their manifolds. FGSGD is already batched (one job per manifold and component shape, torch's
    foreach SGD for plain parameters), so it opts out of dynamo and runs eagerly."""
    _fresh()
    model = _model()
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = pomfx.FGSGD(eager.parameters(), lr=0.1, momentum=0.9)
    step = torch.compile(opt.step, backend="eager")
    for _ in range(3):
        for net, o, s in ((model, opt, step), (eager, ref, ref.step)):
            o.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            s()
    assert max(pomfx.constraint_error(model).values()) <= 1e-5, pomfx.constraint_error(model)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p, q), f"{name}: compiled step differs from the eager step"


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    _check_compiled_training("inductor", rtol=1e-4)


@pytest.fixture
def _exact_fp32():
    """No TF32 in cuBLAS/cuDNN: eager and inductor may pick different kernels, and TF32's
    10-bit mantissa would then differ by ~1e-3, hiding what the comparison is about."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
def test_inductor_on_cuda_matches_eager(_exact_fp32):
    _fresh()
    model = _model().cuda()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(6, 3, 8, 8, device="cuda")
    out = compiled(x)
    out.square().mean().backward()
    ref = eager(x)
    ref.square().mean().backward()
    assert _breaks() == {}, _breaks()
    _close(out.detach(), ref.detach(), "cuda output", rtol=1e-4)
    grads = dict(eager.named_parameters())
    top = max(g.grad.abs().max().item() for g in grads.values())
    for name, p in model.named_parameters():
        _close(p.grad, grads[name].grad, f"cuda gradient of {name}", rtol=1e-4, scale=top)
