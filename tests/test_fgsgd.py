"""FG-SGD (pomfx.optim): the step against a direct reference, the step-size rule, torch SGD
semantics for plain parameters, robustness (non-finite gradients, drift, low precision) and
state (state_dict, resume bit for bit, schedulers, GradScaler, closures)."""

from __future__ import annotations

import collections
import copy
import io
import itertools
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pomfx
from pomfx import fused, fused_gpu
from pomfx import manifolds as M
from pomfx.block_job import BlockJob
from pomfx.parametrization import ComponentParameter
from pomfx.renorm import poms


# -- helpers ------------------------------------------------------------------------------------
def small_net(manifolds="sp+ob+st", seed=0, dtype=torch.float32, everything=True):
    """Convs with 3×3, wide 1×5 and 1×1 kernels, BN, and linears: kernel and block layouts."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, (1, 5), padding=(0, 2)), nn.ReLU(),
        nn.Conv2d(16, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 5),
    )  # fmt: skip
    m = m.to(dtype)
    include = [nn.Conv2d, nn.Linear] if everything else None
    return pomfx.convert(m, scheme="pio", manifolds=manifolds, seed=seed, include=include)


def large_kernel_net(manifolds="sp+ob+st", seed=0, dtype=torch.float32, everything=True):
    """5×5 and 7×7 kernels, too large for the unrolled kernels (``fused.kernel_blocks``): convs
    whose groups hold several components, a depthwise one (every component its own group)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.ReLU(),
        nn.Conv2d(8, 6, 7, padding=3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 4),
    )  # fmt: skip
    m = m.to(dtype)
    include = [nn.Conv2d, nn.Linear] if everything else None
    return pomfx.convert(m, scheme="pio", manifolds=manifolds, seed=seed, include=include)


NETS = {"small": small_net, "large-kernels": large_kernel_net}


def components(model):
    """{(layer, bucket index): (count, A, B) components} of every converted layer."""
    out = {}
    for name, mod, t, pom in poms(model):
        omega = mod.parametrizations[t].original
        for i, (b, x) in enumerate(pom.buckets(omega.detach())):
            out[name, i] = (b, x.clone())
    return out


def omegas(model):
    return [p for p in model.parameters() if isinstance(p, ComponentParameter)]


def plain_params(model):
    return [p for p in model.parameters() if not isinstance(p, ComponentParameter)]


def reference_step(model, state, lr, mu, damp, wd, nesterov, maximize, radius=0.2):
    """FG-SGD written out bucket by bucket with pomfx.manifolds, in float64."""
    out = {}
    for name, mod, t, pom in poms(model):
        p = mod.parametrizations[t].original
        buf = state.get(p, {}).get("momentum_buffer")
        shape = pom.layout.weight_shape  # 1/R² of every weight element, in storage order
        r2 = pom.scale.square().reciprocal().double()[..., None]
        s = pom._stored(r2.expand(*shape[:2], math.prod(shape[2:])).reshape(shape))
        xs, gs, ss = (dict(pom.buckets(t_.double())) for t_ in (p.data, p.grad, s))
        vs = dict(pom.buckets(buf.double())) if buf is not None else {}
        for i, bk in enumerate(pom.layout.buckets):
            x, man = xs[bk], M.get(bk.manifold)
            d = man.proj_tangent(x, ss[bk] * gs[bk] * (-1.0 if maximize else 1.0))
            if bk.manifold == "euc" and wd:
                d = d + wd * x
            v = None
            if mu:
                v = d.clone() if buf is None else mu * vs[bk] + (1 - damp) * d
            u = (d + mu * v if nesterov else v) if mu else d
            sizes = torch.tensor(bk.group_sizes)
            gid = torch.arange(len(sizes)).repeat_interleave(sizes)
            f = torch.ones(x.shape[0], dtype=torch.float64)
            if bk.manifold != "euc":
                per = 1.0 if bk.manifold == "sp" else float(bk.cols)
                qg = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, gid, (u * u).sum((1, 2)))
                f = (radius * (sizes * per).double().sqrt() / (lr * qg.sqrt())).clamp(max=1)[gid]
            xn = man.retract(x, -lr * f.view(-1, 1, 1) * u)
            out[name, i] = (xn, man.transport(xn, v) if mu else None)
    return out


# -- the step -----------------------------------------------------------------------------------
CONFIGS = [
    # manifolds, momentum, dampening, nesterov, weight_decay, maximize, lr
    ("sp+ob+st", 0.0, 0.0, False, 0.0, False, 0.05),
    ("sp+ob+st", 0.9, 0.0, False, 5e-4, False, 0.05),
    ("sp+ob+st", 0.9, 0.0, True, 0.0, True, 0.05),
    ("sp+ob+st+euc", 0.9, 0.3, False, 1e-2, False, 5.0),
    ("sp+ob+st+euc", 0.9, 0.0, True, 1e-2, True, 5.0),
    ("sp+ob", 0.9, 0.0, False, 0.0, False, 5.0),
    ("st", 0.5, 0.1, False, 0.0, True, 0.05),
    ("euc", 0.9, 0.0, False, 1e-2, False, 0.05),
]


def gpu_path(monkeypatch, mode: str) -> bool:
    """Sets up the CUDA code path ``mode`` on this machine: ``"batched"`` the torch ops (layers
    side by side, no host sync), ``"triton"`` :mod:`pomfx.fused_gpu`'s kernels through Triton's
    interpreter. Returns whether FG-SGD must run batched."""
    if mode == "triton":
        if not fused_gpu._interpreting():
            pytest.skip("Triton compiles for the GPU here: the cuda tests run its kernels")
        monkeypatch.setenv("POMFX_TRITON", "1")
    elif mode == "batched":
        monkeypatch.setenv("POMFX_TRITON", "0")
    return mode in ("batched", "triton")


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", ["chunked", "torch-ops", "batched", "triton"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_step_matches_reference_float64(cfg, mode, net, monkeypatch):
    """The step, as run on CPU (layers cut into chunks: numba's kernels, 5×5 and 7×7 kernels as
    blocks; or, with ``POMFX_FUSED=0``, the torch ops) and as run on CUDA (layers side by side,
    batched small-matrix ops, no host sync; or Triton's kernels for components of up to 16
    entries), is Algorithm 1 written out per bucket (float64)."""
    manifolds, mu, damp, nest, wd, maxi, lr = cfg
    batched = gpu_path(monkeypatch, mode)
    if mode == "torch-ops":
        monkeypatch.setenv("POMFX_FUSED", "0")
    model = NETS[net](manifolds, dtype=torch.float64)
    opt = pomfx.FGSGD(
        model.parameters(),
        lr=lr,
        momentum=mu,
        dampening=damp,
        nesterov=nest,
        weight_decay=wd,
        maximize=maxi,
        chunk=200,
    )  # fmt: skip  (several chunks and jobs)
    opt._batched = batched
    _steps_match_reference(model, opt, lr, mu, damp, wd, nest, maxi)


