"""The monitor never answers OK on NaN: non-finite statistics or outputs are an alarm, a NaN model is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aisec_train.audit import monitor
from aisec_train.config import MonitorConfig
from aisec_train.train.checkpoint import CheckpointError


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


@pytest.fixture
def setup():
    torch.manual_seed(1)
    x = torch.rand(200, 1, 4, 4)
    model = tiny_model()
    baseline = monitor.build_baseline(model, x[:100], x[100:], model_meta={}, cfg=MonitorConfig())
    return baseline, model, x


def test_clean_batch_is_ok(setup):
    baseline, model, x = setup
    assert not monitor.check(baseline, model, x[100:160]).alarm


def test_non_finite_model_outputs_are_an_alarm(setup):
    baseline, model, x = setup
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    verdict = monitor.check(baseline, model, x[100:160])
    assert verdict.alarm and any("non-finite model outputs on 60 input(s)" in r for r in verdict.reasons)
    assert verdict.text().startswith("ALARM")


def test_non_finite_statistics_are_an_alarm(setup):
    baseline, model, x = setup
    baseline["feature_mean"][3] = float("nan")  # a broken baseline must not make every batch look clean
    verdict = monitor.check(baseline, model, x[100:160])
    assert verdict.alarm and any("non-finite input statistics: 1 feature" in r for r in verdict.reasons)
    baseline["feature_mean"][3] = 0.5
    baseline["confidence"]["mean"] = float("nan")
    assert monitor.check(baseline, model, x[100:160]).alarm


def test_a_model_with_non_finite_weights_is_refused(tmp_path):
    model = tiny_model()
    monitor.refuse_non_finite(model, tmp_path / "model.pt")
    with torch.no_grad():
        model[1].bias[2] = float("inf")
    with pytest.raises(CheckpointError, match=r"model.pt has non-finite weights \(1.bias\); refusing to monitor it"):
        monitor.refuse_non_finite(model, tmp_path / "model.pt")
