"""pomfx.bounds (norms, power iteration, Table 2 bounds) and pomfx.report, against hand-computed values."""

import json
import math

import pytest
import torch
from torch import nn

import pomfx
from pomfx.bounds import BOUNDS, bounds, spectral_norm
from pomfx.report import report


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


# -- power iteration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(64, 576), (576, 64), (7, 300, 40), (1000, 3, 3), (50, 5, 1), (4, 1, 9), (2, 200, 200), (1, 130, 700)],
)
def test_power_iteration_matches_matrix_norm(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.linalg.matrix_norm(x, ord=2)
    got = spectral_norm(x)
    assert got.shape == ref.shape and got.dtype == torch.float64
    assert ((got - ref).abs() / ref).max() <= 1e-4


def test_power_iteration_hard_spectra():
    g = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(160, 150, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    for top in ([3.0, 3.0, 2.0], [3.0, 2.9999, 1.0], [1.0] * 150):  # repeated and near-equal top values
        s = torch.linspace(0.5, 0.1, 150, dtype=torch.float64)
        s[: len(top)] = torch.tensor(top, dtype=torch.float64)
        x = q1 @ torch.diag(s) @ q2.T
        assert abs(spectral_norm(x).item() - top[0]) / top[0] <= 1e-4
    eye = torch.eye(3).expand(10, 3, 3)  # Stiefel-like: every singular value 1
    assert torch.allclose(spectral_norm(eye), torch.ones(10, dtype=torch.float64))
    assert spectral_norm(torch.zeros(4, 6, 5)).abs().max() == 0  # zero matrices: 0, not nan
    assert spectral_norm(torch.randn(3, 4, 5, dtype=torch.float32)).dtype == torch.float64


# -- norms and bounds of a net whose values are known by hand -----------------------------------
def two_layer():
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0, 2.0]]))
    return net


def test_two_layer_norms_by_hand():
    b = bounds(two_layer(), 100)
    l1, l2 = b.layers
    assert (l1.name, l1.type, l1.shape, l1.converted) == ("0", "Linear", (3, 2), False)
    # ‖W1‖_F = 5, ‖W1‖_σ = 4, rows 3, 4, 0; ‖W2‖_F = ‖W2‖_σ = 3 = its only row
    assert (l1.frobenius, l1.two_one, l2.frobenius, l2.two_one) == pytest.approx((5, 7, 3, 3), rel=1e-12)
    assert (l1.spectral, l2.spectral) == pytest.approx((4, 3), rel=1e-9)
    assert l1.two_one_grouped == l1.two_one and l1.groups is None  # plain layer: groups are output units
    for layer, net_layer in zip(b.layers, (two_layer()[0], two_layer()[2])):
        w = net_layer.weight.double()
        assert layer.frobenius == pytest.approx(torch.linalg.matrix_norm(w).item(), rel=1e-12)
        assert layer.spectral == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-9)
        assert layer.two_one == pytest.approx(w.norm(dim=1).sum().item(), rel=1e-12)


def test_two_layer_bounds_by_hand():
    n, L, h = 100, 2, 3  # h = max(3, 2, 1, 3)
    b = bounds(two_layer(), n)
    assert (b.depth, b.width, b.n_samples) == (L, h, n)
    frob = 2**L * 5 * 3 / math.sqrt(n)  # Neyshabur 2015: 2^L ∏‖W‖_F / √n
    spectral = (
        math.log(h) * 4 * 3 * ((7 / 4) ** (2 / 3) + (3 / 3) ** (2 / 3)) ** 1.5 / math.sqrt(n)
    )  # Bartlett
    pac = math.sqrt(L**2 * h * math.log(L * h) * 16 * 9 * (25 / 16 + 9 / 9) / n)  # Neyshabur 2018
    want = {"frobenius": frob, "spectral": spectral, "pac_bayes": pac}
    assert b.values == pytest.approx(want, rel=1e-9)
    assert b.standard == pytest.approx(want, rel=1e-9)  # plain model: grouped form == standard form
    assert b.log10 == pytest.approx({k: math.log10(v) for k, v in want.items()}, rel=1e-9)
    # margin γ and input norm B scale every bound by B/γ
    b2 = bounds(two_layer(), n, margin=2.0, input_norm=3.0)
    assert b2.values == pytest.approx({k: v * 1.5 for k, v in want.items()}, rel=1e-9)


def test_zero_layer_gives_zero_bounds():
    net = two_layer()
    with torch.no_grad():
        net[2].weight.zero_()
    b = bounds(net, 10)
    assert all(v == 0.0 for v in b.values.values())