def _steps_match_reference(model, opt, lr, mu, damp=0.0, wd=0.0, nest=False, maxi=False, steps=3):
    """``steps`` steps of ``opt`` on random gradients (a large first one: the radius cap acts)
    equal :func:`reference_step`'s, ω and momentum, to 1e-10."""
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (3.0 if step == 0 else 0.1)
        ref = reference_step(model, opt.state, lr, mu, damp, wd, nest, maxi)
        opt.step()
        for name, mod, t, pom in poms(model):
            p = mod.parametrizations[t].original
            xs = list(pom.buckets(p.detach()))
            vs = list(pom.buckets(opt.state[p]["momentum_buffer"])) if mu else None
            for i, (_, x) in enumerate(xs):
                xn, vn = ref[name, i]
                torch.testing.assert_close(x, xn, rtol=0, atol=1e-10)
                if mu:
                    torch.testing.assert_close(vs[i][1], vn, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["chunked", "batched", "triton"])
def test_blocks_of_both_broadcasts_of_r_step_together(mode, monkeypatch):
    """(8, 4) blocks of a (16, 8) weight keep R along their columns, the transposed-stored (4, 8)
    blocks of an (8, 16) weight along their rows; batched mode (CUDA: the torch ops, or Triton's
    :func:`pomfx.fused_gpu.block_step`) steps both, and the blocks of every manifold, in one job
    (the gradient scaled segment by segment), with the reference's result."""
    batched = gpu_path(monkeypatch, mode)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1)).double()
    model = pomfx.convert(net, scheme="pio", manifolds="sp+ob+st", include=[nn.Conv2d])
    model(torch.randn(4, 8, 3, 3, dtype=torch.float64) * torch.linspace(0.5, 2, 8).view(1, 8, 1, 1).double())
    pomfx.update_scales(model)  # R varies along the input channels
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9)
    opt._batched = batched
    _steps_match_reference(model, opt, 0.05, 0.9)
    jobs = [j for plan in opt._plans.values() for j in plan]
    assert any(getattr(j, "prescale", False) for j in jobs) == batched
    assert any(len(getattr(j, "parts", ())) == 3 for j in jobs) == batched


@pytest.mark.parametrize("mu, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_triton_block_step_on_large_blocks_is_the_reference(mu, nesterov, monkeypatch):
    """:func:`pomfx.fused_gpu.block_step` on 150×140 blocks of every manifold (tiles that end
    part way, several programs per block and per row block of C, the trace summed over column
    chunks) is Algorithm 1's float64 reference, ω and momentum to 1e-10."""
    _large_blocks_match_reference(mu, nesterov, monkeypatch)


def test_triton_block_step_keeps_a_huge_blocks_tiles_within_the_grid(monkeypatch):
    """A CUDA grid's second axis takes at most 65 535 programs, the tiles of one block: a huge
    block (16384 × 16384) gets taller tiles to stay within it, and such tiles give the reference's
    step (here with a limit of 8 tiles a block, so that 150×140 blocks take 128-row tiles)."""
    for shape in [(16384, 16384), (65536, 4096), (1 << 20, 64)]:
        ta, tb, t, _ = fused_gpu.block_tiles(*shape)
        assert t <= 65535 and t == -(-shape[0] // ta) * -(-shape[1] // tb), (shape, ta, tb, t)
    assert fused_gpu.block_tiles(150, 140)[:3] == (16, 64, 30)
    monkeypatch.setattr(fused_gpu, "_GRID_Y", 8)
    assert fused_gpu.block_tiles(150, 140)[:3] == (128, 64, 6)
    _large_blocks_match_reference(0.9, False, monkeypatch)


def _large_blocks_match_reference(mu: float, nesterov: bool, monkeypatch) -> None:
    gpu_path(monkeypatch, "triton")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 280), nn.ReLU(), nn.Linear(280, 10)).double()
    model = pomfx.convert(net, scheme="pio", manifolds="sp+ob+st+euc")
    assert [b.cols for b in next(poms(model))[3].layout.buckets] == [140] * 4
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=mu, nesterov=nesterov, weight_decay=1e-3)
    opt._batched = True
    calls = []
    step = fused_gpu.block_step
    monkeypatch.setattr(fused_gpu, "block_step", lambda *a: calls.append(a[0].shape) or step(*a))
    _steps_match_reference(model, opt, 0.05, mu, wd=1e-3, nest=nesterov)
    assert calls == [(4, 150, 140)] * 3


