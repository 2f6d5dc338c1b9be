"""The POM parametrization (pomfx.parametrization) and the renormalization (pomfx.renorm):
W = R ⊙ ω against a naive reference, the custom backward, right_inverse, κ, the λ statistics
and R, renorm=False, state_dict, torch.save and deepcopy (the DESIGN §5 traps)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import pomfx
from pomfx import fused_gpu
from pomfx import manifolds as M
from pomfx.parametrization import LAMBDA_CLAMP, ComponentParameter
from pomfx.renorm import poms


def net(seed=0, renorm=True, manifolds="sp+ob+st+euc", dtype=torch.float64):
    """3×3, wide 1×5 and 1×1 convs, a grouped conv and linears: kernel and block layouts."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, (1, 5), padding=(0, 2), groups=2), nn.ReLU(),
        nn.Conv2d(8, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 5),
    ).to(dtype)  # fmt: skip
    return pomfx.convert(m, manifolds=manifolds, seed=seed, renorm=renorm, include=[nn.Conv2d, nn.Linear])


def layers(model):
    for name, mod, t, pom in poms(model):
        yield name, mod, pom, mod.parametrizations[t].original


def naive_weight(pom, omega):
    """The layout's definition, written out: components in bucket order (each transposed back
    when the kernel is wide), as units, gathered by ``layout.index``, times R."""
    lay = pom.layout
    units = []
    for b, x in pom.buckets(omega):
        if lay.kernel and lay.transpose:
            x = x.transpose(1, 2)
        units.append(x.reshape(b.count, -1) if lay.kernel else x.reshape(-1, 1))
    stored = torch.cat(units)
    p, q = lay.weight_shape[:2]
    w = stored[torch.as_tensor(lay.index)].view(p, q, -1) * pom.scale.unsqueeze(-1)
    return w.view(lay.weight_shape)


def test_forward_matches_the_layout_definition():
    model = net()
    kinds = set()
    for _name, mod, pom, omega in layers(model):
        kinds.add((pom.layout.kernel, pom.layout.transpose))
        torch.testing.assert_close(mod.weight, naive_weight(pom, omega.detach()), rtol=0, atol=0)
    assert {(True, False), (True, True), (False, False)} <= kinds


def test_custom_backward_equals_autograd():
    """∇ω through the custom Functions (kernel multiply, block gather) equals autograd of the
    plain index_select reference."""
    model = net()
    for _name, _mod, pom, omega in layers(model):
        g = torch.randn(pom.layout.weight_shape, dtype=omega.dtype)
        w = pom(omega)
        (mine,) = torch.autograd.grad(w, omega, g)
        leaf = omega.detach().clone().requires_grad_()
        (ref,) = torch.autograd.grad(naive_weight(pom, leaf), leaf, g)
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)


def test_omega_weight_round_trip():
    """For a weight on the manifolds times R, ω → W → ω is the identity (right_inverse)."""
    model = net()
    for _name, mod, pom, omega in layers(model):
        w = pom(omega.detach())
        torch.testing.assert_close(pom.right_inverse(w), omega.detach(), rtol=0, atol=1e-12)
        # and assigning a weight goes through right_inverse: projected, then read back
        mod.weight = w * 1.0
        torch.testing.assert_close(mod.weight, w, rtol=0, atol=1e-12)
        assert isinstance(mod.parametrizations.weight.original, ComponentParameter)


def test_omega_from_weight_projects_onto_the_manifolds():
    model = net()
    for _name, _mod, pom, omega in layers(model):
        w = torch.randn(pom.layout.weight_shape, dtype=omega.dtype)
        assert pom.constraint_error(pom.omega_from_weight(w)) < 1e-12


