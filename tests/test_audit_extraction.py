"""Model extraction through the guard: a surrogate reaches real fidelity when unguarded; the budget stops it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aisec_train.audit import extraction, guard_eval
from aisec_train.audit.guard import Guard
from aisec_train.config import (
    AttackConfig,
    DatasetConfig,
    GuardConfig,
    OutputPolicy,
    PrivacyConfig,
    PrivacyMode,
    TrainConfig,
)
from aisec_train.data.dataset import load_dataset
from aisec_train.models import build_model
from aisec_train.train.loop import accuracy, train
from tests.conftest import read_report

EPOCHS = 20  # surrogate epochs: enough to learn 8x8 digits from a few hundred answers


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation on a shared box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def victim(one_thread):
    """A real digits model trained by the spine's train() (non-private, a few seconds)."""
    data = load_dataset(DatasetConfig(), seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    train_cfg = dataclasses.replace(TrainConfig(), epochs=8, batch_size=64, lr=0.1, ema_decay=0.0)
    result = train(
        model,
        data.train,
        train_cfg=train_cfg,
        privacy_cfg=PrivacyConfig(mode=PrivacyMode.none),
        device=torch.device("cpu"),
        progress=False,
    )
    assert accuracy(result.model, data.test, torch.device("cpu")) > 0.9
    attacker_x, evaluation = extraction.split_heldout(data.test, seed=0)
    return result.model.eval(), attacker_x, evaluation


def attack(model, attacker_x, evaluation, guard_cfg: GuardConfig, queries: int, seed: int = 0) -> dict:
    inputs = extraction.attacker_queries(attacker_x, queries, seed)
    guard = Guard(model, input_shape=tuple(inputs.shape[1:]), cfg=guard_cfg)
    return extraction.run_extraction(
        guard, inputs, model, evaluation, model_name="cnn", num_classes=10, epochs=EPOCHS, seed=seed
    )


def test_attacker_queries_are_in_range_and_start_with_the_originals():
    x = torch.rand(50, 1, 8, 8)
    q = extraction.attacker_queries(x, 180, seed=3)
    assert q.shape == (180, 1, 8, 8) and q.min() >= 0 and q.max() <= 1
    torch.testing.assert_close(q[:50], x)
    torch.testing.assert_close(q, extraction.attacker_queries(x, 180, seed=3))


def test_unguarded_surrogate_reaches_measurable_fidelity(victim):
    model, attacker_x, evaluation = victim
    result = attack(model, attacker_x, evaluation, GuardConfig(output=OutputPolicy.probs, query_budget=0), 400)
    assert result["queries"] == 400 and not result["stopped_by_guard"]
    assert result["fidelity"] > 0.85 and result["surrogate_accuracy"] > 0.8
    untrained = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    assert extraction.agreement(untrained, model, evaluation.x) < 0.4  # what fidelity means without queries


def test_budget_stops_the_attacker_and_costs_it_fidelity(victim):
    model, attacker_x, evaluation = victim
    result = attack(model, attacker_x, evaluation, GuardConfig(output=OutputPolicy.label, query_budget=30), 400)
    assert result["queries"] == 30 and result["planned_queries"] == 400 and result["stopped_by_guard"]
    assert "has 30 of its 30-query budget left" in result["refusal"]
    unguarded = attack(model, attacker_x, evaluation, GuardConfig(output=OutputPolicy.probs, query_budget=0), 400)
    assert result["fidelity"] < unguarded["fidelity"] - 0.1


def test_paired_comparison_is_consistent(victim):
    model, attacker_x, evaluation = victim
    result = guard_eval.compare_guard(
        model,
        attacker_x,
        evaluation,
        guard_cfg=GuardConfig(output=OutputPolicy.label, query_budget=100),
        queries=200,
        seeds=[0, 1],
        model_name="cnn",
        num_classes=10,
        epochs=EPOCHS,
    )
    s = result["settings"]
    assert result["queries"] == 100 and result["stopped_by_guard"]
    assert [s[k]["queries"] for k in guard_eval.SETTINGS] == [200, 200, 100, 100]
    for name, (without, with_) in guard_eval.EFFECTS.items():
        gaps = [a - b for a, b in zip(s[without]["fidelity"]["values"], s[with_]["fidelity"]["values"], strict=True)]
        assert result["effects"][name]["values"] == pytest.approx(gaps)
        assert result["effects"][name]["lowered_in"] == sum(g > 0 for g in gaps)
    # one seed of the full comparison equals a single attack with that seed (nothing is shared across seeds)
    single = attack(model, attacker_x, evaluation, GuardConfig(output=OutputPolicy.label, query_budget=100), 200, 1)
    assert s["guarded"]["fidelity"]["values"][1] == pytest.approx(single["fidelity"])


def test_sanitizer_evaluation_is_adaptive(victim):
    model, _, evaluation = victim
    attack_cfg = AttackConfig(eps=0.1, step_size=0.02, steps=10, restarts=1)
    result = extraction.sanitizer_robustness(
        model, evaluation.x[:60], evaluation.y[:60], bit_depth=2, smoothing=0, attack=attack_cfg, backend="torch"
    )
    # the quantiser masks the plain gradient; BPDA sees through it and is at least as strong
    assert result["robust_accuracy_adaptive"] <= result["robust_accuracy_plain"]
    assert result["robust_accuracy_plain"] > result["robust_accuracy_undefended"]


def test_run_reports_extraction_with_the_contract_keys(smoke_run):
    ext = read_report(smoke_run)["audit"]["extraction"]
    assert ext["queries"] == ext["settings"]["guarded"]["queries"] <= ext["planned_queries"]
    assert ext["fidelity"] == pytest.approx(ext["settings"]["guarded"]["fidelity"]["mean"])
    assert len(ext["seeds"]) == len(ext["settings"]["guarded"]["fidelity"]["values"]) >= 2
    assert set(ext["effects"]) == set(guard_eval.EFFECTS)
