"""convert/plan: tracing paths, every conv/linear form, selection, defaults, and bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import pomfx
from pomfx.renorm import poms


def _state(model: nn.Module) -> dict:
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in model.state_dict().items()
    }


def assert_unchanged(model: nn.Module, cls: type, before: dict) -> None:
    assert type(model) is cls
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def max_error(model: nn.Module) -> float:
    """Largest constraint error over every converted tensor (several may share one module)."""
    return max(pom.constraint_error(m.parametrizations[t].original) for _, m, t, pom in poms(model))


class SmallNet(nn.Module):
    """stem conv (3 input channels) -> grouped conv -> 1x1 conv -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block(self.bn(self.stem(x)).relu())
        return self.fc(x.mean((2, 3)))


class FunctionalNet(nn.Module):
    """Parameters used through F.conv2d / F.conv_transpose2d / F.linear in its own forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.wt = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.2)  # (C_in, C_out/groups, k, k), groups=2
        self.lin = nn.Parameter(torch.randn(6, 4) * 0.3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.conv2d(x, self.w, padding=1).relu()
        x = F.conv_transpose2d(x, self.wt, groups=2)  # 4 output channels
        x = F.linear(x.mean((2, 3)), self.lin)
        return self.head(x)


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pomfx.convert(model, **kw)


# -- every conv and linear form ------------------------------------------------------------
def test_small_net_defaults_classifier_skipped_stem_converted():
    torch.manual_seed(0)
    model = SmallNet()
    p = pomfx.plan(model)
    rows = {r.name: r for r in p.rows}
    assert p.method == "fx" and not p.failures
    assert list(rows) == ["stem", "block.0", "block.2", "fc"]
    assert rows["stem"].convert  # first conv, 3 input channels: converted by default
    assert not rows["fc"].convert and "output layer" in rows["fc"].reason
    assert all(r.trace == "fx" for r in p.rows)
    c = _convert(model)
    assert isinstance(c, SmallNet) and parametrize.type_before_parametrizations(c) is SmallNet
    assert sorted(n for n, *_ in poms(c)) == ["block.0", "block.2", "stem"]
    c(torch.randn(2, 3, 8, 8)).sum().backward()
    assert max_error(c) <= 1e-6


FORMS = {
    "conv1d": (nn.Conv1d(4, 6, 3), (2, 4, 9)),
    "conv1d-grouped": (nn.Conv1d(4, 6, 3, groups=2), (2, 4, 9)),
    "conv2d-depthwise": (nn.Conv2d(6, 6, 3, groups=6), (2, 6, 7, 7)),
    "conv2d-1x5-grouped": (nn.Conv2d(4, 8, (1, 5), groups=4), (2, 4, 7, 7)),  # wide kernels
    "conv2d-1x1": (nn.Conv2d(4, 8, 1), (2, 4, 5, 5)),  # K = 1: block components
    "conv3d-grouped": (nn.Conv3d(4, 6, 3, groups=2), (2, 4, 5, 5, 5)),
    "convtranspose1d": (nn.ConvTranspose1d(4, 6, 3), (2, 4, 9)),
    "convtranspose2d-grouped": (nn.ConvTranspose2d(6, 4, 3, groups=2), (2, 6, 5, 5)),
    "convtranspose2d-1x1": (nn.ConvTranspose2d(4, 6, 1), (2, 4, 5, 5)),
    "convtranspose3d": (nn.ConvTranspose3d(4, 2, 3), (2, 4, 4, 4, 4)),
    "linear-3d-input": (nn.Linear(12, 5), (2, 3, 12)),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("scheme", ["pi", "po", "pio"])
def test_every_conv_and_linear_form(form, scheme):
    """Every form converts (the model is one layer: its only layer converts), runs forward and
    backward, and its POM groups never cross conv groups; λ reads the right channel dim."""
    torch.manual_seed(0)
    layer, x = FORMS[form]
    linear = isinstance(layer, nn.Linear)
    c = _convert(layer, scheme=scheme)
    (_, module, _, pom), *rest = list(poms(c))
    assert not rest
    ch = -1 if linear else 1
    view = [1] * len(x)
    view[ch] = -1
    inp = torch.randn(x) * torch.arange(1.0, x[ch] + 1).view(view)  # channels of distinct scales
    c(inp).square().sum().backward()
    assert module.parametrizations.weight.original.grad is not None
    assert max_error(c) <= 1e-6
    # λ: one entry per input channel (C_in, also for ConvTranspose), measured on the channel dim
    assert pom.running_var.shape == ((layer.in_features if linear else layer.in_channels),)
    dims = [d for d in range(inp.dim()) if d != ch % inp.dim()]
    torch.testing.assert_close(pom.running_var, inp.var(dim=dims, unbiased=False))
    _assert_groups_within_conv_groups(layer, pom)


def _assert_groups_within_conv_groups(layer, pom):
    """Every POM group's components lie in one conv group. ``layout.inverse`` maps storage
    positions to rows p·Q + q of the weight; p is the output channel of a conv and the input
    channel of a ConvTranspose, and in both cases p // (P / groups) is the conv group."""
    lay = pom.layout
    p, q = lay.weight_shape[:2]
    per_group = p // getattr(layer, "groups", 1)
    rows = torch.as_tensor(lay.inverse)
    pos = 0
    for b in lay.buckets:
        per = 1 if lay.kernel else b.rows * b.cols  # storage rows per component
        for size in b.group_sizes:
            r = rows[pos : pos + size * per]
            pos += size * per
            assert (r // q // per_group).unique().numel() == 1
    assert pos == len(rows)


def test_conv_transpose_roles_po_groups_share_an_output_channel():
    """ConvTranspose weights are (C_in, C_out/g, k...): ``po`` groups by output channel, i.e. by
    the weight's second dim, ``pi`` by input channel, the first dim."""
    layer = nn.ConvTranspose2d(4, 6, 3)
    for scheme, dim in (("po", 1), ("pi", 0)):
        pom = next(iter(poms(_convert(layer, scheme=scheme))))[3]
        rows = torch.as_tensor(pom.layout.inverse)
        p_idx, q_idx = rows // 6, rows % 6
        pos = 0
        for b in pom.layout.buckets:
            for size in b.group_sizes:
                idx = (p_idx, q_idx)[dim][pos : pos + size]
                assert idx.unique().numel() == 1, (scheme, idx)
                pos += size
        assert pom.running_var.numel() == 4  # λ over the C_in input channels


def test_functional_weights_are_converted_on_their_owner():
    torch.manual_seed(0)
    model = FunctionalNet()
    p = pomfx.plan(model)
    rows = {r.name: r for r in p.rows}
    assert rows["w"].type == "F.conv2d" and rows["w"].convert and rows["w"].trace == "fx"
    assert rows["wt"].type == "F.conv_transpose2d" and rows["wt"].conv_groups == 2 and rows["wt"].transposed
    assert rows["lin"].type == "F.linear" and rows["lin"].convert
    assert not rows["head"].convert  # the classifier
    c = _convert(model)
    assert isinstance(c, FunctionalNet)
    assert {t for _, _, t, _ in poms(c)} == {"w", "wt", "lin"}
    c.train()
    c(torch.randn(2, 3, 6, 6)).sum().backward()
    assert c.parametrizations.w.original.grad is not None
    assert max_error(c) <= 1e-6
    # no λ statistics for functional weights: R = κγ
    for _, _, _, pom in poms(c):
        assert int(pom.num_batches_tracked) == 0


def test_functional_weight_in_a_submodule_and_conv_weight_used_functionally():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 4, 3) * 0.3)

        def forward(self, x):
            return F.conv1d(x, self.kernel, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            x = self.block(x)
            x = F.conv1d(x, self.conv.weight, self.conv.bias, padding=1)  # module weight, used functionally
            return self.out(x.mean(-1))

    p = pomfx.plan(Net())
    names = {r.name: r for r in p.rows}
    assert names["block.kernel"].convert and names["block.kernel"].type == "F.conv1d"
    assert names["conv.weight"].convert and names["conv.weight"].module_name == "conv"
    c = _convert(Net())
    c(torch.randn(2, 4, 8)).sum().backward()
    assert max_error(c) <= 1e-6


def test_tied_weights_are_converted_once_and_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.b(self.a(x).relu()))

    torch.manual_seed(0)
    model = Tied()
    p = pomfx.plan(model)
    assert [r.name for r in p.converted] == ["a"]
    assert p.converted[0].tied == [("b", "weight")] and "tied with b.weight" in p.converted[0].note
    c = _convert(model)
    oa, ob = c.a.parametrizations.weight.original, c.b.parametrizations.weight.original
    assert oa is ob and c.a.parametrizations.weight[0] is c.b.parametrizations.weight[0]
    assert torch.equal(c.a.weight, c.b.weight)
    assert len(list(c.parameters())) == len(list(model.parameters()))
    c(torch.randn(3, 6)).sum().backward()
    assert oa.grad is not None
    d = copy.deepcopy(c)
    assert d.a.parametrizations.weight.original is d.b.parametrizations.weight.original
    # one Parameter used twice by the same module: one target
    shared = nn.Linear(4, 4)
    seq = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 1))
    assert [r.name for r in pomfx.plan(seq).converted] == ["0"]