def test_calibrate_sets_kappa_to_the_rms_component_norm():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3).double()
    w = conv.weight.detach().clone()
    model = pomfx.convert(nn.Sequential(conv), manifolds="sp+ob+st+euc", include=[nn.Conv2d])
    pom = next(poms(model))[3]
    norms = w.reshape(48, 9).norm(dim=1)
    rows = []
    for b in pom.layout.buckets:
        u0 = b.offset // (b.rows * b.cols)
        if b.manifold != "euc":
            rows.append(torch.as_tensor(pom.layout.inverse[u0 : u0 + b.count]))
    kappa = norms[torch.cat(rows)].square().mean().sqrt()
    torch.testing.assert_close(pom.kappa.double(), kappa, rtol=1e-6, atol=0)
    torch.testing.assert_close(pom.scale, kappa.float() * pom.gamma, rtol=1e-6, atol=0)  # λ̂ = 1


def test_lambda_statistics_train_mode_only():
    model = net()
    x = torch.randn(32, 3, 6, 6, dtype=torch.float64) * 3 + 5
    model.eval()
    model(x)
    for _, _, pom, _ in layers(model):
        assert int(pom.num_batches_tracked) == 0 and torch.equal(
            pom.running_var, torch.ones_like(pom.running_var)
        )
    model.train()
    model(x)
    first = next(layers(model))[2]
    torch.testing.assert_close(
        first.running_var, x.var(dim=(0, 2, 3), unbiased=False).float(), rtol=1e-5, atol=0
    )
    assert all(int(pom.num_batches_tracked) == 1 for _, _, pom, _ in layers(model))


