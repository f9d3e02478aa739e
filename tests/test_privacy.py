"""The privacy ledger against Opacus' own accountants; budget enforcement; resume of the ledger."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant

from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.models import build_model
from aisec_train.privacy.ledger import BudgetExhausted, PrivacyLedger, calibrated_noise
from aisec_train.train.config import Accountant, GradSampleMode, PrivacyConfig, TrainConfig
from aisec_train.train.loop import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset(DatasetConfig(name="synthetic", n_samples=300), seed=0).train


def fit(data, *, epochs=2, resume=None, saved=None, **privacy):
    privacy = {"target_epsilon": 2.0, "accountant": Accountant.rdp, **privacy}
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    train_cfg = TrainConfig(epochs=epochs, batch_size=64, max_physical_batch_size=32, lr=0.5)
    return train(
        model,
        data,
        train_cfg=train_cfg,
        privacy_cfg=PrivacyConfig(**privacy),
        device=CPU,
        resume=resume,
        persist=saved.append if saved is not None else None,
        progress=False,
    )


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_reported_epsilon_equals_opacus_accountant_for_same_history(accountant):
    ledger = PrivacyLedger(accountant, delta=1e-5)
    ledger.noise_multiplier, ledger.sample_rate = 1.1, 0.02
    ledger.accountant.history = [(1.1, 0.02, 300)]
    reference = create_accountant(accountant)
    for _ in range(300):
        reference.step(noise_multiplier=1.1, sample_rate=0.02)
    assert ledger.steps == 300
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


@settings(max_examples=8, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.floats(0.3, 8.0),  # noise multiplier
            st.sampled_from([0.004, 0.02, 0.25, 0.5, 1.0]),  # sample rate: 1/2 is where Opacus' series is slow
            st.integers(1, 5_000),  # steps
        ),
        min_size=1,
        max_size=3,
    ),
    delta=st.sampled_from([1e-5, 1e-3]),
)
def test_the_cached_rdp_epsilon_is_exactly_opacus_rdp_accountant(history, delta):
    """The ledger computes each (noise, rate)'s one-step RDP once per process; the epsilon must stay the very
    number Opacus' own RDPAccountant gives for the same history (also on a second, cached call)."""
    ledger = PrivacyLedger("rdp", delta=delta)
    ledger.accountant.history = list(history)
    reference = create_accountant("rdp")
    reference.history = list(history)
    assert ledger.epsilon() == reference.get_epsilon(delta=delta)
    assert ledger.epsilon() == reference.get_epsilon(delta=delta)


@settings(max_examples=6, deadline=None)
@given(
    history=st.lists(
        st.tuples(st.floats(0.5, 4.0), st.sampled_from([0.01, 0.05, 0.36]), st.integers(1, 3_000)),
        min_size=1,
        max_size=2,
    ),
    delta=st.sampled_from([1e-5, 1e-3]),
)
def test_the_cached_prv_epsilon_is_exactly_opacus_prv_accountant(history, delta):
    """The PRV epsilon's safe domain is bounded from the cached one-step RDP; the epsilon must be the very number
    Opacus' own PRVAccountant gives (the domain decides the discretisation, so any difference would show)."""
    ledger = PrivacyLedger("prv", delta=delta)
    ledger.accountant.history = list(history)
    reference = create_accountant("prv")
    reference.history = list(history)
    assert ledger.epsilon() == reference.get_epsilon(delta=delta)


def test_calibrated_noise_is_opacus_calibration():
    from opacus.accountants.utils import get_noise_multiplier

    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, epochs=4, accountant="rdp")
    assert calibrated_noise(3.0, 1e-5, 0.05, 4, "rdp") == expected
    assert calibrated_noise(3.0, 1e-5, 0.05, 4, "rdp") == expected  # remembered


def test_steps_within_is_the_last_step_under_the_target():
    ledger = PrivacyLedger("rdp", delta=1e-5)
    ledger.noise_multiplier, ledger.sample_rate = 1.0, 0.05
    ledger.accountant.history = [(1.0, 0.05, 10)]
    k = ledger.steps_within(3.0, limit=10_000)
    assert 10 < k < 10_000

    def eps(steps):
        acc = create_accountant("rdp")
        acc.history = [(1.0, 0.05, steps)]
        return acc.get_epsilon(delta=1e-5)

    assert eps(k) <= 3.0 < eps(k + 1)


@pytest.mark.parametrize("mode", [GradSampleMode.ghost, GradSampleMode.hooks])
def test_training_stops_before_the_budget_is_passed(data, mode):
    # An explicit, small noise with a small target: the budget, not the epochs, ends training.
    result = fit(data, epochs=20, noise_multiplier=2.0, target_epsilon=2.0, grad_sample_mode=mode)
    assert result.stopped_by_budget
    assert result.ledger.epsilon() <= 2.0
    # one more step of the same kind would have passed the target
    acc = create_accountant("rdp")
    nm, q = result.ledger.noise_multiplier, result.ledger.sample_rate
    acc.history = [(nm, q, result.ledger.steps + 1)]
    assert acc.get_epsilon(delta=1e-5) > 2.0
    assert len(result.history) < 20


def test_calibrated_run_spends_close_to_its_target(data):
    result = fit(data, epochs=3, target_epsilon=2.0)
    assert 1.8 <= result.ledger.epsilon() <= 2.0
    assert not result.stopped_by_budget
    assert result.ledger.steps == 3 * math.ceil(len(data) / 64)  # 1 / sample_rate steps per epoch


def test_resume_continues_the_ledger_and_refuses_when_spent(data):
    privacy = {"noise_multiplier": 2.0, "target_epsilon": 3.0}
    saved: list = []
    first = fit(data, epochs=2, saved=saved, **privacy)
    eps_after_2, steps_after_2 = first.ledger.epsilon(), first.ledger.steps
    assert saved[-1]["epoch"] == 2 and saved[-1]["ledger"]["history"]

    more: list = []
    second = fit(data, epochs=4, resume=saved[-1], saved=more, **privacy)
    assert second.ledger.steps == 2 * steps_after_2  # continued, not restarted
    assert eps_after_2 < second.ledger.epsilon() < 3.0
    assert [row["epoch"] for row in second.history] == [1, 2, 3, 4]

    # Far more epochs than the budget allows: training stops cleanly at the budget and saves its state.
    last: list = []
    third = fit(data, epochs=30, resume=more[-1], saved=last, **privacy)
    assert third.stopped_by_budget and third.ledger.epsilon() <= 3.0
    assert last[-1]["stopped_by_budget"] and last[-1]["ledger"]["history"] == third.ledger.state_dict()["history"]

    # Resuming a run that stopped at its budget finishes with what it has: nothing new is trained or spent.
    again = fit(data, epochs=31, resume=last[-1], **privacy)
    assert again.stopped_by_budget and again.history == third.history
    assert again.ledger.steps == third.ledger.steps and again.ledger.epsilon() == third.ledger.epsilon()


def test_a_fresh_run_whose_first_step_would_pass_the_target_is_refused(data):
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        fit(data, epochs=2, noise_multiplier=0.3, target_epsilon=0.05)
