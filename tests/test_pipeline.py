"""The end-to-end path of issue 2: convert -> FGSGD -> constraints -> fold -> ONNX, on real models."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import pomfx

ROOT = Path(__file__).resolve().parents[1]


def _digits():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_resnet18_convert_train_fold_export(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    converted = pomfx.convert(model, scheme="pio")
    assert type(converted) is type(model)
    assert len(pomfx.constraint_error(converted)) == 20  # every conv; the classifier is skipped

    opt = pomfx.FGSGD(converted.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 10, (4,))
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(converted(x), y).backward()
        opt.step()
    pomfx.update_scales(converted)
    errors = pomfx.constraint_error(converted)
    assert max(errors.values()) <= 1e-5, errors

    converted.eval()
    plain = pomfx.fold(converted)
    assert set(plain.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        ref = converted(x)
        assert torch.allclose(plain(x), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())

    report = pomfx.export_onnx(converted, tmp_path / "resnet18.onnx", (x,), verify=True)
    assert report.max_rel_error <= 1e-5
    assert (tmp_path / "resnet18.onnx").is_file()


def test_digits_fgsgd_matches_plain_sgd_with_the_same_hyperparameters():
    """DESIGN §1 "Step size": FGSGD given SGD's exact hyperparameters must train as well.

    The full demo (12 epochs, 3 seeds) gives the same mean error for both; here a shorter run
    pins it: pomfx's mean test error over 3 seeds at most 0.5 points above plain SGD's.
    """
    digits = _digits()
    cfg = digits.Config(epochs=4)
    plain, pom = [], []
    for seed in range(3):
        p, c, model = digits.run_pair(seed, cfg)
        plain.append(p)
        pom.append(c)
        assert max(pomfx.constraint_error(model).values()) <= 1e-5
    assert statistics.mean(pom) <= statistics.mean(plain) + 0.5, (plain, pom)


def test_naive_step_is_what_the_mapping_fixes():
    """Without stage (ii) (R = 1) the same lr barely moves the unit-norm kernels: worse error.

    This is the failure DESIGN §1 measured; it shows the lr mapping is doing the work above.
    """
    digits = _digits()
    cfg = digits.Config(epochs=4)
    p, c, _ = digits.run_pair(0, cfg, renorm=False)
    assert c > p + 0.5


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"scheme": "pix"}, ["pix", "pi", "po", "pio"]),
        ({"manifolds": "sp+torus"}, ["torus", "sp", "ob", "st", "euc"]),
        ({"manifolds": ""}, ["sp", "ob", "st", "euc"]),
    ],
)
def test_bad_scheme_or_manifold_is_a_clear_error_and_changes_nothing(kwargs, words):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for inplace in (False, True):
        with pytest.raises(ValueError) as err:
            pomfx.convert(model, inplace=inplace, **kwargs)
        for w in words:
            assert w in str(err.value)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert not any(hasattr(m, "parametrizations") for m in model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