def lambda_net(dtype):
    """A conv (N, C, H, W) input, Linear inputs (N, T, C) and (N, C): the λ hook's layouts."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(2), nn.Linear(36, 20), nn.ReLU(),
        nn.Flatten(), nn.Linear(160, 64), nn.ReLU(), nn.Linear(64, 5),
    ).to(dtype)  # fmt: skip
    return pomfx.convert(model, include=[nn.Conv2d, nn.Linear], exclude=["8"])


def lambda_batches(dtype, n=5):
    """Five batches whose mean is large against the spread."""
    return [torch.randn(16, 3, 6, 6, dtype=dtype) * (1 + i) + 1000 for i in range(n)]


@pytest.mark.skipif(not pomfx.fused.enabled(), reason="numba kernels disabled (POMFX_FUSED=0)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_lambda_statistics_equal_the_torch_reductions(dtype, monkeypatch):
    """The one-pass CPU kernel of the λ hook (pomfx.fused.fold_channel_var) against the torch
    sums it replaces, over five batches (the cumulative average, then the EMA): convs (N, C, H, W),
    Linear inputs (N, C) and (N, T, C) (channels last), a mean large against the spread; and
    the same value bit for bit whatever the thread count."""
    model = lambda_net(dtype)
    xs = lambda_batches(dtype)

    def stats(threads=None):
        m = copy.deepcopy(model)
        n = torch.get_num_threads()
        torch.set_num_threads(threads or n)
        try:
            for x in xs:
                m(x)
        finally:
            torch.set_num_threads(n)
        return [pom.running_var.clone() for _, _, pom, _ in layers(m)]

    fused = stats()
    assert len(fused) == 3 and all(int(p.num_batches_tracked) == 0 for _, _, p, _ in layers(model))
    assert all(torch.equal(a, b) for a, b in zip(fused, stats(threads=1)))
    monkeypatch.setenv("POMFX_FUSED", "0")
    reference = stats()
    for a, b in zip(fused, reference):
        assert not torch.equal(a, torch.ones_like(a))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)  # (the torch sums run in float32)


def lambda_stats(model, xs, bf16: bool) -> list[Tensor]:
    """The running variances of a copy of ``model`` after a forward of each of ``xs`` (every
    other one channels-last); ``bf16``: under autocast."""
    m = copy.deepcopy(model)
    dev = xs[0].device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        for i, x in enumerate(xs):
            m(x.to(memory_format=torch.channels_last) if i % 2 else x)
    assert all(int(p.num_batches_tracked) == len(xs) for _, _, p, _ in layers(m))
    return [pom.running_var.clone() for _, _, pom, _ in layers(m)]


def check_triton_lambda(dtype, device, monkeypatch) -> list[tuple]:
    """The λ statistics by Triton's kernels against the torch ops' (POMFX_TRITON=0), to 1e-5, and
    the same bits on a rerun; returns the shapes (P, C, Q) the kernels were given."""
    base = torch.float32 if dtype == torch.bfloat16 else dtype
    model = lambda_net(base).to(device)
    xs = [x.to(device) for x in lambda_batches(base)]
    calls = []
    fold = fused_gpu.fold_channel_var
    monkeypatch.setattr(fused_gpu, "fold_channel_var", lambda x, *a: calls.append(x.shape) or fold(x, *a))
    monkeypatch.setenv("POMFX_TRITON", "1")
    triton, again = (lambda_stats(model, xs, dtype == torch.bfloat16) for _ in range(2))
    shapes = list(calls)
    monkeypatch.setenv("POMFX_TRITON", "0")
    reference = lambda_stats(model, xs, dtype == torch.bfloat16)
    assert len(calls) == len(shapes) == 2 * 3 * len(xs)
    for a, b, c in zip(triton, again, reference):
        assert torch.equal(a, b) and not torch.equal(a, torch.ones_like(a))
        torch.testing.assert_close(a, c, rtol=1e-5, atol=0)
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_lambda_statistics_equal_the_torch_ops(dtype, monkeypatch):
    """The λ hook's Triton kernels (:func:`pomfx.fused_gpu.fold_channel_var`, CUDA's path; here
    through Triton's interpreter) against the torch ops, over five batches: conv inputs
    contiguous (planes) and channels-last (rows), Linear inputs (N, T, C) and (N, C), a mean
    large against the spread, bfloat16 activations under autocast; the same bits on a rerun."""
    if not fused_gpu._interpreting():
        pytest.skip("Triton compiles for the GPU here: test_cuda_lambda_statistics_match runs it")
    monkeypatch.setenv("POMFX_FUSED", "0")  # CUDA's path: no numba
    monkeypatch.setattr(fused_gpu, "_PROGRAMS", 16)  # fewer, longer chunks: the interpreter is slow
    shapes = check_triton_lambda(dtype, "cpu", monkeypatch)
    assert (16 * 36, 3, 1) in shapes and (16, 3, 36) in shapes  # rows and planes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_lambda_statistics_match_the_torch_ops(dtype, monkeypatch):
    """On the GPU: the λ hook's compiled Triton kernels (its default there) against
    ``var_mean`` (``POMFX_TRITON=0``), to 1e-5, and the same bits on a rerun."""
    check_triton_lambda(dtype, "cuda", monkeypatch)


def check_block_map(dtype, device, monkeypatch) -> list[tuple[Tensor, Tensor]]:
    """W, the output and ∇ω of a net of block layers by :func:`pomfx.fused_gpu.block_map` and by
    the torch ops (``index_put_``, ``mul_``; ``mul``, ``index_select``), in pairs."""
    monkeypatch.setenv("POMFX_FUSED", "0")  # CUDA's path: no numba
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(12, 24, 1), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 9, 20), nn.ReLU(), nn.Linear(20, 10)
    ).to(device, dtype)  # fmt: skip
    model = pomfx.convert(model, scheme="pio").eval()
    assert not any(pom.layout.kernel for _, _, pom, _ in layers(model))
    x = torch.randn(5, 12, 3, 3, dtype=dtype, device=device)
    calls = []
    bmap = fused_gpu.block_map
    monkeypatch.setattr(fused_gpu, "block_map", lambda *a: calls.append(a[-1]) or bmap(*a))

    def run(flag):
        monkeypatch.setenv("POMFX_TRITON", flag)
        m = copy.deepcopy(model)
        out = m(x)
        out.square().sum().backward()
        weights = [mod.weight.detach() for _, mod, _, _ in layers(m)]
        return [*weights, out.detach(), *(p.grad for p in m.parameters())]

    triton = run("1")
    assert calls == ["weight"] * 2 + ["storage"] * 2 + ["weight"] * 2  # the forward, ∇ω, W
    pairs = list(zip(triton, run("0")))
    assert len(calls) == 6 and all(a.dtype == b.dtype == dtype for a, b in pairs)
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_block_map_is_the_torch_ops(dtype, monkeypatch):
    """A block layer's map on CUDA's path, one Triton launch each way
    (:func:`pomfx.fused_gpu.block_map`, here through Triton's interpreter): W, the output and
    ∇ω bit for bit those of the torch ops. (In bfloat16 the maps within an ulp: the interpreter
    rounds float32 to bfloat16 half up, where the GPU and torch round half to even.)"""
    if not fused_gpu._interpreting():
        pytest.skip("Triton compiles for the GPU here: test_cuda_block_map_is_the_torch_ops runs it")
    pairs = check_block_map(dtype, "cpu", monkeypatch)
    if dtype != torch.bfloat16:
        assert all(torch.equal(a, b) for a, b in pairs)
        return
    ulp = dict(rtol=2**-7, atol=0)  # the interpreter's bfloat16 rounding: W and ∇ω within an ulp
    for a, b in pairs[:2]:
        torch.testing.assert_close(a, b, **ulp)
    g, inverse = torch.randn(4320, dtype=dtype), torch.randperm(4320).int()
    scale = torch.rand(4320, dtype=dtype)
    torch.testing.assert_close(
        fused_gpu.block_map(g, inverse, scale, "storage"), (g * scale).index_select(0, inverse), **ulp
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_block_map_is_the_torch_ops(dtype, monkeypatch):
    """On the GPU: the compiled block map's W, output and ∇ω are the torch ops' bit for bit."""
    assert all(torch.equal(a, b) for a, b in check_block_map(dtype, "cuda", monkeypatch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_converts(dtype, monkeypatch):
    """A float16/bfloat16 model converts: ω computed in float32 (torch's factorizations have no
    half kernels on a CPU), then rounded; never the raw weight left as ω, which torch's
    parametrize makes of a ``NotImplementedError`` from ``right_inverse`` (raised instead)."""
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 20), nn.ReLU(), nn.Linear(20, 5)
    )  # fmt: skip
    half = pomfx.convert(copy.deepcopy(ref).to(dtype), scheme="pio")
    full = pomfx.convert(copy.deepcopy(ref), scheme="pio")
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for (_, _, _, oh), (_, _, _, of) in zip(layers(half), layers(full), strict=True):
        assert oh.dtype == dtype and oh.shape == of.shape
        torch.testing.assert_close(oh.float(), of, rtol=0, atol=tol)
    assert max(pomfx.constraint_error(half).values()) < tol
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(half(x.to(dtype)).float(), full(x), rtol=0, atol=5 * tol)

    def missing(self, weight):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(pomfx.parametrization.POM, "omega_from_weight", missing)
    with pytest.raises(RuntimeError, match="could not compute ω from a"):
        pomfx.convert(copy.deepcopy(ref), scheme="pio")


@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 5, 3000), torch.float32), ((200, 3, 7), torch.float16), ((37, 150, 1), torch.float32),
     ((2100, 5, 1), torch.bfloat16), ((9, 4, 2), torch.float64)],
)  # fmt: skip
def test_triton_fold_channel_var_chunks_and_tiles(shape, dtype, monkeypatch):
    """:func:`pomfx.fused_gpu.fold_channel_var` on x (P, C, Q) whose chunks and tiles end part
    way: planes wider than a tile, many chunks of rows, several blocks of channels; the weight
    1/(seen + 1), then 0.1 (in float32), and ``seen`` counted on the device."""
    if not fused_gpu._interpreting():
        pytest.skip("Triton compiles for the GPU here")
    monkeypatch.setenv("POMFX_TRITON", "1")
    monkeypatch.setattr(fused_gpu, "_PROGRAMS", 16)  # fewer, longer chunks: the interpreter is slow
    g = torch.Generator().manual_seed(1)
    rv = torch.rand(shape[1], generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    expected, seen = rv.to(torch.float64, copy=True), torch.tensor(7)
    for i in range(3):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * (2 + i) - 300).to(dtype)
        assert fused_gpu.fold_usable(x, rv)
        fused_gpu.fold_channel_var(x, rv, seen, 0.1)
        w = float(max(np.float32(1) / np.float32(8 + i), np.float32(0.1)))  # float32, as torch's
        expected = expected + w * (x.double().var(dim=(0, 2), unbiased=False) - expected)
    assert int(seen) == 10
    torch.testing.assert_close(rv.double(), expected, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize(
    "shape,kw",
    [((24, 40, 1, 1), {}), ((12, 5, 1, 1), {"conv_groups": 3}), ((6, 4, 1, 1), {"transposed": True}),
     ((8, 2, 1), {"conv_groups": 2, "transposed": True}), ((40, 24), {"scheme": "po", "group_size": 5})],
)  # fmt: skip
def test_initial_scale_is_kappa_times_gamma(shape, kw, monkeypatch):
    """R = κγ at conversion, bit for bit, from the numba pass over a block layout's γ tables and
    from the torch product (POMFX_FUSED=0): plain, grouped, ConvTranspose weights."""
    lay = pomfx.layout.build_layout("w", shape, **kw)
    w = torch.randn(shape)
    made = pomfx.parametrization.POM(lay, weight=w)
    assert lay.gamma_tables is not None
    expected = torch.from_numpy(lay.gamma) * made.kappa
    assert made.scale.shape == expected.shape and torch.equal(made.scale, expected)
    monkeypatch.setenv("POMFX_FUSED", "0")
    assert torch.equal(pomfx.parametrization.POM(lay, weight=w).scale, expected)


def test_update_scales_commits_r_with_the_clamp():
    model = net()
    for _, _, pom, _ in layers(model):
        n = pom.running_var.numel()
        var = torch.linspace(1e-6, 1e3, n) ** 2  # some channels beyond the clamp on both sides
        pom.running_var.copy_(var)
        pom.num_batches_tracked.fill_(1)
    assert pomfx.update_scales(model) == len(list(layers(model)))
    for _, _, pom, _ in layers(model):
        lam = pom.running_var.sqrt()
        lam_hat = (lam / lam.mean()).clamp(*LAMBDA_CLAMP)
        torch.testing.assert_close(pom.scale, pom.kappa * pom.gamma / lam_hat[pom.in_channel])


def test_renorm_false_keeps_r_one():
    model = net(renorm=False)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    model.train()
    model(x)
    pomfx.update_scales(model)
    for _, _mod, pom, _omega in layers(model):
        assert torch.equal(pom.scale, torch.ones_like(pom.scale))
        assert int(pom.num_batches_tracked) == 0  # no statistics hook either


def test_state_dict_round_trip_and_layout_error():
    model = net()
    model.train()
    model(torch.randn(8, 3, 6, 6, dtype=torch.float64))
    pomfx.update_scales(model)
    sd = model.state_dict()
    twin = net()
    twin.load_state_dict(sd)
    for (k, a), b in zip(sd.items(), twin.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, k
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert torch.equal(model.eval()(x), twin.eval()(x))
    other = net(seed=1)
    with pytest.raises(RuntimeError, match="layout"):
        other.load_state_dict(sd)


def _train_step(model):
    opt = pomfx.FGSGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    model(torch.randn(8, 3, 6, 6, dtype=torch.float64)).square().mean().backward()
    opt.step()


def test_torch_save_and_deepcopy_are_independent():
    model = net()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    ref = model.eval()(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    dup = copy.deepcopy(model)
    for other in (loaded, dup):
        assert type(other[0]) is not type(model[0])  # each its own generated class
        torch.testing.assert_close(other.eval()(x), ref, rtol=0, atol=0)
        _train_step(other)  # trains its own weights and statistics
        pomfx.update_scales(other)
        pomfx.fold(other, inplace=True)  # and drops its parametrizations
        assert not any(isinstance(p, ComponentParameter) for p in other.parameters())
    assert torch.equal(model.eval()(x), ref)  # the original: untouched, still converted
    assert len(list(poms(model))) == len(list(layers(model))) > 0
    for _, _mod, pom, omega in layers(model):
        assert omega.pom is pom and int(pom.num_batches_tracked) == 0
    _train_step(model)  # and still trains
    assert max(pomfx.constraint_error(model).values()) < 1e-10


def test_buckets_and_constraint_error():
    model = net()
    for _, _, pom, omega in layers(model):
        total = 0
        for b, x in pom.buckets(omega.detach()):
            assert x.shape == (b.count, b.rows, b.cols)
            assert float(M.get(b.manifold).distance(x).max()) < 1e-12
            total += x.numel()
        assert total == omega.numel()


def _arrays(obj):
    """Every tensor and numpy array in nested containers, each storage once (a tensor made by
    ``torch.from_numpy`` shares its array's memory)."""
    if isinstance(obj, torch.Tensor):
        yield obj.data_ptr(), obj.nbytes
    elif isinstance(obj, np.ndarray):
        yield obj.__array_interface__["data"][0], obj.nbytes
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _arrays(o)
    elif isinstance(obj, dict):
        yield from _arrays(list(obj.values()))


def _nbytes(*objs) -> int:
    return sum(dict(a for o in objs for a in _arrays(o)).values())


@pytest.mark.parametrize("scheme", ["pi", "po", "pio"])
def test_a_block_layer_keeps_eight_bytes_per_weight_besides_omega(scheme):
    """Memory (the zoo's 645 M-weight models): after a forward, backward and FG-SGD step, a block
    layer's POM and layout hold R (4 bytes) and ``inverse`` (int32) per weight, plus per-block
    tables; γ, the input channels, ``index`` and 1/R² are never kept per element."""
    torch.manual_seed(0)
    m = pomfx.convert(nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 6)), scheme=scheme)
    opt = pomfx.FGSGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 96)).square().mean().backward()
    opt.step()
    pomfx.update_scales(m)
    m(torch.randn(4, 96)).square().mean().backward()
    opt.step()
    (_, mod, pom, omega), *_ = layers(m)
    assert not pom.layout.kernel
    n = omega.numel()
    lay = pom.layout
    held = _nbytes(dict(pom.named_buffers()), pom._cache, [lay.inverse, lay.gamma_tables, lay.scale_probes])
    assert held <= 8.5 * n, held / n  # per-block tables: a few bytes per block and channel
    assert 8 * n <= held  # R and inverse are there (the bound is not vacuous)