def test_first_order_sphere_step():
    """One step without momentum on a sphere conv is ω − lr·Π(s ⊙ G) retracted: the distance to
    that first-order prediction falls ~100× when lr falls 10× (radius cap inactive)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double()
    base = pomfx.convert(nn.Sequential(conv), manifolds="sp", include=[nn.Conv2d])
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    errs = []
    for lr in (1e-4, 1e-5):
        model = copy.deepcopy(base)
        pom = next(poms(model))[3]
        omega = model[0].parametrizations.weight.original
        model(x).square().sum().backward()
        s = pom.lr_scale().expand(*pom._shape, -1).reshape(-1)
        (_, w0), (_, g), (_, sc) = (next(pom.buckets(t)) for t in (omega.detach().clone(), omega.grad, s))
        xi = -lr * M.Sphere.proj_tangent(w0, sc * g)
        assert float((xi.square().sum((1, 2)).sqrt()).max()) < 0.2  # the cap stays inactive
        pomfx.FGSGD(model.parameters(), lr=lr).step()
        w1 = next(pom.buckets(omega.detach()))[1]
        errs.append(float((w1 - (w0 + xi)).abs().max()))
    assert 50 < errs[0] / errs[1] < 200, errs


def test_radius_cap():
    """The step-size rule: a small gradient gives plain Riemannian SGD (ξ = −lr·grad, no cap); a
    huge one moves every group by exactly δ·‖ω_g‖ (for one-component sphere groups: by the
    angle atan δ)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3))
    model = pomfx.convert(net.double(), manifolds="sp", group_size=1, include=[nn.Conv2d])
    omega = model[0].parametrizations.weight.original
    pom = next(poms(model))[3]
    w0 = next(pom.buckets(omega.detach().clone()))[1]
    radius = 0.3
    omega.grad = torch.randn_like(omega) * 1e6
    pomfx.FGSGD(model.parameters(), lr=1.0, radius=radius).step()
    w1 = next(pom.buckets(omega.detach()))[1]
    cos = (w0 * w1).sum((1, 2))
    torch.testing.assert_close(cos, torch.full_like(cos, (1 + radius**2) ** -0.5), rtol=0, atol=1e-12)
    # small gradients: exactly the uncapped reference
    omega.grad = torch.randn_like(omega) * 1e-3
    ref = reference_step(model, {}, 1e-2, 0, 0, 0, False, False, radius=1e9)
    pomfx.FGSGD(model.parameters(), lr=1e-2, radius=radius).step()
    torch.testing.assert_close(next(pom.buckets(omega.detach()))[1], ref[next(poms(model))[0], 0][0])


def test_all_euclidean_layer_trains_like_sgd_on_w():
    """euc components take SGD in ω with lr/R² (and weight decay): the effective weight W = R ⊙ ω
    follows torch's SGD on W, to rounding — the step-size mapping of DESIGN §1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    conv = pomfx.convert(copy.deepcopy(net), manifolds="euc", include=[nn.Conv2d, nn.Linear])
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    o1, o2 = torch.optim.SGD(net.parameters(), **kw), pomfx.FGSGD(conv.parameters(), **kw)
    x = torch.randn(16, 3, 6, 6)
    for _ in range(5):
        for m, o in ((net, o1), (conv, o2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    torch.testing.assert_close(conv[0].weight, net[0].weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(conv[3].weight, net[3].weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
     dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, maximize=True), dict()],
    ids=["momentum", "nesterov-wd", "dampening-maximize", "plain"],
)  # fmt: skip
def test_plain_parameters_get_exactly_torch_sgd(kw):
    """Biases, BN, unconverted layers: bit for bit torch.optim.SGD, over several steps."""
    model = small_net(everything=False)  # the classifier stays unconverted
    twin = copy.deepcopy(model)
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, **kw)
    ref = torch.optim.SGD(plain_params(twin), lr=0.1, **kw)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(plain_params(model), plain_params(twin)):
        assert torch.equal(a, b)


def test_momentum_stays_tangent():
    model = small_net()
    opt = pomfx.FGSGD(model.parameters(), lr=0.5, momentum=0.9)
    for _step in range(5):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    for name, mod, t, pom in poms(model):
        p = mod.parametrizations[t].original
        for (b, x), (_, v) in zip(pom.buckets(p.detach()), pom.buckets(opt.state[p]["momentum_buffer"])):
            pv = M.get(b.manifold).proj_tangent(x.double(), v.double())
            assert float((pv - v.double()).abs().max()) <= 1e-5 * max(1.0, float(v.abs().max())), (name, b)


def test_drift_after_1000_steps_fp32():
    """Every manifold, in a kernel layout and block layouts (small blocks, in tensor ops, and
    32×32 ones, whose second Cholesky-QR pass is taken only where Gershgorin's test asks for it),
    with momentum and the occasional huge gradient (cap active): the constraint error stays at
    rounding level (no re-projection)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3),
        nn.Flatten(),
        nn.Linear(8, 24),
        nn.Linear(24, 64),
        nn.Linear(64, 64),
        nn.Linear(64, 3),
    )
    model = pomfx.convert(net, manifolds="sp+ob+st", include=[nn.Conv2d, nn.Linear])
    opt = pomfx.FGSGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(1000):
        for p in omegas(model):
            p.grad = torch.randn(p.shape, generator=g) * (30.0 if step % 100 == 0 else 1.0)
        opt.step()
    err = pomfx.constraint_error(model)
    assert max(err.values()) <= 1e-5, err


def test_gershgorin_test_of_the_gram_matrix():
    """One Cholesky-QR pass is kept only where the discs bound κ(yᵀy) by 1 + RESTEP: near-identity
    Gram matrices pass, an ill-conditioned or non-finite one (in a batch of good ones) does not."""
    from pomfx.small_matrix import RESTEP, well_conditioned

    g = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(3, 64, 16, generator=g))[0]
    xi = torch.randn(3, 64, 16, generator=g)
    xi -= x @ (x.mT @ xi)  # tangent-like
    small = x + 0.01 * xi / xi.norm(dim=(1, 2), keepdim=True)
    assert well_conditioned(small.mT @ small)
    big = x + 2.0 * xi / xi.norm(dim=(1, 2), keepdim=True)
    gram = big.mT @ big
    ev = torch.linalg.eigvalsh(gram.double())
    assert float((ev[:, -1] / ev[:, 0]).max()) > 1 + RESTEP and not well_conditioned(gram)
    bad = (small.mT @ small).clone()
    bad[1, 2, 3] = float("nan")
    assert not well_conditioned(bad)


