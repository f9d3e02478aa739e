"""Evaluation sized to the job (issue 24): per-stage wall times in the report, the robustness evaluation on a
seeded stratified sample with an exact interval, and the masking checks on a budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aisec_train.config import to_config
from aisec_train.errors import ConfigError
from aisec_train.pipeline import STAGES
from aisec_train.robust.evaluation import evaluate_robustness
from aisec_train.robust.sampling import clopper_pearson, parse_eval_samples, stratified_indices
from tests.conftest import read_report


def test_report_has_each_stages_wall_time(smoke_run):
    run = read_report(smoke_run)["run"]
    assert set(run["stage_seconds"]) == {name for name, _ in STAGES}
    assert all(s >= 0 for s in run["stage_seconds"].values()) and run["stage_seconds"]["train"] > 0


def test_smoke_report_has_the_robust_accuracy_interval(smoke_run):
    rob = read_report(smoke_run)["robustness"]
    lo, hi = rob["robust_accuracy_ci"]
    assert lo <= rob["robust_accuracy"] <= hi and hi - lo > 0
    assert rob["eval_samples"] == rob["eval_of"] == 360  # the default 500 covers digits' whole 360-image split


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    labels = np.repeat(np.arange(5), [400, 300, 200, 90, 10])
    idx = stratified_indices(labels, 100, seed=3)
    assert len(idx) == 100 == len(set(idx.tolist())) and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=5).tolist() == [40, 30, 20, 9, 1]
    assert np.array_equal(idx, stratified_indices(labels, 100, seed=3))
    assert not np.array_equal(idx, stratified_indices(labels, 100, seed=4))
    assert np.array_equal(stratified_indices(labels, 5000, seed=0), np.arange(1000))  # n above the split: all
    rare = stratified_indices(np.array([0] * 98 + [1, 2]), 10, seed=0)
    assert set(np.array([0] * 98 + [1, 2])[rare].tolist()) == {0, 1, 2} and len(rare) == 10


@pytest.mark.parametrize(("k", "n"), [(0, 20), (20, 20), (7, 500), (431, 500)])
def test_clopper_pearson_contains_the_estimate_and_matches_the_beta_quantiles(k, n):
    from scipy.stats import beta

    lo, hi = clopper_pearson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo == pytest.approx(0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1), abs=1e-9)
    assert hi == pytest.approx(1.0 if k == n else beta.ppf(0.975, k + 1, n - k), abs=1e-9)


def test_eval_samples_accepts_a_count_or_all_and_refuses_the_rest():
    assert parse_eval_samples("all") is None and parse_eval_samples(0) is None and parse_eval_samples(64) == 64
    cfg = to_config({"robustness": {"eval_samples": "all"}})
    assert cfg.robustness.eval_samples == "all"
    for bad in ("some", -3, 2.5):
        with pytest.raises(ConfigError, match="robustness.eval_samples=.* is not allowed: must be a count >= 1"):
            to_config({"robustness": {"eval_samples": bad}})


@pytest.fixture(scope="module")
def model_and_data(digits_cnn) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The digits CNN of conftest.py and 160 of its held-out digits."""
    model, x, y = digits_cnn
    return model, x[:160], y[:160]


def test_suite_reports_an_interval_and_checks_masking_on_a_bounded_sample(model_and_data):
    model, x, y = model_and_data
    out = evaluate_robustness(model, x, y, suite="apgd", eps=0.05, steps=6, check_samples=20)
    lo, hi = out["robust_accuracy_ci"]
    assert lo <= out["robust_accuracy"] <= hi
    steps = out["gradient_masking"]["checks"]["steps"]
    assert steps["samples"] == 20 and steps["steps"] == [3, 6]
    full = evaluate_robustness(model, x, y, suite="apgd", eps=0.05, steps=6, check_samples=None)
    correct = round(full["clean_accuracy"] * len(x))
    assert full["gradient_masking"]["checks"]["steps"]["samples"] == correct > 20
    with pytest.raises(ConfigError, match="check_samples=0 is not allowed"):
        evaluate_robustness(model, x, y, suite="apgd", eps=0.05, check_samples=0)