@pytest.mark.skipif(
    not pomfx.fused.enabled(), reason="the fused kernels are off here (POMFX_FUSED=0 or no numba)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    # kernels: tiles of 64 components and a remainder, or a remainder only
    "shape",
    [
        (12, 10, 3, 3),
        (20, 7, 3, 3),
        (6, 8, 1, 3),
        (9, 8, 1, 3),
        (5, 7, 1, 3),
        (6, 5, 4, 2),
        (8, 4, 5),
        (24, 40, 1, 1),
        (40, 24),
    ],
)
def test_fused_maps_equal_the_torch_ops(shape, dtype):
    """The one-pass CPU kernels of pomfx.fused against the torch ops they replace (those of CUDA
    and of POMFX_FUSED=0): omega_from_weight (kernels: divide, project, store; blocks: the
    gather of W / R) gives each component its manifold's ``project`` of ``W / R``, also where it
    must repair one (zero kernels, a zero column, rank-deficient and non-finite kernels); a block
    layer's forward scatter and backward gather are equal bit for bit."""
    torch.manual_seed(3)
    lay = pomfx.layout.build_layout("conv", shape, manifolds="sp+ob+st+euc")
    pom = pomfx.parametrization.POM(lay).to(dtype)
    pom.calibrate(torch.randn(shape, dtype=dtype))  # R varies between components
    w = torch.randn(shape, dtype=dtype)
    if lay.kernel:
        a, b = pom._shape
        assert pomfx.parametrization._fusable(w, a, b)
        k = w.view(-1, a * b)
        k[::5] = 0  # zero kernels (every manifold's fallback)
        k[1::5, : a * b : b] = 0  # a zero column (components stored tall: column 0 is every b-th entry)
        k[2::5] = k[2::5, :1] * torch.arange(1.0, a * b + 1, dtype=dtype)  # rank one
        k[3, 0] = float("nan")
    omega = pom.omega_from_weight(w).requires_grad_()
    fast_w = pom(omega)
    g = torch.randn(shape, dtype=dtype)
    (fast_g,) = torch.autograd.grad(fast_w, omega, g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pomfx.fused, "enabled", lambda: False)
        ref = pom.omega_from_weight(w)
        ref_w = pom(omega)
        (ref_g,) = torch.autograd.grad(ref_w, omega, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(omega.detach(), ref, rtol=0, atol=tol, equal_nan=True)
    torch.testing.assert_close(fast_w, ref_w, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fast_g, ref_g, rtol=0, atol=0)
    if lay.kernel:
        finite = torch.isfinite(omega.detach().view(a, b, -1)).all(0).all(0)
        assert (
            int(finite.sum()) >= finite.numel() - 1
        )  # at most the NaN kernel stays NaN (on st, as in torch)
    else:
        assert pom.constraint_error(omega) < 10 * tol


@pytest.mark.skipif(
    not pomfx.fused.enabled(), reason="the fused kernels are off here (POMFX_FUSED=0 or no numba)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((40, 24), {}),  # blocks stored with the weight's rows as rows
        ((24, 40), {}),  # stored transposed: 8-row tiles
        ((37, 70, 1, 1), {"group_size": 9}),  # unequal chunks, a partial tile
        ((70, 37), {"scheme": "po", "group_size": 20}),
        ((33, 50), {"scheme": "pi"}),
        ((36, 20, 1, 1), {"conv_groups": 3}),
        ((20, 18, 1, 1), {"conv_groups": 2, "transposed": True}),  # rows are input channels
        ((9, 200), {}),
    ],
    ids=str,
)
def test_block_maps_equal_the_permutation(shape, kw, dtype):
    """The row-by-row CPU kernels of a block layer (pomfx.fused.block_map: its forward W = R ⊙ ω,
    the backward R ⊙ ∇W and ω's W / R, in tiles and runs) equal the permutation through
    ``inverse`` bit for bit, for every scheme, conv groups, ConvTranspose and uneven chunks."""
    torch.manual_seed(4)
    lay = pomfx.layout.build_layout("lin", shape, **kw)
    pom = pomfx.parametrization.POM(lay).to(dtype)
    pom.calibrate(torch.randn(shape, dtype=dtype))
    s, inv = pom.scale.reshape(-1), pom.inverse.long()
    x = torch.randn(s.numel(), dtype=dtype)
    want = x.new_empty(x.shape).index_put_((inv,), x) * s
    assert torch.equal(pomfx.fused.block_map(x, lay.block_map, s, "weight"), want)
    assert torch.equal(pomfx.fused.block_map(x, lay.block_map, s, "storage"), (x * s)[inv])
    assert torch.equal(pomfx.fused.block_map(x, lay.block_map, s, "storage_div"), (x / s)[inv])