# -- non-finite gradients -----------------------------------------------------------------------
def _group_elements(pom, omega):
    """A boolean mask over ω's storage: the elements of the group of one component, and of the
    components outside that group."""
    a, b = pom._shape
    if pom.layout.kernel:
        comp = torch.zeros(pom.comp_group.numel(), dtype=torch.bool)
        comp |= pom.comp_group == pom.comp_group[5]
        return comp.expand(a, b, -1).reshape(-1)
    mask = torch.zeros_like(omega, dtype=torch.bool)
    bk = pom.layout.buckets[0]
    mask[bk.offset : bk.offset + bk.rows * bk.cols] = True  # block groups are single blocks
    return mask


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", ["chunked", "batched", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_its_group_only(bad, mode, net, monkeypatch):
    """(batched, triton: the CUDA paths, where no host sync decides anything: masks only)"""
    model = NETS[net]()
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
    opt._batched = gpu_path(monkeypatch, mode)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # a momentum to keep
    before = {p: (p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in omegas(model)}
    masks = {}
    for _name, mod, t, pom in poms(model):
        p = mod.parametrizations[t].original
        masks[p] = _group_elements(pom, p)
        p.grad = torch.randn_like(p)
        p.grad[masks[p].nonzero()[0]] = bad
    opt.step()
    for p, (w0, v0) in before.items():
        m = masks[p]
        assert torch.equal(p.detach()[m], w0[m]) and torch.equal(opt.state[p]["momentum_buffer"][m], v0[m])
        assert not torch.equal(p.detach()[~m], w0[~m])  # the other groups moved
        assert torch.isfinite(p).all()
    assert max(pomfx.constraint_error(model).values()) < 1e-5


def test_triton_group_sums_are_the_sums_in_a_fixed_order(monkeypatch):
    """:func:`pomfx.fused_gpu.group_sums` over scattered groups, some empty and some longer than
    a block, is the group sums, and the same bits on every call."""
    gpu_path(monkeypatch, "triton")
    from pomfx.jobs import group_order

    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 40, (3000,), generator=g), torch.full((700,), 41)]).int()
    ids = ids[torch.randperm(len(ids), generator=g)]
    q = torch.rand(len(ids), generator=g, dtype=torch.float64)
    order, start, _ = group_order(ids, 45)  # groups 40, 42, 43, 44 empty; 41 has 700 members
    qg = torch.full((45,), float("nan"), dtype=torch.float64)
    fused_gpu.group_sums(q, order, start, qg)
    ref = torch.zeros(45, dtype=torch.float64).index_add_(0, ids.long(), q)
    torch.testing.assert_close(qg, ref, rtol=1e-14, atol=0)
    again = torch.empty_like(qg)
    fused_gpu.group_sums(q, order, start, again)
    assert torch.equal(again, qg)


def test_triton_step_launches_and_the_torch_ops_step(monkeypatch):
    """On the CUDA path, FG-SGD steps kernel layers of components up to 16 entries by Triton
    kernels (per layer one launch for u's norms and one for the step, per job one for the group
    sums) and block jobs by :func:`pomfx.fused_gpu.block_step` (its group sums one launch); in
    float32 that step is the torch ops' (batched mode) to rounding, a repeated step is the same
    bits, and ω stays on its manifolds."""
    monkeypatch.setattr(fused_gpu, "_BLOCK", 16)  # several programs per layer
    base = small_net("sp+ob+st+euc")
    models = {mode: copy.deepcopy(base) for mode in ("batched", "triton", "again")}
    opts = {}
    for mode, model in models.items():
        opts[mode] = pomfx.FGSGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
        opts[mode]._batched = True
    calls = collections.Counter()
    for name in ("norms", "group_sums", "step", "block_step"):
        real = getattr(fused_gpu, name)
        monkeypatch.setattr(fused_gpu, name, lambda *a, _f=real, _n=name: calls.update([_n]) or _f(*a))
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) * (5.0 if step == 0 else 1.0) for p in base.parameters()]
        for mode, model in models.items():
            monkeypatch.setenv("POMFX_TRITON", "0" if mode == "batched" else "1")
            for p, gr in zip(model.parameters(), grads):
                p.grad = gr.clone()
            opts[mode].step()
    kernel_layers = [p for p in omegas(base) if p.pom.layout.kernel]
    jobs = {(p.pom._shape, p.dtype) for p in kernel_layers}
    (plan,) = opts["triton"]._plans.values()
    blocks = sum(isinstance(job, BlockJob) for job in plan)
    assert blocks == 4
    assert calls == {"norms": 4 * 2 * len(kernel_layers), "step": 4 * 2 * len(kernel_layers),
                     "group_sums": 4 * 2 * (len(jobs) + blocks), "block_step": 4 * 2 * blocks}  # fmt: skip
    for a, b, c in zip(*(m.parameters() for m in models.values())):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)
        sa, sb, sc = (o.state[p].get("momentum_buffer") for o, p in zip(opts.values(), (a, b, c)))
        if sa is not None:
            torch.testing.assert_close(sb, sa, rtol=1e-4, atol=1e-5)
            assert torch.equal(sb, sc)
    assert max(pomfx.constraint_error(models["triton"]).values()) < 1e-5


