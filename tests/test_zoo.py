"""torchvision's zoo under pomfx (see tests/zoo_report.py for the sizes and the report).

By default a fast subset: a classification, a mobile, a segmentation and a video model, and a
detection model through the fallback tracing paths. ``make test-zoo`` (``-m zoo``) runs every
classification, segmentation, video and detection model, each in its own subprocess.
"""

from __future__ import annotations

import warnings

import pytest
import zoo_report as zoo

import pomfx

FAST = ["resnet18", "mobilenet_v3_small", "lraspp_mobilenet_v3_large", "mc3_18"]


@pytest.mark.parametrize("name", FAST)
def test_fast_subset_converts_runs_and_keeps_constraints(name):
    # raises on any failure, constraint_error included; one FGSGD step on resnet18 only (budget)
    row = zoo.check_model(name, step=name == "resnet18")
    assert row["path"] == "fx" and row["fx_failures"] == 0
    assert row["converted"] >= 1 and row["converted"] == row["layers"] - len(row["skipped"])
    assert all("output layer" in why for why in row["skipped"].values())
    assert row["no_grad"] == 0


def test_detection_converts_through_the_fallback_paths():
    model, _ = zoo.build("ssdlite320_mobilenet_v3_large", "detection")
    with pytest.warns(UserWarning, match="torch.fx could not trace SSD"):
        p = pomfx.plan(model)
    assert "(model)" in p.failures and p.method.startswith("submodule fx")
    assert len(p.converted) >= len(p.rows) - 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = pomfx.convert(model, inplace=True)
    assert len(pomfx.constraint_error(c)) == len(p.converted)
    assert max(pomfx.constraint_error(c).values()) <= zoo.TOLERANCE


ALL = [(family, name) for family in zoo.FAMILIES for name in zoo.models(family)]


@pytest.mark.zoo
@pytest.mark.parametrize("family, name", ALL, ids=[n for _, n in ALL])
def test_zoo(family, name):
    row = zoo.run_isolated(name, family, mem_gb=zoo.MEM_GB, timeout=3600.0)
    assert row["status"] == "ok", row["reason"]
