"""Properties of every manifold (geoopt's test_manifold_basic style), over several shapes and
both float dtypes, plus pymanopt's Taylor check of retraction + Riemannian gradient."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from pomfx import manifolds as M

NAMES = ["sp", "ob", "st", "euc"]
SHAPES = [
    (50, 3, 3),  # a batch of 3x3 kernels
    (4, 16, 5),  # tall blocks
    (2, 64, 12),  # Stiefel with B > 8: the Cholesky-QR2 path
    (7, 5, 1),  # k x 1 columns
    (2, 3, 9, 3),  # two leading batch dims (3-D kernels as 9x3)
]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}  # "is zero", for O(1) quantities


def _gen(*key) -> torch.Generator:
    """A generator seeded by ``key`` the same way in every process (``hash`` of a str is not:
    PYTHONHASHSEED randomises it, and the tests drew different matrices in each run)."""
    return torch.Generator().manual_seed(
        zlib.crc32(repr(key).encode()) + int(os.environ.get("POMFX_TEST_SEED", 0))
    )


def _randn(shape, dtype, *key):
    return torch.randn(shape, generator=_gen(*key), dtype=torch.float64).to(dtype)


def _point(name, shape, dtype):
    return M.get(name).project(_randn(shape, dtype, name, shape, "point"))


def _tangent(name, x, scale=1.0, key="t"):
    """A tangent vector at x whose every component has Frobenius norm ``scale``."""
    v = M.get(name).proj_tangent(x, _randn(x.shape, x.dtype, name, tuple(x.shape), key))
    return v * (scale / torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True))


def _normal_part(name, x, v):
    """The part of v that a tangent vector at x must not have (zero iff v is tangent)."""
    if name == "sp":
        return (x * v).sum((-2, -1))
    if name == "ob":
        return (x * v).sum(-2)  # diag(xᵀv)
    if name == "st":
        s = x.transpose(-1, -2) @ v
        return s + s.transpose(-1, -2)
    return torch.zeros(())


def _inner(a, b):
    return float((a.double() * b.double()).sum())


cases = pytest.mark.parametrize("name", NAMES)
shapes = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])


@cases
@shapes
@dtypes
def test_project_lands_on_manifold_and_is_idempotent(name, shape, dtype):
    m = M.get(name)
    x = m.project(_randn(shape, dtype, name, shape))
    assert x.shape == shape and x.dtype == dtype
    assert float(m.distance(x).max()) <= TOL[dtype]
    assert torch.allclose(m.project(x), x, atol=10 * TOL[dtype], rtol=0)


@cases
@shapes
@dtypes
@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 10.0])
def test_retract_lands_on_manifold(name, shape, dtype, scale):
    m = M.get(name)
    x = _point(name, shape, dtype)
    y = m.retract(x, _tangent(name, x, scale))
    assert y.shape == shape and torch.isfinite(y).all()
    assert float(m.distance(y).max()) <= TOL[dtype]
    if scale <= 0.1:  # first order: R_x(ξ) = x + ξ + O(‖ξ‖²)
        xi = _tangent(name, x, scale)
        gap = torch.linalg.vector_norm(y - x - xi, dim=(-2, -1))
        assert float(gap.max()) <= 2 * scale**2 + 10 * TOL[dtype]


@cases
@shapes
@dtypes
def test_retract_of_zero_is_identity(name, shape, dtype):
    m = M.get(name)
    x = _point(name, shape, dtype)
    assert torch.allclose(m.retract(x, torch.zeros_like(x)), x, atol=10 * TOL[dtype], rtol=0)


@cases
@shapes
@dtypes
def test_proj_tangent_is_idempotent_and_tangent(name, shape, dtype):
    m = M.get(name)
    x = _point(name, shape, dtype)
    g = _randn(shape, dtype, name, shape, "g") * 3
    v = m.proj_tangent(x, g)
    tol = 10 * TOL[dtype]
    assert float(_normal_part(name, x, v).abs().max()) <= tol
    assert torch.allclose(m.proj_tangent(x, v), v, atol=tol, rtol=0)
    # an orthogonal projection: g - v is orthogonal to every tangent vector
    w = _tangent(name, x, key="w")
    assert abs(_inner(g - v, w)) <= tol * math.sqrt(w.numel())
    if name == "euc":
        assert torch.equal(v, g)


@cases
@shapes
@dtypes
def test_transport_is_tangent_at_the_new_point(name, shape, dtype):
    m = M.get(name)
    x = _point(name, shape, dtype)
    y = m.retract(x, _tangent(name, x, 0.5))
    u = m.transport(y, _tangent(name, x, 1.0, key="u"))
    assert float(_normal_part(name, y, u).abs().max()) <= 10 * TOL[dtype]


@cases
@shapes
@dtypes
def test_distance_zero_on_and_positive_off_the_manifold(name, shape, dtype):
    m = M.get(name)
    x = _point(name, shape, dtype)
    d = m.distance(x)
    assert d.shape == shape[:-2]
    assert float(d.max()) <= TOL[dtype]
    off = m.distance(1.5 * x)
    if name == "euc":
        assert float(off.max()) == 0.0  # every matrix is on R^{A×B}
    else:
        assert float(off.min()) > 0.1
    if name == "st" and shape[-1] > 1:  # orthonormal columns, but not orthogonal to each other
        y = x.clone()
        y[..., :, 1] = (x[..., :, 0] + x[..., :, 1]) / math.sqrt(2)
        assert float(m.distance(y).min()) > 0.1


@cases
@pytest.mark.parametrize("shape", [(50, 3, 3), (4, 16, 5), (2, 64, 12), (2, 3, 9, 3)], ids=str)
def test_taylor_slope_of_retraction_and_riemannian_gradient(name, shape):
    """pymanopt's check: with Riemannian gradient Π_x(G) and a retraction R,
    |f(R_x(tξ)) − f(x) − t⟨Π_x(G), ξ⟩| = O(t²): slope 2 in log-log."""
    dtype = torch.float64
    m = M.get(name)
    a = _randn(shape, dtype, "A", shape)
    c = _randn(shape, dtype, "C", shape).abs() + 2  # a clearly convex quadratic part: the O(t²)
    # term must not cancel out over the components, so that it dominates the O(t³) one

    def f(x):  # ⟨A, x⟩ + ½‖√C ⊙ x‖² + Σ x³/30: smooth, not constant on any of the manifolds
        return float((a * x).sum() + 0.5 * (c * x * x).sum() + (x**3).sum() / 30)

    x = _point(name, shape, dtype)
    grad = a + c * x + x * x / 10  # Euclidean gradient of f
    rgrad = m.proj_tangent(x, grad)
    xi = _tangent(name, x, 1.0, key="xi")
    ts = torch.logspace(-4, -2, 12, dtype=dtype)  # the O(t²) regime: the O(t³) term steepens larger t
    errs = [abs(f(m.retract(x, t * xi)) - f(x) - float(t) * _inner(rgrad, xi)) for t in ts]
    slope = torch.linalg.lstsq(
        torch.stack([ts.log(), torch.ones_like(ts)], 1), torch.tensor(errs, dtype=dtype).log()[:, None]
    ).solution[0, 0]
    assert 1.8 <= float(slope) <= 2.2, (float(slope), errs)


@pytest.mark.parametrize("shape", [(50, 3, 3), (4, 16, 5), (2, 64, 12), (7, 5, 1), (3, 40, 40)], ids=str)
@dtypes
def test_stiefel_retract_is_the_q_factor_with_positive_r(shape, dtype):
    x = _point("st", shape, dtype)
    y = x + _tangent("st", x, 0.7)
    q, r = torch.linalg.qr(y)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    tol = 50 * TOL[dtype]
    assert torch.allclose(M.Stiefel.retract(x, y - x), q, atol=tol, rtol=0)
    # project uses the same Q factor on full-rank input
    z = _randn(shape, dtype, "z", shape)
    qz, rz = torch.linalg.qr(z)
    qz = qz * torch.sign(torch.diagonal(rz, dim1=-2, dim2=-1)).unsqueeze(-2)
    assert torch.allclose(M.Stiefel.project(z), qz, atol=1e3 * TOL[dtype], rtol=0)


def _degenerate(shape, dtype):
    """Zero matrices, rank-one ones, zero and repeated columns, a column covered by the previous
    ones, tiny and huge scales: one batch."""
    a, b = shape
    g = _randn((9, a, b), dtype, "degenerate", shape)
    out = torch.zeros(9, a, b, dtype=dtype)
    out[1] = g[1, :, :1] * torch.ones(1, b, dtype=dtype)  # rank one, every column equal
    out[2] = g[2]
    out[2, :, b // 2] = 0  # one zero column
    out[3] = g[3]
    out[3, :, -1] = out[3, :, 0]  # a repeated column
    out[4, 0, 0] = 1.0  # e_0, then zero columns: their replacement must avoid e_0
    out[5] = g[5] * 1e-12  # tiny but full rank
    out[6] = g[6] * 1e12
    out[7, :, 0] = g[7, :, 0]
    if b > 1:
        out[7, :, 1] = 2 * g[7, :, 0] + 1e-9 * g[7, :, 1]  # numerically rank deficient
    out[8] = g[8]
    return out


@cases
@pytest.mark.parametrize("shape", [(3, 3), (5, 1), (9, 3), (16, 5), (64, 12), (12, 12)], ids=str)
@dtypes
def test_project_handles_zero_and_rank_deficient_input(name, shape, dtype):
    m = M.get(name)
    x = _degenerate(shape, dtype)
    p = m.project(x)
    assert not p.isnan().any()
    assert float(m.distance(p).max()) <= TOL[dtype]
    if name != "euc":  # a full-rank matrix is projected as usual
        assert torch.allclose(p[8], m.project(x[8:9])[0], atol=10 * TOL[dtype], rtol=0)
    y = x.clone()
    assert m.project_(y) is y  # in place, the same result (with or without the repairs)
    torch.testing.assert_close(y, p, rtol=0, atol=0)
    y = x[8:].clone()
    torch.testing.assert_close(m.project_(y), m.project(x[8:]), rtol=0, atol=0)


@cases
@pytest.mark.parametrize("shape", [(40, 3, 3), (3, 40, 3), (2, 40, 12)], ids=str)
def test_batched_equals_one_at_a_time(name, shape):
    """The batched code paths (structure-of-arrays for many small matrices, column-wise for a
    few tall ones) give every matrix the result it gets alone."""
    m = M.get(name)
    x = _randn(shape, torch.float64, name, shape, "batch")
    p = m.project(x)
    xi = _tangent(name, p, 0.3)
    y = m.retract(p, xi)
    for i in range(shape[0]):
        assert torch.allclose(m.project(x[i : i + 1]), p[i : i + 1], atol=1e-12, rtol=0)
        assert torch.allclose(m.retract(p[i : i + 1], xi[i : i + 1]), y[i : i + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["sp", "ob", "st"])
@pytest.mark.parametrize("shape", [(30, 3, 3), (10, 16, 5), (3, 64, 12), (7, 5, 1)], ids=str)
def test_gamma_bounds_frobenius_and_spectral_norms(name, shape):
    m = M.get(name)
    b = shape[-1]
    assert m.gamma(b) == pytest.approx({"sp": 1.0, "ob": b**-0.5, "st": b**-0.5}[name])
    x = m.gamma(b) * _point(name, shape, torch.float64)
    fro = torch.linalg.matrix_norm(x, "fro")
    spec = torch.linalg.matrix_norm(x, 2)
    assert float(fro.max()) <= 1 + 1e-12 and float(spec.max()) <= 1 + 1e-12
    assert float(fro.min()) >= 1 - 1e-12  # the bound is tight: γ is the largest such scale
    assert M.get("euc").gamma(b) == 1.0


@cases
@dtypes
def test_random_lands_on_manifold_and_is_seeded(name, dtype):
    m = M.get(name)
    a = m.random((6, 9, 3), generator=torch.Generator().manual_seed(3), dtype=dtype)
    b = m.random((6, 9, 3), generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert a.dtype == dtype and torch.equal(a, b)
    assert float(m.distance(a).max()) <= TOL[dtype]


def test_get_names_the_valid_manifolds():
    assert M.get("st") is M.Stiefel and set(M.MANIFOLDS) == set(NAMES)
    with pytest.raises(ValueError, match="sp, ob, st, euc"):
        M.get("grassmann")


def test_stiefel_refuses_wide_matrices():
    with pytest.raises(ValueError, match="A >= B"):
        M.Stiefel.project(torch.randn(2, 3, 5))


@pytest.mark.parametrize("name", ["sp", "ob", "st"])
def test_large_components_stay_on_the_manifold_in_float32(name):
    """A 2048×1024 component (a block of a Linear layer): fp32 sums over millions of elements
    must not drift off the manifold (a lane-accumulated norm was off by 2.4e-5 here)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 2048, 1024), generator=g) - 0.5
    man = M.get(name)
    y = man.project(x)
    assert float(man.distance(y.double()).max()) <= 2e-6
    xi = man.proj_tangent(y, 1e-3 * torch.randn(y.shape, generator=g))
    assert float(man.distance(man.retract(y, xi).double()).max()) <= 2e-6