def test_triton_kernels_compile_for_the_h100_without_spills():
    """The generated Triton source (FG-SGD's kernels, the λ hook's, the block maps) compiles for sm_90a
    (H100/H200) here, without a GPU (``benchmarks/triton_ptx.py``: Triton's compiler and ptxas),
    and no kernel spills registers."""
    pytest.importorskip("triton")
    script = Path(__file__).parents[1] / "benchmarks" / "triton_ptx.py"
    out = subprocess.run(
        [sys.executable, str(script), "--shapes", "3x3,3x1"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lam = 2 * (3 + 1) + 2 * 2  # the λ moments (x's dtypes × rows/planes) and folds
    maps = 4 * 2  # block layers' maps: 4 dtypes, both ways
    blocks = 2 * 12  # block jobs' step: prep, coldots, project ×2, compose ×3, direction ×3, move, normalize
    assert out.stdout.count(" 0 bytes spilled") == 2 + lam + maps + blocks + 2 * 2 * 9, out.stdout


def test_batched_jobs_stay_under_their_size_cap(monkeypatch):
    """Batched mode (CUDA) steps all layers of a shape together, but never more than
    ``_BATCH`` elements in one job (its copies and temporaries must fit on the device);
    cut into many jobs, the step is the reference's."""
    from pomfx import optim

    model = small_net("sp+ob+st+euc", dtype=torch.float64)
    constrained = [p for p in model.parameters() if isinstance(p, ComponentParameter)]
    uncapped = len(optim._plan(constrained, optim._CHUNK, True))
    monkeypatch.setattr(optim, "_BATCH", 100)
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt._batched = True
    _steps_match_reference(model, opt, 0.05, 0.9, wd=1e-2)
    (plan,) = opt._plans.values()
    for job in plan:
        is_block = isinstance(job, BlockJob)
        sizes = [s.numel for s in job.segs] if is_block else [p.numel() for p in job.params]
        assert sum(sizes) <= 100 or len(sizes) == 1, sizes
    assert len(plan) > uncapped


class _HostSyncs(TorchDispatchMode):
    """Counts the aten ops that make a CUDA program wait for the device (``.item()``, ``bool()``,
    ``nonzero``...), whatever the device the ops run on."""

    SYNCS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", ["batched", "triton"])
@pytest.mark.parametrize("mu, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_batched_training_step_never_waits_for_the_device(monkeypatch, mu, nesterov, mode, net):
    """The CUDA code paths (batched FG-SGD by torch ops or Triton kernels, pomfx's torch ops in
    the forward and backward) decide nothing on the host from a tensor's value, finite gradients
    or not: no host sync."""
    monkeypatch.setenv("POMFX_FUSED", "0")  # the torch ops that CUDA runs
    model = NETS[net]("sp+ob+st+euc").train()
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=mu, nesterov=nesterov, weight_decay=1e-3)
    opt._batched = gpu_path(monkeypatch, mode)
    x = torch.randn(4, 3, 6, 6)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        with _HostSyncs() as syncs:
            model(x).square().mean().backward()
            if step == 2:
                omegas(model)[0].grad[0] = float("nan")
            opt.step()
        assert syncs.seen == [], f"step {step}: {syncs.seen}"
    assert max(pomfx.constraint_error(model).values()) < 1e-5


@pytest.mark.parametrize("enable", ["new api", "legacy", "precision"])
def test_step_computes_with_ieee_matmuls_whatever_the_tf32_setting(enable, monkeypatch):
    """TF32 enabled by the user (any of torch's three ways) is off inside FG-SGD's step, whose
    Gram matrices must be exact to retract onto Stiefel, and the user's setting is back after."""
    m = torch.backends.cuda.matmul
    saved = m.fp32_precision
    seen = []
    step = pomfx.optim.FGSGD._manifold_step
    monkeypatch.setattr(
        pomfx.optim.FGSGD, "_manifold_step", lambda *a: seen.append(m.fp32_precision) or step(*a)
    )
    model = small_net()
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
    try:
        if enable == "new api":
            m.fp32_precision = "tf32"
        elif enable == "legacy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (torch's deprecation notice)
                m.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert seen == ["ieee"] and m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = saved
    assert max(pomfx.constraint_error(model).values()) < 1e-5


def test_nonfinite_raise_changes_nothing():
    model = small_net()
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9, nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    omegas(model)[1].grad[3] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="nonfinite"):
        pomfx.FGSGD(model.parameters(), nonfinite="ignore")


# -- the torch.optim conveniences -----------------------------------------------------------------
def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, sched=None, scaler=None):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()


def test_lr_scheduler_is_honoured():
    a, b = small_net(), small_net()
    oa, ob = (
        pomfx.FGSGD(a.parameters(), lr=0.1, momentum=0.9),
        pomfx.FGSGD(b.parameters(), lr=0.1, momentum=0.9),
    )
    sched = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.1)
    for i, batch in enumerate(_data(4)):
        for group in ob.param_groups:
            group["lr"] = 0.1 * 0.1 ** (i // 2)
        _train(a, oa, [batch], sched)
        _train(b, ob, [batch])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_grad_scaler_cpu():
    """torch.amp.GradScaler("cpu"): power-of-two scaling is exact, so training is unchanged; an
    inf in the scaled gradients skips the step."""
    a, b = small_net(), small_net()
    oa, ob = (pomfx.FGSGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _train(a, oa, _data(3))
    _train(b, ob, _data(3), scaler=scaler)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.detach().clone() for p in b.parameters()]
    ob.zero_grad()
    x, y = _data(1)[0]
    scaler.scale(nn.functional.cross_entropy(b(x), y) * float("inf")).backward()
    scaler.step(ob)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))


def test_closure_and_zero_grad_set_to_none():
    a, b = small_net(), small_net()
    oa, ob = (pomfx.FGSGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b))
    x, y = _data(1)[0]

    def closure():
        oa.zero_grad()
        loss = nn.functional.cross_entropy(a(x), y)
        loss.backward()
        return loss

    loss = oa.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0
    _train(b, ob, [(x, y)])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    oa.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in a.parameters())
    before = [p.detach().clone() for p in a.parameters()]
    oa.step()  # no gradients: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(before, a.parameters()))


def test_state_dict_round_trip_restores_momentum():
    model = small_net()
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    _train(model, opt, _data(3))
    sd = copy.deepcopy(opt.state_dict())
    fresh = pomfx.FGSGD(model.parameters(), lr=0.5)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert fresh.param_groups[0]["lr"] == 0.1 and fresh.param_groups[0]["nesterov"]


def test_resume_from_checkpoints_bit_for_bit():
    """Stop after 3 steps, save model + optimizer, rebuild both from scratch, load, go on: the
    final weights equal those of the run that never stopped (λ statistics and update_scales
    included)."""
    batches = _data(6)

    def run(model, opt, part):
        _train(model, opt, part)
        pomfx.update_scales(model)

    model = small_net()
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    run(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, batches[3:])

    ckpt = torch.load(io.BytesIO(buf.getvalue()))
    resumed = small_net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = pomfx.FGSGD(resumed.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, batches[3:])
    for (n, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q) if torch.is_tensor(p) else p == q, n