def test_transformer_layers_found_by_per_submodule_tracing_and_walk():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(self.embed(x)).mean(1))

    p = pomfx.plan(Net())
    rows = {r.name: r for r in p.rows}
    assert rows["embed"].trace == "fx"
    assert rows["enc.self_attn.out_proj"].trace == "module walk"
    assert rows["enc.linear1"].convert and rows["enc.linear2"].convert
    assert "enc" in p.failures and p.method == "fx + module walk"
    c = _convert(Net())
    c(torch.randn(2, 4, 5)).sum().backward()
    assert max_error(c) <= 1e-6


# -- tracing fallbacks ---------------------------------------------------------------------
class Untraceable(nn.Module):
    """Data-dependent control flow at the top; one child traceable, one not, one ModuleList."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.gate = Gate()
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:  # fx cannot trace this
            x = -x
        x = self.gate(x).mean((2, 3))
        return [h(x) for h in self.heads]


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(x) if x.mean() > 0 else self.b(x)


def test_untraceable_model_falls_back_per_submodule_then_walk():
    model = Untraceable()
    with pytest.warns(UserWarning, match="torch.fx could not trace Untraceable"):
        p = pomfx.plan(model)
    rows = {r.name: r for r in p.rows}
    assert rows["features.0"].trace == rows["features.2"].trace == "submodule fx"
    assert rows["gate.a"].trace == rows["gate.b"].trace == "module walk"
    assert rows["heads.0"].trace == "module walk"
    assert set(p.failures) >= {"(model)", "gate", "heads"}
    assert p.method == "submodule fx + module walk"
    # heuristic output layer: the trailing run of conv/linear children of the last child
    assert not rows["heads.0"].convert and not rows["heads.1"].convert
    assert rows["gate.b"].convert and rows["features.2"].convert
    d = p.to_dict()
    assert d["method"] == p.method and {r["trace"] for r in d["layers"]} == {"submodule fx", "module walk"}
    c = _convert(model)
    c(torch.randn(2, 3, 8, 8))[0].sum().backward()
    assert max_error(c) <= 1e-6


def gate_fn(x):  # control flow: fx fails on it unless it is autowrapped (recorded as one call)
    return x if x.sum() > 0 else -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(gate_fn(self.conv(self.gate(x))).mean((2, 3)))


def test_tracer_options_leaf_modules_and_autowrap():
    Net = GatedNet
    with pytest.warns(UserWarning):
        assert "(model)" in pomfx.plan(Net()).failures
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = pomfx.plan(Net(), tracer_options={"leaf_modules": [Gate], "autowrap_functions": [gate_fn]})
    rows = {r.name: r for r in p.rows}
    assert not p.failures.get("(model)")
    assert rows["conv"].trace == "fx" and rows["gate.a"].trace == "module walk"
    p = pomfx.plan(Net(), tracer_options={"leaf_modules": "gate", "autowrap_functions": gate_fn})
    assert p.failures == {"gate": p.failures["gate"]}
    with pytest.raises(ValueError, match="unknown tracer option 'leafs'.*leaf_modules"):
        pomfx.plan(Net(), tracer_options={"leafs": [Gate]})


def test_module_not_called_in_forward_is_walked_and_noted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.spare = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.used(x).mean((2, 3)))

    rows = {r.name: r for r in pomfx.plan(Net()).rows}
    assert rows["spare"].trace == "module walk" and "not called" in rows["spare"].note
    assert rows["spare"].convert


def test_lazy_module_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyConv2d(4, 3), nn.Flatten(), nn.Linear(4, 2))
    rows = {r.name: r for r in pomfx.plan(model).rows}
    assert not rows["1"].convert and "lazy" in rows["1"].reason
    assert rows["0"].convert


# -- selection and configuration -------------------------------------------------------------
def test_include_exclude_overrides_precedence():
    model = SmallNet()
    # include selects only what it names, and lifts the classifier default
    p = pomfx.plan(model, include=["fc", "stem"])
    assert [r.name for r in p.converted] == ["stem", "fc"]
    assert {r.name: r.reason for r in p.skipped} == {
        "block.0": "not selected by include",
        "block.2": "not selected by include",
    }
    # exclude wins over include
    p = pomfx.plan(model, include=nn.Conv2d, exclude="block.*")
    assert [r.name for r in p.converted] == ["stem"]
    # callables
    p = pomfx.plan(
        model, exclude=lambda name, m: m.kernel_size == (1, 1) if isinstance(m, nn.Conv2d) else False
    )
    assert [r.name for r in p.converted] == ["stem", "block.0"]
    # overrides: module type < callable < glob < exact name, later keys win within a kind
    ov = {
        "block.0": {"scheme": "pi"},  # exact: wins for block.0 although listed first
        "block.*": {"scheme": "po", "group_size": 2},
        nn.Conv2d: {"scheme": "pio", "manifolds": "st"},
        (lambda n, m: n.startswith("block")): {"manifolds": "sp"},
    }
    rows = {r.name: r for r in pomfx.plan(model, overrides=ov).rows}
    assert (rows["stem"].scheme, rows["stem"].manifolds, rows["stem"].group_size) == ("pio", "st", None)
    assert (rows["block.0"].scheme, rows["block.0"].manifolds, rows["block.0"].group_size) == ("pi", "sp", 2)
    assert (rows["block.2"].scheme, rows["block.2"].manifolds) == ("po", "sp")
    rows = {
        r.name: r
        for r in pomfx.plan(model, overrides={"stem": {"scheme": "po"}, "s*": {"scheme": "pi"}}).rows
    }
    assert rows["stem"].scheme == "po"
    # an override never decides whether a layer converts
    rows = {r.name: r for r in pomfx.plan(model, overrides={"fc": {"manifolds": "sp"}}).rows}
    assert not rows["fc"].convert
    # overrides reach the layouts
    c = _convert(model, overrides={"block.2": {"scheme": "po", "manifolds": "st", "group_size": 4}})
    pom = dict((n, q) for n, _, _, q in poms(c))["block.2"]
    assert {b.manifold for b in pom.layout.buckets} == {"st"}
    assert all(b.cols == 4 for b in pom.layout.buckets)


def test_plan_table_and_dict_change_nothing():
    model = SmallNet()
    before = _state(model)
    p = pomfx.plan(model, exclude="block.2")
    assert_unchanged(model, SmallNet, before)
    text = str(p)
    header = text.splitlines()[0].split()
    assert header == [
        "layer",
        "type",
        "shape",
        "trace",
        "scheme",
        "manifolds",
        "groups",
        "comps",
        "params",
        "note",
    ]
    assert "skipped: excluded" in text and "skipped: output layer" in text
    assert "2 of 4 layers converted" in text and "traced by fx" in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["converted"] == 2 and d["method"] == "fx" and len(d["layers"]) == 4
    stem = d["layers"][0]
    assert stem["name"] == "stem" and stem["shape"] == [8, 3, 3, 3] and stem["params"] == 216
    assert stem["components"] == 24 and sum(stem["groups"].values()) >= 1
    assert d["params_converted"] == 216 + 16 * 4 * 9  # block.0 is grouped: 16×4×3×3


def test_single_linear_converts_and_design_example_orthonormal():
    """A model that is one Linear: its only layer converts although it is the output layer."""
    lin = nn.Linear(6, 3)
    p = pomfx.plan(lin)
    assert p.rows[0].convert and "no other layer" in p.rows[0].note
    c = _convert(lin, scheme="po", manifolds="st", group_size=3)
    w = c.weight / c.parametrizations.weight[0].scale
    torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3, 40), (40, 3), (7, 7)])
@pytest.mark.parametrize("group_size", [None, 1, 2, 64])
def test_stiefel_always_fits(shape, group_size):
    """Every component is stored tall, so Stiefel fits any shape and group_size (no error)."""
    c = _convert(nn.Linear(shape[1], shape[0]), scheme="po", manifolds="st", group_size=group_size)
    pom = next(iter(poms(c)))[3]
    assert all(b.rows >= b.cols for b in pom.layout.buckets)
    assert max_error(c) <= 1e-6
    k = _convert(nn.Conv2d(4, 4, (1, 7)), scheme="pio", manifolds="st", group_size=group_size)
    pom = next(iter(poms(k)))[3]
    assert all(b.rows >= b.cols for b in pom.layout.buckets) and max_error(k) <= 1e-6


# -- bad input: a clear error, the model unchanged ----------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"group_size": 0}, ValueError, "group_size must be >= 1"),
        ({"group_size": -3}, ValueError, "group_size must be >= 1"),
        ({"group_size": 2.5}, ValueError, "group_size must be a positive int"),
        ({"scheme": "pp"}, ValueError, "unknown scheme 'pp'; valid: pi, po, pio"),
        ({"manifolds": "sp+hyp"}, ValueError, "unknown manifold 'hyp'.*valid: sp, ob, st, euc"),
        (
            {"overrides": {"layer9.*": {"scheme": "po"}}},
            ValueError,
            "selector 'layer9.\\*' matches no conv/linear layer; layers: stem",
        ),
        ({"overrides": {nn.Conv3d: {"scheme": "po"}}}, ValueError, "matches no conv/linear layer"),
        ({"overrides": {"stem": {"schema": "po"}}}, ValueError, "keys among"),
        ({"overrides": {"stem": {"group_size": 0}}}, ValueError, "group_size must be >= 1"),
        ({"overrides": {"stem": {"scheme": "x"}}}, ValueError, "unknown scheme 'x'"),
        ({"include": "nothing_here"}, ValueError, "'nothing_here' matches no conv/linear layer"),
        ({"exclude": ["stem", "fc2"]}, ValueError, "'fc2' matches no conv/linear layer"),
        ({"include": 3}, TypeError, "a selector is a qualified-name glob"),
        ({"tracer_options": {"bogus": 1}}, ValueError, "unknown tracer option"),
    ],
)
def test_bad_input_raises_and_changes_nothing(kwargs, error, match):
    for inplace in (False, True):
        model = SmallNet()
        before = _state(model)
        with pytest.raises(error, match=match):
            pomfx.convert(model, inplace=inplace, **kwargs)
        with pytest.raises(error, match=match):
            pomfx.plan(model, **kwargs)
        assert_unchanged(model, SmallNet, before)


def test_non_module_is_refused():
    for bad in (None, "resnet18", torch.randn(3, 3), [nn.Linear(2, 2)]):
        with pytest.raises(TypeError, match="expects a torch.nn.Module, got"):
            pomfx.convert(bad)
        with pytest.raises(TypeError, match="expects a torch.nn.Module"):
            pomfx.plan(bad)


def test_already_converted_model_is_refused():
    c = _convert(SmallNet())
    before = _state(c)
    with pytest.raises(ValueError, match="already converted by pomfx.*pomfx.fold"):
        pomfx.convert(c)
    with pytest.raises(ValueError, match="already converted"):
        pomfx.convert(c, inplace=True)
    after = c.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))
    assert len(list(poms(c))) == 3
    pomfx.convert(pomfx.fold(c))  # fold first: converts again


def test_nothing_to_convert_comes_back_unchanged_with_a_warning():
    for model in (nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), SmallNet()):
        before = _state(model)
        cls = type(model)
        kw = {"exclude": nn.Conv2d} if isinstance(model, SmallNet) else {}
        with pytest.warns(UserWarning, match="nothing to convert in .*returned unchanged"):
            out = pomfx.convert(model, **kw)
        assert out is not model
        assert_unchanged(out, cls, before)
        assert_unchanged(model, cls, before)
        with pytest.warns(UserWarning, match="nothing to convert"):
            assert pomfx.convert(model, inplace=True, **kw) is model


def test_inplace_converts_the_model_itself():
    model = SmallNet()
    out = pomfx.convert(model, inplace=True)
    assert out is model and len(list(poms(model))) == 3


def test_layers_parametrized_by_something_else_are_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    torch.nn.utils.parametrizations.weight_norm(model[1])
    rows = {r.name: r for r in pomfx.plan(model).rows}
    assert not rows["1"].convert and "already parametrized" in rows["1"].reason
    assert rows["0"].convert
    c = _convert(model)
    assert [n for n, *_ in poms(c)] == ["0"]


def test_shape_reads_do_not_make_an_output_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.mean((2, 3))).view(y.size(0), y.shape[0] // y.shape[0], -1)

    rows = {r.name: r for r in pomfx.plan(Net()).rows}
    assert rows["conv"].convert and not rows["fc"].convert


def test_module_called_twice_is_an_output_layer_if_any_call_is():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.shared = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.shared(self.conv(self.shared(x)))

    rows = {r.name: r for r in pomfx.plan(Net()).rows}
    assert rows["conv"].convert and not rows["shared"].convert


def test_output_layer_default_for_conv_transpose_and_functional_weights():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 8, 3, stride=2)
            self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)  # the output layer

        def forward(self, x):
            return self.up(self.enc(x).relu())

    class FunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv1d(3, 4, 3)
            self.w = nn.Parameter(torch.randn(4, 2, 3))  # F.conv_transpose1d weight: the output layer

        def forward(self, x):
            return F.conv_transpose1d(self.enc(x).relu(), self.w)

    for model, head in ((Decoder(), "up"), (FunctionalHead(), "w")):
        rows = {r.name: r for r in pomfx.plan(model).rows}
        assert rows["enc"].convert and not rows[head].convert and "output layer" in rows[head].reason
        assert rows[head].convert is False and pomfx.plan(model, include=head).rows[-1].convert
