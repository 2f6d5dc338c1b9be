"""Checkpoints: load_plain_state_dict, state_dict round trips, torch.save and deepcopy."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pomfx
from pomfx.renorm import poms


class Net(nn.Module):
    """conv, grouped conv, ConvTranspose, a functional weight, a tied pair and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.mix = nn.Parameter(torch.randn(6, 4) * 0.3)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.up(self.grouped(self.bn(self.conv(x)).relu()))
        x = F.linear(x.mean((2, 3)), self.mix)
        return self.fc(self.b(self.a(x).relu()))


def convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pomfx.convert(model, **kw)


def tensors_equal(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def snapshot(model) -> dict:
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return Net()


def test_converted_names(plain):
    c = convert(plain)
    assert sorted(f"{n}.{t}" if n else t for n, _, t, _ in poms(c)) == [
        "a.weight",
        "b.weight",
        "conv.weight",
        "grouped.weight",
        "mix",
        "up.weight",
    ]


def test_load_plain_equals_converting_the_checkpoint(plain):
    """Loading a plain checkpoint into a converted model gives exactly the conversion of the
    checkpoint's model: ω projected from the weights, κ recalibrated, λ reset."""
    torch.manual_seed(1)
    other = convert(Net())
    other.train()
    other(torch.randn(2, 3, 6, 6))  # λ statistics that the load must reset
    result = pomfx.load_plain_state_dict(other, plain.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert tensors_equal(other.state_dict(), convert(plain).state_dict())
    assert max(pomfx.constraint_error(other).values()) <= 1e-6
    assert other.a.parametrizations.weight.original is other.b.parametrizations.weight.original


def test_load_plain_from_fold_round_trip(plain):
    c = convert(plain).eval()
    x = torch.randn(2, 3, 6, 6)
    folded = pomfx.fold(c)
    torch.manual_seed(2)
    again = convert(Net()).eval()
    pomfx.load_plain_state_dict(again, folded.state_dict())
    torch.testing.assert_close(again(x), c(x), rtol=1e-5, atol=1e-6)


def test_strict_key_diff_changes_nothing(plain):
    c = convert(Net())
    before = snapshot(c)
    sd = plain.state_dict()
    del sd["bn.running_mean"], sd["up.weight"]
    sd["head.weight"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError) as e:
        pomfx.load_plain_state_dict(c, sd)
    msg = str(e.value)
    assert "nothing was loaded" in msg
    assert "missing from the checkpoint (2): ['bn.running_mean', 'up.weight']" in msg
    assert "unexpected in the checkpoint (1): ['head.weight']" in msg
    assert tensors_equal(c.state_dict(), before)


def test_non_strict_loads_the_rest_and_reports(plain):
    c = convert(Net())
    sd = plain.state_dict()
    del sd["conv.weight"]
    sd["extra"] = torch.ones(1)
    result = pomfx.load_plain_state_dict(c, sd, strict=False)
    assert result.missing_keys == ["conv.weight"] and result.unexpected_keys == ["extra"]
    ref = convert(plain).state_dict()
    mine = c.state_dict()
    assert torch.equal(
        mine["up.parametrizations.weight.original"], ref["up.parametrizations.weight.original"]
    )
    assert torch.equal(mine["bn.running_var"], ref["bn.running_var"])
    assert not torch.equal(
        mine["conv.parametrizations.weight.original"], ref["conv.parametrizations.weight.original"]
    )


@pytest.mark.parametrize("strict", [True, False])
def test_bad_shapes_and_values_always_raise_before_any_change(plain, strict):
    c = convert(Net())
    before = snapshot(c)
    sd = plain.state_dict()
    sd["grouped.weight"] = torch.zeros(8, 8, 3, 3)
    sd["bn.weight"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match="nothing was loaded") as e:
        pomfx.load_plain_state_dict(c, sd, strict=strict)
    assert "grouped.weight: checkpoint shape (8, 8, 3, 3), model shape (8, 4, 3, 3)" in str(e.value)
    assert "bn.weight: checkpoint shape (5,), model shape (8,)" in str(e.value)
    sd = plain.state_dict()
    sd["mix"] = torch.full((6, 4), float("nan"))
    with pytest.raises(RuntimeError, match="mix: non-finite"):
        pomfx.load_plain_state_dict(c, sd, strict=strict)
    assert tensors_equal(c.state_dict(), before)


def test_checkpoint_of_a_converted_model_gets_a_hint(plain):
    c = convert(plain)
    with pytest.raises(RuntimeError, match="checkpoint of a converted model: use model.load_state_dict"):
        pomfx.load_plain_state_dict(convert(Net()), c.state_dict())
    with pytest.raises(TypeError, match="mapping"):
        pomfx.load_plain_state_dict(c, [1, 2])


def test_state_dict_round_trip_is_exact(plain):
    c = convert(plain)
    c.train()
    c(torch.randn(2, 3, 6, 6))
    pomfx.update_scales(c)
    torch.manual_seed(5)
    d = convert(Net())
    d.load_state_dict(c.state_dict())
    assert tensors_equal(d.state_dict(), c.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(d.eval()(x), c.eval()(x))
    # a different layout is refused
    e = convert(Net(), seed=1)
    with pytest.raises(RuntimeError, match="layout"):
        e.load_state_dict(c.state_dict())


def test_torch_save_load_and_deepcopy(plain):
    c = convert(plain).eval()
    x = torch.randn(2, 3, 6, 6)
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    dup = copy.deepcopy(c)
    for m in (loaded, dup):
        assert isinstance(m, Net)
        assert torch.equal(m(x), c(x))
        assert tensors_equal(m.state_dict(), c.state_dict())
        assert m.a.parametrizations.weight.original is m.b.parametrizations.weight.original
        assert m.conv.parametrizations.weight.original is not c.conv.parametrizations.weight.original
        with pytest.raises(ValueError, match="already converted"):
            pomfx.convert(m)
