"""Model extraction through the guard: a surrogate reaches real fidelity when unguarded; the budget stops it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aisec_train.audit import extraction, guard_eval
from aisec_train.audit.config import GuardConfig, OutputPolicy
from aisec_train.audit.guard import Guard
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.models import ModelFactory
from aisec_train.robust.config import AttackConfig
from aisec_train.train.config import PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import accuracy, train
from tests.conftest import read_report

EPOCHS = 20  # surrogate epochs: enough to learn 8x8 digits from a few hundred answers
FACTORY = ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, input_shape=(1, 8, 8), num_classes=10)


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
    model = FACTORY(seed=0)
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
    return extraction.run_extraction(guard, inputs, model, evaluation, factory=FACTORY, epochs=EPOCHS, seed=seed)


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
    untrained = FACTORY(seed=1)
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
        factory=FACTORY,
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


def test_split_heldout_is_bounded_and_disjoint():
    data = load_dataset(DatasetConfig(), seed=0)
    attacker_x, evaluation = extraction.split_heldout(data.test, seed=0, attacker_limit=50, eval_limit=70)
    assert attacker_x.shape == (50, 1, 8, 8) and evaluation.x.shape == (70, 1, 8, 8) and len(evaluation.y) == 70
    full_x, full_eval = extraction.split_heldout(data.test, seed=0)
    assert len(full_x) + len(full_eval) == len(data.test)  # unbounded: the two halves of the held-out split
    torch.testing.assert_close(attacker_x, full_x[:50])
    flat = {tuple(row.flatten().tolist()) for row in full_x}
    assert not any(tuple(row.flatten().tolist()) in flat for row in full_eval.x[:40])


def test_surrogate_from_the_factory_learns_a_non_square_victim(one_thread):
    """6x10 inputs (H != W): the surrogate is the factory's model, distilled by the one loop from soft answers."""
    factory = ModelFactory({"_target_": "aisec_train.models.MLP", "hidden": 32}, input_shape=(1, 6, 10), num_classes=3)
    victim = factory(seed=5).eval()
    g = torch.Generator().manual_seed(0)
    queries, held = torch.rand(400, 1, 6, 10, generator=g), torch.rand(200, 1, 6, 10, generator=g)
    with torch.no_grad():
        answers = torch.softmax(victim(queries), dim=1)
    surrogate = extraction.train_surrogate(queries, answers, factory=factory, epochs=15, seed=1)
    again = extraction.train_surrogate(queries, answers, factory=factory, epochs=15, seed=1)
    for a, b in zip(surrogate.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # seeded: the same queries and seed give the same surrogate
    untrained = extraction.agreement(factory(seed=1), victim, held)
    assert extraction.agreement(surrogate, victim, held) > max(0.9, untrained + 0.2)