def test_a_block_layout_pickled_without_its_row_map_still_maps():
    """A block layout from a model pickled before ``Layout.block_map`` existed has none: its
    forward, backward and ω from W take the permutation through ``inverse`` instead, and agree."""
    torch.manual_seed(5)
    lay = pomfx.layout.build_layout("lin", (40, 24))
    pom = pomfx.parametrization.POM(lay)
    pom.calibrate(torch.randn(40, 24))
    w = torch.randn(40, 24)
    omega = pom.omega_from_weight(w).requires_grad_()
    out = pom(omega)
    (grad,) = torch.autograd.grad(out, omega, w)
    lay.block_map = None
    old = pom.omega_from_weight(w).requires_grad_()
    torch.testing.assert_close(old, omega.detach(), rtol=0, atol=1e-6)
    assert torch.equal(pom(omega), out)
    assert torch.equal(torch.autograd.grad(pom(omega), omega, w)[0], grad)


def _train_steps(model, batches, set_to_none=True, lr=0.05):
    opt = pomfx.FGSGD(model.parameters(), lr=lr, momentum=0.9)
    for x in batches:
        opt.zero_grad(set_to_none=set_to_none)
        model(x).square().mean().backward()
        opt.step()
    return model


@pytest.mark.skipif(
    not pomfx.fused.enabled(), reason="the fused kernels are off here (POMFX_FUSED=0 or no numba)"
)
def test_recycled_map_buffers_never_change_what_someone_holds():
    """A converted layer's weight W is written into the memory of its previous ∇W, and ∇ω into
    W's (pomfx.parametrization._Recycler), so a CPU step allocates no more than plain training,
    but only when nothing else holds that memory: weights and gradients a user or a graph keeps,
    accumulated and retained gradients, and ∇W kept by a hook are never overwritten."""
    torch.manual_seed(1)
    xs = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(4)]
    model = net()
    mods = [mod for _, mod, _, _ in layers(model)]
    # the steady state recycles: W of a step lives in the memory of the step before's ∇W
    ptrs = {}  # (layer, "W" or "dW") -> data pointers, step by step (no tensor is kept)

    def watch(i):
        def hook(_pom, _args, w):
            ptrs.setdefault((i, "W"), []).append(w.data_ptr())
            w.register_hook(lambda g: ptrs.setdefault((i, "dW"), []).append(g.data_ptr()))

        return hook

    handles = [mod.parametrizations.weight[0].register_forward_hook(watch(i)) for i, mod in enumerate(mods)]
    _train_steps(model, xs)
    for h in handles:
        h.remove()
    for i in range(len(mods)):
        w, dw = ptrs[i, "W"], ptrs[i, "dW"]
        assert w[1:] == dw[:-1], i  # every layer, from the second step on
    # kept weights, kept ∇W, kept gradients: unchanged by later steps
    held_w = [mod.weight for mod in mods]
    copies_w = [w.detach().clone() for w in held_w]
    kept_gw = []
    for w in [mod.weight for mod in mods]:
        w.register_hook(lambda g: kept_gw.append((g, g.clone())))
    model(xs[0]).square().mean().backward()
    kept_grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    _train_steps(model, xs[1:3])
    for w, c in zip(held_w, copies_w):
        assert torch.equal(w.detach(), c)
    for t, c in kept_gw + kept_grads:
        assert torch.equal(t, c)