def test_bf16_keeps_an_fp32_master():
    model = small_net().to(torch.bfloat16)
    opt = pomfx.FGSGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = _data(1)[0]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()
    for p in omegas(model):
        st = opt.state[p]
        assert st["master"].dtype == torch.float32 and st["momentum_buffer"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master"].to(torch.bfloat16))
    # the master is on the manifolds to fp32 accuracy
    for _name, mod, t, pom in poms(model):
        p = mod.parametrizations[t].original
        assert pom.constraint_error(opt.state[p]["master"]) < 1e-5
    # state_dict keeps the master and its momentum in fp32
    opt2 = pomfx.FGSGD(model.parameters(), lr=1e-3, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in omegas(model):
        assert torch.equal(opt2.state[p]["master"], opt.state[p]["master"])
        assert opt2.state[p]["momentum_buffer"].dtype == torch.float32
    # a weight changed outside the optimizer (a checkpoint load) is re-read into the master
    p = omegas(model)[0]
    with torch.no_grad():
        p.mul_(-1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(opt.state[p]["master"].to(torch.bfloat16), p.detach())


def test_bad_arguments():
    model = small_net()
    for kw in (dict(lr=-1), dict(momentum=-0.1), dict(weight_decay=-1), dict(nesterov=True),
               dict(radius=0), dict(chunk=0)):  # fmt: skip
        with pytest.raises(ValueError):
            pomfx.FGSGD(model.parameters(), **{"lr": 0.1, **kw})


# -- fused CPU kernels (numba) -------------------------------------------------------------------------
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("manifolds", ["sp+ob+st", "sp+ob+st+euc"])
def test_fused_kernels_match_torch_kernels(manifolds, momentum, nesterov, dtype, net, monkeypatch):
    """pomfx.fused (one generated, vectorised loop per phase; one loop per job of small blocks,
    and per kernel layer of 5×5 or 7×7 components) computes what KernelJob's and update's
    torch ops compute: every mode, a large step (Cholesky-QR twice, capped groups), a group
    with a NaN gradient."""
    assert fused.available(3, 3), "numba is a dependency of pomfx"
    calls = []
    monkeypatch.setattr(fused, "phase_b", lambda *a, f=fused.phase_b: calls.append("b") or f(*a))
    monkeypatch.setattr(fused, "block_step", lambda *a, f=fused.block_step: calls.append("blocks") or f(*a))
    ref = NETS[net](manifolds, dtype=dtype)
    new = copy.deepcopy(ref)
    kw = dict(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=1e-3)
    o_ref, o_new = pomfx.FGSGD(ref.parameters(), **kw), pomfx.FGSGD(new.parameters(), **kw)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ref.parameters(), new.parameters()):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * (5.0 if step == 0 else 0.1)
            if step == 2 and isinstance(a, ComponentParameter):
                a.grad[7] = float("nan")
            b.grad = a.grad.clone()
        with monkeypatch.context() as m:
            m.setenv("POMFX_FUSED", "0")
            o_ref.step()
        o_new.step()
    assert {"b" if net == "small" else "blocks", "blocks"} <= set(calls), "the fused kernels did not run"
    rtol = 1e-5 if dtype == torch.float32 else 1e-11  # of each tensor's largest entry: rounding only

    def close(x, y):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.detach().abs().max()))

    for a, b in zip(ref.parameters(), new.parameters()):
        close(b, a)
        if momentum:
            close(o_new.state[b]["momentum_buffer"], o_ref.state[a]["momentum_buffer"])
    assert max(pomfx.constraint_error(new).values()) <= 1e-5
    # numba's OpenMP layer must not change torch's thread count (it did: DDP ranks then diverged)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        o_new.step()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum,dampening", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.3)])
