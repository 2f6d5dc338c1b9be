"""pomfx.fold: the converted model back as a plain one of the user's own classes (issue 5)."""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pomfx
from pomfx.parametrization import POM, ComponentParameter
from pomfx.renorm import lambda_hook


class Net(nn.Module):
    """Every kind of converted layer: 3×3, grouped, 1×1, 1-D and 3-D convs, two linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.point = nn.Conv2d(16, 24, 1)
        self.conv1d = nn.Conv1d(24, 8, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 4, (2, 3, 3), padding=1)
        self.hidden = nn.Linear(8 + 4, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.point(torch.relu(self.grouped(x))))
        a = self.conv1d(x.flatten(2)).mean(-1)
        b = self.conv3d(x[:, :1].unsqueeze(1)).mean((2, 3, 4))
        return self.head(torch.relu(self.hidden(torch.cat([a, b], 1))))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _pomfx_state(model: nn.Module) -> list[str]:
    """Anything of pomfx still in a model: parametrized modules, POMs, ω, hooks."""
    left = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m) or type(m).__module__ == parametrize.__name__:
            left.append(f"{name}: parametrized")
        if isinstance(m, POM):
            left.append(f"{name}: POM")
        if any(h is lambda_hook for h in m._forward_pre_hooks.values()):
            left.append(f"{name}: lambda hook")
    left += [n for n, p in model.named_parameters() if type(p) is not nn.Parameter]
    return left


@pytest.fixture(scope="module")
def plain() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def converted(plain, x) -> Net:
    """A converted Net with non-trivial scales R (λ statistics committed) and a changed ω."""
    model = pomfx.convert(plain, include=["conv1", "grouped", "point", "conv1d", "conv3d", "hidden", "head"])
    model.train()
    with torch.no_grad():
        model(x * torch.linspace(0.5, 3, 3).view(1, 3, 1, 1))  # uneven input channels: λ̂ ≠ 1
    assert pomfx.update_scales(model) == 7
    opt = pomfx.FGSGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


def _state_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_fold_copy_is_plain_and_exact(plain, converted, x):
    folded = pomfx.fold(converted)
    assert _pomfx_state(folded) == []
    assert [type(m) for m in folded.modules()] == [type(m) for m in plain.modules()]
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in plain.named_modules()]
    assert list(folded.state_dict()) == list(plain.state_dict())  # same keys, same order
    assert not folded.training  # modes are kept
    with torch.no_grad():
        assert _rel(folded(x), converted(x)) <= 1e-6
    # the folded weight is W = R ⊙ ω, the tensor the converted layer computes
    for name in ["conv1", "grouped", "point", "conv1d", "conv3d", "hidden", "head"]:
        assert torch.equal(folded.get_submodule(name).weight, converted.get_submodule(name).weight)


def test_folded_state_dict_loads_into_the_unconverted_model(plain, converted, x):
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(pomfx.fold(converted).state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(fresh.eval()(x), converted(x)) <= 1e-6


def test_fold_copy_never_affects_the_original(converted, x):
    before = _state_bytes(converted)
    with torch.no_grad():
        y = converted(x)
    folded = pomfx.fold(converted)
    assert _pomfx_state(converted) != []  # still converted
    originals = {p.untyped_storage().data_ptr() for p in converted.parameters()}
    originals |= {b.untyped_storage().data_ptr() for b in converted.buffers()}
    assert not any(p.untyped_storage().data_ptr() in originals for p in folded.parameters())
    # train the folded copy with plain SGD: the original must not move
    folded.train()
    opt = torch.optim.SGD(folded.parameters(), lr=0.1)
    folded(x).square().mean().backward()
    opt.step()
    after = _state_bytes(converted)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(converted(x), y)
    # the original's hooks still update its own statistics, and its generated classes still work
    converted.train()
    pom = converted.conv1.parametrizations.weight[0]
    n = int(pom.num_batches_tracked)
    converted(x)
    assert int(pom.num_batches_tracked) == n + 1
    converted.eval()
    assert isinstance(converted.conv1.parametrizations.weight.original, ComponentParameter)


def test_fold_inplace(plain, converted, x):
    with torch.no_grad():
        y = converted(x)
    out = pomfx.fold(converted, inplace=True)
    assert out is converted
    assert _pomfx_state(out) == []
    assert list(out.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert _rel(out(x), y) <= 1e-6
    # a plain model again: torch.save, deepcopy and conversion work as on any model
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))
    again = pomfx.convert(out, include=["conv1"])
    assert parametrize.is_parametrized(again.conv1)


def test_fold_keeps_the_users_hooks_attributes_and_sharing(x):
    torch.manual_seed(0)
    model = Net()
    model.twin = model.point  # one module reached twice
    model.point.note = "mine"
    calls = []
    model.point.register_forward_pre_hook(lambda m, a: calls.append(type(m).__name__))
    converted = pomfx.convert(model, include=["point"])
    for folded in (pomfx.fold(converted), pomfx.fold(copy.deepcopy(converted), inplace=True)):
        assert folded.twin is folded.point
        assert folded.point.note == "mine"
        calls.clear()
        with torch.no_grad():
            folded.eval()(x)
        assert calls == ["Conv2d"]
        assert _pomfx_state(folded) == []


def test_fold_keeps_requires_grad_and_a_foreign_parametrization(x):
    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    torch.manual_seed(0)
    model = Net()
    model.conv1d.weight.requires_grad_(False)
    converted = pomfx.convert(model, include=["conv1", "conv1d"]).eval()
    parametrize.register_parametrization(converted.conv1, "bias", Double())
    with torch.no_grad():
        y = converted(x)
    for inplace in (False, True):
        source = copy.deepcopy(converted) if inplace else converted
        folded = pomfx.fold(source, inplace=inplace)
        assert not folded.conv1d.weight.requires_grad and folded.conv1.weight.requires_grad
        assert type(folded.conv1.weight) is nn.Parameter
        assert list(folded.conv1.parametrizations) == ["bias"]  # the user's stays, pomfx's goes
        assert parametrize.type_before_parametrizations(folded.conv1) is nn.Conv2d
        with torch.no_grad():
            assert _rel(folded(x), y) <= 1e-6
    assert list(converted.conv1.parametrizations) == ["weight", "bias"]  # the original untouched
    with torch.no_grad():
        assert torch.equal(converted(x), y)


def test_fold_unconverted_model_and_bad_input(plain, x):
    out = pomfx.fold(plain)
    assert out is not plain and list(out.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(out.eval()(x), copy.deepcopy(plain).eval()(x))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pomfx.fold("resnet18")


@pytest.mark.slow
def test_fold_resnet50_budget():
    """DESIGN §4: fold resnet50 < 0.2 s, outputs equal to the converted model's (rel ≤ 1e-6)."""
    torchvision = pytest.importorskip("torchvision")
    converted = pomfx.convert(torchvision.models.resnet50()).eval()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        folded = pomfx.fold(converted)
        times.append(time.perf_counter() - t)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(folded.eval()(x), converted(x)) <= 1e-6
    assert sorted(times)[2] < 0.2, times