@pytest.mark.skipif(
    not pomfx.fused.enabled(), reason="the fused kernels are off here (POMFX_FUSED=0 or no numba)"
)
def test_recycled_map_buffers_accumulate_and_retain_gradients():
    """Accumulated gradients (no zero_grad between backwards), a retained graph run twice,
    zero_grad(set_to_none=False), a layer used twice in one forward and a checkpointed forward
    give what the torch maps give (POMFX_FUSED=0: fresh tensors)."""
    torch.manual_seed(2)
    xs = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(3)]

    def grads(fused_on: bool):
        with pytest.MonkeyPatch.context() as mp:
            if not fused_on:
                mp.setenv("POMFX_FUSED", "0")
            model = net()
            for x in xs:  # accumulated
                model(x).square().mean().backward()
            loss = model(xs[0]).sum()
            loss.backward(retain_graph=True)
            loss.backward()
            acc = [p.grad.clone() for p in model.parameters()]
            trained = _train_steps(net(), xs, set_to_none=False)
            twice = net()  # a layer used twice in one forward, and a checkpointed forward
            conv = twice[2]
            h = twice[:2](xs[0])
            y = (
                conv(h)
                + conv(h.flip(-1))
                + torch.utils.checkpoint.checkpoint(conv, 2 * h, use_reentrant=False)
            )
            twice[3:](y).square().mean().backward()
            return acc, [p.detach().clone() for p in trained.parameters()] + [
                p.grad for p in twice.parameters()
            ]

    (acc, trained), (acc_ref, trained_ref) = grads(True), grads(False)
    for a, b in zip(acc + trained, acc_ref + trained_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