@pytest.mark.parametrize("manifolds", ["sp+ob+st", "sp+ob+st+euc"])
def test_one_pass_step_is_the_two_phase_step(manifolds, momentum, dampening, dtype, monkeypatch):
    """A kernel layer steps in one pass (pomfx.fused.one_pass) when the bound of fused.within
    shows that no group's step is capped: bit for bit the two-phase step. Gradients from tiny to
    capping, so that layers take both paths, and the bound is tested where it is tight: also
    where a component is over its share of its group's limit and the group sums decide."""
    taken, phase_a, groups = [], fused.phase_a, fused.groups_within  # each layer step's path

    def groups_within(*a):
        taken.append(f"groups {groups(*a)}")
        return taken[-1] == "groups True"

    def one_pass(*a, f=fused.one_pass):
        taken.append("one twice" if a[-2] else "one")  # twice: a second Cholesky-QR where needed
        f(*a)

    monkeypatch.setattr(fused, "one_pass", one_pass)
    monkeypatch.setattr(fused, "phase_a", lambda *a: taken.append("two") or phase_a(*a))
    monkeypatch.setattr(fused, "groups_within", groups_within)
    ref = small_net(manifolds, dtype=dtype)
    new = copy.deepcopy(ref)
    kw = dict(lr=0.5, momentum=momentum, dampening=dampening, weight_decay=1e-2)
    o_ref, o_new = pomfx.FGSGD(ref.parameters(), **kw), pomfx.FGSGD(new.parameters(), **kw)
    scales = [1e-3, 3e-3, 3.5e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3, 0.02, 0.05, 0.1, 0.2, 0.4, 1e-3, 0.05]
    for step, scale in enumerate(scales):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ref.parameters(), new.parameters()):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * scale
            b.grad = a.grad.clone()
        with monkeypatch.context() as m:
            m.setattr(fused, "within", lambda *a: False)  # the reference: always two phases
            m.setattr(fused, "phase_a", phase_a)
            o_ref.step()
        o_new.step()
        for a, b in zip(ref.parameters(), new.parameters()):
            assert torch.equal(a, b), f"step {step}"
            if momentum:
                assert torch.equal(o_ref.state[a]["momentum_buffer"], o_new.state[b]["momentum_buffer"])
    assert taken.count("one") >= 3 and taken.count("two") >= 3, " ".join(taken)
    assert "groups True" in taken and "groups False" in taken, " ".join(taken)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_pass_repeats_the_cholesky_qr_where_a_step_is_large(momentum, dtype, monkeypatch):
    """A Stiefel component whose step is large (h²‖u_c‖² > RESTEP) gets its Cholesky-QR twice,
    chosen per component, in the one pass as in phase B: a group with a few large components
    among small ones is not capped, so the layer still steps in one pass. Bit for bit the
    two-phase step (until session 12 only to rounding: the kernels' FMA contractions differed),
    and on the manifold."""
    from pomfx.small_matrix import RESTEP

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3).to(dtype)  # po: groups of 16 components, one large in some
    ref = pomfx.convert(nn.Sequential(conv), scheme="po", manifolds="st", include=[nn.Conv2d])
    new = copy.deepcopy(ref)
    kw = dict(lr=0.5, momentum=momentum)
    o_ref, o_new = pomfx.FGSGD(ref.parameters(), **kw), pomfx.FGSGD(new.parameters(), **kw)
    taken, large, both, phase_a, one_pass = [], [], [], fused.phase_a, fused.one_pass
    monkeypatch.setattr(fused, "one_pass", lambda *a: taken.append(a[-2]) or one_pass(*a))
    for step, big in enumerate([3.0, 8.0, 13.0, 3.0, 12.0]):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ref.parameters(), new.parameters()):
            a.grad = torch.randn(a.shape, generator=g, dtype=dtype) * 3e-4
            if isinstance(a, ComponentParameter):
                a.grad.view(3, 3, -1)[:, :, ::37] *= big
            b.grad = a.grad.clone()
        with monkeypatch.context() as m:  # the reference: two phases; are some steps large?
            m.setattr(fused, "within", lambda *a: 0)
            m.setattr(fused, "phase_a", lambda *a: phase_a(*a) or large.append(float(a[-1].max()) * 0.25))
            o_ref.step()
        taken.clear()
        o_new.step()
        both.append(taken == [True] and large[-1] > RESTEP)  # one pass, second Cholesky-QR
        for a, b in zip(ref.parameters(), new.parameters()):
            assert torch.equal(b, a), step
            if momentum:
                assert torch.equal(o_ref.state[a]["momentum_buffer"], o_new.state[b]["momentum_buffer"])
    assert any(both), (both, large)
    assert max(pomfx.constraint_error(new).values()) <= (2e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("shape", [(3, 3), (2, 2), (1, 3), (3, 1), (2, 6), (4, 2)], ids=str)
def test_kernels_give_a_component_the_same_bits_wherever_it_falls(shape):
    """IEEE arithmetic in the numba kernels (``fused._FASTMATH``): a component's result does not
    depend on whether it falls in a loop's vectorised body or in the scalar remainder of a
    thread's range, so it is the same for any thread count; and ‖v_c‖ as the one pass leaves it
    is bit for bit the norm the bound computes again from V (a resumed run, which has no cached
    norms, bounds its first step exactly as the run that never stopped). With fast-math
    contraction, both failed on a few components per layer (the remainders')."""
    a, b = shape
    g = torch.Generator().manual_seed(a * 10 + b)
    n = 20011  # not a multiple of any vector width: every thread's range has a remainder
    x = torch.randn(a, b, n, generator=g)
    x /= x.square().sum((0, 1)).sqrt()
    grad, v = torch.randn(a, b, n, generator=g) * 1e-2, torch.randn(a, b, n, generator=g) * 1e-2
    cg, mu, wd = torch.ones(n), torch.full((n,), 0.9), torch.zeros(n)
    kinds = 3 if a >= b else 2  # st needs a tall component
    types = torch.randint(0, kinds, (n // 64 + 1,), generator=g, dtype=torch.int8).repeat_interleave(64)[:n]
    lim = torch.full((5,), 1e30)
    runs, threads = [], torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            X, V, vn, e2, e2v = x.clone(), v.clone(), torch.empty(n), torch.empty(n), torch.empty(n)
            fused.one_pass(X, grad, V, cg, mu, wd, types.contiguous(), 0.05, vn, True, 0.25)
            fused.within(X, grad, V, cg, mu, types.contiguous(), lim, e2, vn)
            fused.within(X, grad, V, cg, mu, types.contiguous(), lim, e2v, None)
            assert torch.equal(e2, e2v), t  # the cached norms are V's
            U, q = torch.empty_like(x), torch.empty(n)
            fused.phase_a(x, grad, v.clone(), U, cg, mu, wd, types.contiguous(), 2, 0.9, q)
            runs.append((X, V, vn, e2, U, q))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(s, t) for s, t in zip(runs[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_groups_within_sums_each_group(dtype):
    """fused.groups_within: Σ_{c∈g} e2_c ≤ lim_g[g] for each group g of the range given (the
    components' groups), at the boundary; groups outside the range are not looked at."""
    e2 = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=dtype)
    gid = torch.tensor([2, 1, 2, 1], dtype=torch.int32)
    qg = torch.full((4,), float("nan"), dtype=dtype)  # a dirty workspace
    limit = lambda *v: torch.tensor(v, dtype=dtype)  # noqa: E731
    assert fused.groups_within(e2, gid, limit(-1, 2.5, 4.0, -1), qg, (1, 3))
    assert not fused.groups_within(e2, gid, limit(-1, 2.5, 3.99, -1), qg, (1, 3))
    assert not fused.groups_within(e2, gid, limit(-1, 2.49, 4.0, -1), qg, (1, 3))
    inf = torch.tensor([float("inf")], dtype=dtype)
    assert not fused.groups_within(inf, gid[:1], limit(0, 0, 1e30, 0), qg, (2, 3))


def test_large_kernels_step_as_blocks(monkeypatch):
    """5×5 and 7×7 kernel layers step by numba's block step (each component a block): always
    where every component is its own group (depthwise: the block's own cap is its group's),
    and where groups hold several components while the bound shows no cap; a capped step takes
    the torch ops. (That both give the reference step: test_step_matches_reference_float64.)"""
    from pomfx.kernel_job import KernelJob

    taken = []
    blocks = KernelJob._blocks
    monkeypatch.setattr(
        KernelJob,
        "_blocks",
        lambda job, *a: taken.append((job.gid is None, blocks(job, *a))) or taken[-1][1],
    )
    model = large_kernel_net()
    opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
    for scale in (1e-3, 1e3):
        taken.clear()
        for p in model.parameters():
            p.grad = torch.randn_like(p) * scale
        opt.step()
        own = [ok for single, ok in taken if single]
        shared = [ok for single, ok in taken if not single]
        assert own == [True] and len(shared) == 2, taken  # the depthwise conv, the two others
        assert all(shared) == (scale < 1), taken  # a huge gradient caps: the torch ops
    assert max(pomfx.constraint_error(model).values()) < 1e-5


def test_one_pass_reads_a_changed_momentum_buffer_afresh(monkeypatch):
    """The one-pass bound reads ‖v_c‖ as the last one-pass step left it, while the buffer is
    the same tensor at the same version: a buffer scaled in place, or loaded from a state_dict,
    is read again (a stale norm would let a capped step through, unlike the reference)."""
    ref = small_net()
    new = copy.deepcopy(ref)
    kw = dict(lr=0.5, momentum=0.9)
    o_ref, o_new = pomfx.FGSGD(ref.parameters(), **kw), pomfx.FGSGD(new.parameters(), **kw)
    taken, within = [], fused.within
    monkeypatch.setattr(fused, "within", lambda *a: taken.append(a[-2] is not None) or within(*a))

    def step(seed, change=None):
        g = torch.Generator().manual_seed(seed)
        for a, b in zip(ref.parameters(), new.parameters()):
            a.grad = torch.randn(a.shape, generator=g) * 1e-3
            b.grad = a.grad.clone()
        for o in (o_ref, o_new):
            if change is not None:
                change(o)
        with monkeypatch.context() as m:
            m.setattr(fused, "within", lambda *a: False)  # the reference: always two phases
            o_ref.step()
        taken.clear()
        o_new.step()
        for a, b in zip(ref.parameters(), new.parameters()):
            assert torch.equal(a, b), seed
            assert torch.equal(o_ref.state[a]["momentum_buffer"], o_new.state[b]["momentum_buffer"])

    step(0)
    step(1)
    assert taken and all(taken), "the second one-pass step reads the norms the first one wrote"

    def big(o):
        for p in omegas(ref if o is o_ref else new):
            o.state[p]["momentum_buffer"].mul_(1e4)

    step(2, big)  # capped now: the new model must see the scaled buffers
    assert not any(taken)
    step(3)
    saved = copy.deepcopy(o_ref.state_dict())
    step(4, lambda o: o.load_state_dict(copy.deepcopy(saved)))  # (loading keeps the tensors it gets)
    assert not any(taken)


# -- CUDA ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize(
    "manifolds,nesterov", list(itertools.product(["sp+ob+st", "sp+ob+st+euc"], [False, True]))
)
def test_cuda_step_matches_cpu(manifolds, nesterov):
    cpu = small_net(manifolds, dtype=torch.float64)
    gpu = copy.deepcopy(cpu).cuda()
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-3)
    oc, og = pomfx.FGSGD(cpu.parameters(), **kw), pomfx.FGSGD(gpu.parameters(), **kw)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(cpu.parameters(), gpu.parameters()):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * (5.0 if step == 0 else 0.1)
            b.grad = a.grad.cuda()
        oc.step()
        og.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        # (the scales are float32 buffers, their 1/R² rounds differently on the two devices)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_triton_step_matches_the_torch_ops(dtype, net, monkeypatch):
    """The compiled Triton kernels (CUDA's default: kernel layers, block jobs, 5×5 and 7×7
    kernels as blocks) against the torch ops (``POMFX_TRITON=0``) on the GPU, with a capped first
    step, Nesterov and euc weight decay; a repeated run is the same bits."""
    base = NETS[net]("sp+ob+st+euc", dtype=dtype).cuda()
    models = {mode: copy.deepcopy(base) for mode in ("0", "1", "again")}
    kw = dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opts = {mode: pomfx.FGSGD(m.parameters(), **kw) for mode, m in models.items()}
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads = [
            torch.randn(p.shape, generator=g, dtype=dtype) * (5.0 if step == 0 else 1.0)
            for p in base.parameters()
        ]
        for mode, model in models.items():
            monkeypatch.setenv("POMFX_TRITON", "0" if mode == "0" else "1")
            for p, gr in zip(model.parameters(), grads):
                p.grad = gr.cuda()
            opts[mode].step()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b, c in zip(*(m.parameters() for m in models.values())):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
        assert torch.equal(b, c)
    assert max(pomfx.constraint_error(models["1"]).values()) < 1e-5


@pytest.mark.cuda
def test_cuda_drift_with_tf32_enabled():
    """TF32 on for the model's matmuls (a common speed setting) leaves FG-SGD's retractions
    exact: block layers' Stiefel components stay on the manifold over 300 steps."""
    m = torch.backends.cuda.matmul
    saved = m.fp32_precision
    m.fp32_precision = "tf32"
    try:
        model = small_net("sp+ob+st").cuda()
        opt = pomfx.FGSGD(model.parameters(), lr=0.2, momentum=0.9)
        for _ in range(300):
            for p in omegas(model):
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        m.fp32_precision = saved
    assert max(pomfx.constraint_error(model).values()) <= 1e-5


@pytest.mark.cuda
def test_cuda_drift_and_nonfinite():
    model = small_net().cuda()
    opt = pomfx.FGSGD(model.parameters(), lr=0.2, momentum=0.9)
    for step in range(1000):
        for p in omegas(model):
            p.grad = torch.randn_like(p) * (30.0 if step % 100 == 0 else 1.0)
        if step == 500:
            omegas(model)[0].grad[0] = float("nan")
        opt.step()
    assert max(pomfx.constraint_error(model).values()) <= 1e-5
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_cuda_amp_grad_scaler_fp16():
    model = small_net().cuda()
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    for x, y in _data(5):
        x, y = x.cuda(), y.cuda()
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert torch.isfinite(loss)
    assert max(pomfx.constraint_error(model).values()) <= 1e-5


def test_kernel_layer_steps_do_not_depend_on_the_thread_count(monkeypatch):
    """FG-SGD's steps of k×k-conv layers (one pass, and two phases where groups are capped),
    given the same gradients, are bit for bit the same with 1, 2 or 3 threads: a DDP rank or a
    resumed run on a machine with another core count steps its ω and momentum alike."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(7, 13, 3), nn.Conv2d(13, 11, 3), nn.Conv2d(11, 5, 2))
    base = pomfx.convert(net, scheme="pio")
    paths, one_pass, phase_b = set(), fused.one_pass, fused.phase_b
    monkeypatch.setattr(fused, "one_pass", lambda *a: paths.add("one") or one_pass(*a))
    monkeypatch.setattr(fused, "phase_b", lambda *a, **k: paths.add("two") or phase_b(*a, **k))
    threads, finals = torch.get_num_threads(), []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            model = copy.deepcopy(base)
            opt = pomfx.FGSGD(model.parameters(), lr=0.1, momentum=0.9)
            for step, scale in enumerate([1e-3, 1e-1, 1e-3, 3.0]):  # 3.0: capped groups
                g = torch.Generator().manual_seed(step)
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=g) * scale
                opt.step()
            params = list(model.parameters())
            finals.append(
                [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
            )
    finally:
        torch.set_num_threads(threads)
    assert paths == {"one", "two"}
    for other in finals[1:]:
        assert all(torch.equal(s, t) for s, t in zip(finals[0], other))