# -- converted models: effective weights and groups ------------------------------------------------
def test_converted_uses_effective_weights_and_groups_partition():
    model = pomfx.convert(small_cnn())
    b = bounds(model, 1000)
    converted = [r for r in b.layers if r.converted]
    assert [r.name for r in converted] == ["0", "3", "6"] and not b.layers[-1].converted
    for r in converted:
        m = model.get_submodule(r.name)
        w = m.weight.detach().double().reshape(m.weight.shape[0], -1)  # W = R ⊙ ω
        assert r.frobenius == pytest.approx(torch.linalg.matrix_norm(w).item(), rel=1e-9)
        assert r.spectral == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-4)
        assert r.two_one == pytest.approx(w.norm(dim=1).sum().item(), rel=1e-9)
        g = r.groups
        pom = m.parametrizations.weight[0]
        assert len(g) == pom.layout.n_groups and sum(g.components) == pom.layout.n_components
        assert math.sqrt(sum(f * f for f in g.frobenius)) == pytest.approx(r.frobenius, rel=1e-9)
        assert r.two_one_grouped == pytest.approx(sum(g.frobenius), rel=1e-12)
        assert all(s <= f * (1 + 1e-9) for s, f in zip(g.spectral, g.frobenius))
    assert all(math.isfinite(v) for v in [*b.log10.values(), *b.standard_log10.values()])
    assert b.log10["frobenius"] == pytest.approx(b.standard_log10["frobenius"])  # exact in grouped form
    assert b.log10["pac_bayes"] == pytest.approx(b.standard_log10["pac_bayes"])


@pytest.mark.parametrize("manifold", ["sp", "ob", "st"])
def test_group_norms_are_what_the_manifold_fixes(manifold):
    """renorm=False (R = 1): sp components have ‖ω‖_F = 1, ob unit columns, st ‖ω‖_σ = 1."""
    model = pomfx.convert(small_cnn(), manifolds=manifold, renorm=False)
    b = bounds(model, 10)
    for r in b.layers[:2]:  # the 3×3 convs: 3×3 components
        g = r.groups
        assert set(g.manifold) == {manifold}
        comps = torch.tensor(g.components, dtype=torch.float64)
        fro, spec, two_one = (
            torch.tensor(v, dtype=torch.float64) for v in (g.frobenius, g.spectral, g.two_one)
        )
        if manifold == "sp":
            assert torch.allclose(fro**2, comps, rtol=1e-5)
        elif manifold == "ob":
            assert torch.allclose(two_one, 3 * comps, rtol=1e-5)
        else:
            assert torch.allclose(spec, torch.ones_like(spec), rtol=1e-5)
            assert torch.allclose(fro**2, 3 * comps, rtol=1e-5)


def test_po_groups_are_output_units():
    """With po and K > 1 a group is one output channel: the grouped (2,1) norm is Bartlett's."""
    model = pomfx.convert(small_cnn(), scheme="po")
    for r in bounds(model, 10).layers[:2]:
        assert r.two_one_grouped == pytest.approx(r.two_one, rel=1e-9)


def test_output_prints_and_serializes():
    b = bounds(pomfx.convert(small_cnn()), 500)
    text = str(b)
    for paper in BOUNDS.values():
        assert paper in text
    assert "sp:" in text and "units" in text
    d = json.loads(json.dumps(b.to_dict()))
    assert set(d["bounds"]) == set(BOUNDS) and len(d["layers"]) == 4
    assert d["layers"][0]["groups"]["manifold"] and d["layers"][-1]["groups"] is None


def test_conv_transpose_rows_are_output_channels():
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    b = bounds(net, 10)
    assert b.layers[0].shape == (6, 36) and b.layers[1].shape == (2, 6)


def test_bad_input():
    with pytest.raises(ValueError, match="n_samples"):
        bounds(two_layer(), 0)
    with pytest.raises(TypeError, match="Module"):
        bounds("model", 10)
    with pytest.raises(ValueError, match="no conv or linear"):
        bounds(nn.Sequential(nn.ReLU()), 10)
    with pytest.raises(ValueError, match="margin"):
        bounds(two_layer(), 10, margin=0)


# -- report -------------------------------------------------------------------------------------
def test_report_of_converted_model():
    model = pomfx.convert(small_cnn(), group_size=4)
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(8, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    pomfx.update_scales(model)
    rep = report(model)
    assert [r.name for r in rep.layers] == ["0", "3", "6"] and rep.skipped == ["10"]
    r = rep.layers[1]
    assert (r.scheme, r.manifolds, r.group_size, r.renorm) == ("pio", "sp+ob+st", 4, True)
    assert set(r.groups) == {"sp", "ob", "st"} and r.components == 16 * 8 and r.component_shapes == ["3×3"]
    assert r.batches == 3 and r.kappa > 0 and r.scale[0] <= r.scale[1] <= r.scale[2]
    assert r.lambda_hat is not None and 0.1 <= r.lambda_hat[0] <= r.lambda_hat[2] <= 10
    assert rep.max_residual <= 1e-5
    assert rep.max_residual == pytest.approx(max(pomfx.constraint_error(model).values()))
    text = str(rep)
    assert "residual" in text and "sp:" in text and "not converted: 10" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["layers"][0]["scale"]["mean"] > 0 and d["params_converted"] < d["params"]


def test_report_renorm_off_and_plain():
    rep = report(pomfx.convert(small_cnn(), renorm=False))
    assert all(r.lambda_hat is None and r.scale == (1.0, 1.0, 1.0) for r in rep.layers)
    assert "renorm off" in str(rep)
    plain = report(small_cnn())
    assert plain.layers == [] and plain.params_converted == 0 and len(plain.skipped) == 4
