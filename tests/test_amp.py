"""Issue 7, mixed precision: autocast (bf16 on CPU; fp16 with GradScaler and bf16 on CUDA) trains
a converted model without leaving the manifolds. Under autocast the layers compute in low
precision, but ω (the ComponentParameter), its gradient and FGSGD's retraction stay fp32, so the
constraint error stays at fp32 rounding level. GradScaler: unscale, inf check and a skipped step
(nothing moves) work with FGSGD as with torch's SGD.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pomfx
from pomfx.parametrization import ComponentParameter

STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    return pomfx.convert(model, scheme="pio")


def _data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    return x.to(device), y.to(device)


def _train(device: str, dtype: torch.dtype, scaler: torch.amp.GradScaler | None = None):
    model = _model().to(device)
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = _data(device)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
        assert out.dtype == dtype  # autocast is really on
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if step % 10 == 9:
            pomfx.update_scales(model)
    omegas = [p for p in model.parameters() if isinstance(p, ComponentParameter)]
    assert omegas and all(p.dtype == torch.float32 for p in omegas), "ω must stay fp32 under autocast"
    errors = pomfx.constraint_error(model)
    assert max(errors.values()) <= 1e-5, errors
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-5:]) / 5 < losses[0], f"no training progress: {losses}"
    return model, losses


def test_autocast_bf16_on_cpu_stays_on_the_manifolds():
    _train("cpu", torch.bfloat16)


def test_grad_scaler_skips_a_non_finite_step_and_trains():
    """GradScaler with FGSGD (on CPU, fp32 here: the scaler's logic is the same): an inf in a
    constrained gradient makes the scaler skip the step (nothing changes, momentum included)
    and halve its scale; the next steps train on the manifolds."""
    model = _model()
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _data()
    omega = next(p for p in model.parameters() if isinstance(p, ComponentParameter))

    def step(poison: bool):
        opt.zero_grad(set_to_none=True)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if poison:
            omega.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()

    step(False)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    momentum = opt.state[omega]["momentum_buffer"].clone()
    scale = scaler.get_scale()
    step(True)
    assert scaler.get_scale() == scale / 2
    for k, v in model.state_dict().items():
        if torch.is_tensor(v) and v.is_floating_point() and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    assert torch.equal(opt.state[omega]["momentum_buffer"], momentum)
    for _ in range(5):
        step(False)
    assert not torch.equal(omega.detach(), before[_omega_key(model, omega)])
    assert max(pomfx.constraint_error(model).values()) <= 1e-5


def _omega_key(model, p) -> str:
    return next(k for k, v in model.named_parameters() if v is p)


@pytest.mark.cuda
def test_autocast_fp16_with_grad_scaler_on_cuda():
    _train("cuda", torch.float16, torch.amp.GradScaler("cuda"))


@pytest.mark.cuda
def test_autocast_bf16_on_cuda():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _train("cuda", torch.bfloat16)
