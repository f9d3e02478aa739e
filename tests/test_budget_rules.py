"""No silent bypass, and a budget people can live with (issue 20, items 3 and 5), in the real loop with real Opacus:
``budget_scope=run`` is charged and passes the dataset's target only on record; a planned spend that does not fit
is refused before any step (naming the binding limit) or, on request, its noise is fitted to what is left; a
refused run is a refusal, not a run; the Python API's ``train`` is charged; the store does not follow the working
directory. A few seconds each (RDP accountant, 96 tiny images)."""

from __future__ import annotations

import os

import pytest
import torch

import aisec_train
from aisec_train.data.views import Sample
from aisec_train.models import build_model
from aisec_train.privacy import LedgerStore, compose_epsilon
from aisec_train.privacy.ledger_store import STORE_ENV, choose_store
from aisec_train.privacy.spend import DatasetSpend
from aisec_train.store import BudgetError
from aisec_train.train.config import Accountant, BudgetScope, GradSampleMode, PrivacyConfig, TrainConfig
from aisec_train.train.loop import train

CPU = torch.device("cpu")
DATASET = "e" * 64


def blobs(n=96, classes=3) -> Sample:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return Sample((torch.rand(n, 1, 6, 6, generator=g) * 0.4 + y[:, None, None, None] * 0.25).clamp(0, 1), y)


def job(led, run_id, *, target=3.0, scope="dataset", reason=None, fit=False, noise=None, epochs=4):
    """One DP run of ``epochs`` epochs of 3 steps on the dataset ``led`` is open on (noise calibrated to
    ``target`` unless given)."""
    spend = DatasetSpend(led.delegate(), run_id, scope, 0, target, 96, budget_reason=reason, fit_to_budget=fit)
    privacy = PrivacyConfig(
        target_epsilon=target, delta=1e-3, grad_sample_mode=GradSampleMode.hooks, accountant=Accountant.rdp,
        budget_scope=BudgetScope(scope), budget_reason=reason, fit_to_budget=fit, noise_multiplier=noise,
    )  # fmt: skip
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.1, ema_decay=0.0)
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=6)
    result = train(model, blobs(), train_cfg=cfg, privacy_cfg=privacy, device=CPU, spend=spend, progress=False)
    return result, spend


@pytest.fixture
def spent(tmp_path):
    """A dataset whose budget (epsilon 3) the first run spent."""
    store = LedgerStore(tmp_path / "store")
    with store.open(DATASET) as led:
        job(led, "/runs/first")
        assert 2.5 < led.total_epsilon() <= 3.0
    return store


def kinds(led) -> list[str]:
    return [r["kind"] for r in led.records]


def test_budget_scope_run_past_the_target_is_refused_without_a_reason(spent):
    with spent.open(DATASET) as led, pytest.raises(BudgetError) as refused:
        job(led, "/runs/big", target=8.0, scope="run")
    line = str(refused.value)
    assert "\n" not in line and "privacy.budget_scope=run still charges dataset eeeeeeeeeeeeeeee" in line
    assert "past the dataset's target 3.0" in line and "the binding limit is the dataset's target" in line
    for choice in ("privacy.budget_reason=TEXT", f"raise-target {DATASET} --epsilon", "privacy=none",
                   "privacy.ledger_store=scratch"):  # fmt: skip
        assert choice in line, choice
    led = spent.view(DATASET)
    assert led.steps("/runs/big") == 0 and "/runs/big" not in led.runs()  # nothing trained, not listed as a run
    assert led.of_kind("refusal")[-1]["run_id"] == "/runs/big" and "still charges" in led.of_kind("refusal")[-1]["why"]


def test_budget_scope_run_with_a_reason_is_charged_and_recorded(spent):
    before = spent.view(DATASET).total_epsilon()
    with spent.open(DATASET) as led:
        result, spend = job(led, "/runs/big", target=8.0, scope="run", reason="sweep for the paper, ticket 9")
        summary = spend.summary()
    led = spent.view(DATASET)
    exceed = led.of_kind("exceed")[-1]
    assert exceed["why"] == "sweep for the paper, ticket 9" and exceed["who"] and exceed["at"]  # who, when, why
    assert exceed["epsilon_before"] == pytest.approx(before) and exceed["target_epsilon"] == 3.0  # how much
    assert exceed["epsilon_after"] >= led.total_epsilon() - 1e-6 > 3.0  # the dataset ledger was charged
    assert led.steps("/runs/big") == result.ledger.steps == 12 and 3.0 < result.ledger.epsilon() <= 8.0
    assert summary["dataset_exceeded"] and summary["dataset_exceeds"][0]["why"] == exceed["why"]
    assert summary["dataset_epsilon"] == pytest.approx(led.total_epsilon())


def test_a_planned_spend_that_does_not_fit_is_refused_naming_the_binding_limit(spent):
    with spent.open(DATASET) as led:
        led.raise_target(3.5, why="one more look, ticket 10")
        spent_before = led.total_epsilon()
        with pytest.raises(BudgetError) as refused:
            job(led, "/runs/second")  # its own target 3 would take the records to ~4.3
    line = str(refused.value)
    assert f"epsilon {spent_before:.3f} of its target 3.5 is spent by 1 run(s)" in line
    assert "12 planned steps" in line and "The binding limit is the dataset's remainder" in line
    assert "privacy.fit_to_budget=true" in line and "--epsilon 4." in line  # the raise that would let it run
    assert kinds(spent.view(DATASET))[-1] == "refusal" and "/runs/second" not in spent.view(DATASET).runs()


def test_fit_to_budget_calibrates_the_noise_to_what_is_left(spent):
    with spent.open(DATASET) as led:
        led.raise_target(3.5, why="one more look, ticket 10")
        result, spend = job(led, "/runs/second", fit=True)
        assert not result.stopped_by_budget and result.ledger.steps == 12  # every planned step: no silent stop
        assert 3.4 < led.total_epsilon() <= 3.5  # the remainder used, not passed
        fit = spend.summary()["fit_to_budget"]
    assert fit["noise_multiplier"] == result.ledger.noise_multiplier > fit["noise_multiplier_for_own_target"]
    history = spent.view(DATASET).history()
    assert compose_epsilon(history, delta=1e-3, accountant="rdp") == pytest.approx(spent.view(DATASET).total_epsilon())


def test_the_run_s_own_target_may_still_stop_it_and_says_so(tmp_path):
    """Explicit noise with a small own target: the run's own limit binds (not the dataset's), so it is admitted
    and stops at its target; the result says so (the pipeline shows it on the console, card and report)."""
    with LedgerStore(tmp_path / "store").open(DATASET) as led:
        result, _ = job(led, "/runs/a", target=2.0, noise=2.0, epochs=20)
        assert led.steps("/runs/a") == result.ledger.steps  # charged what it took
    assert result.stopped_by_budget and result.ledger.epsilon() <= 2.0 and len(result.history) < 20


def test_python_api_train_is_charged_to_the_same_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "team"))
    loader = torch.utils.data.DataLoader(blobs(), batch_size=32)
    overrides = ["train.epochs=2", "privacy.target_epsilon=2", "privacy.accountant=rdp", "privacy.delta=1e-3"]
    first = aisec_train.fit(build_model("mlp", in_channels=1, num_classes=3, image_size=6), loader, overrides)
    assert 0 < first.ledger.epsilon() <= 2.0
    budget = first.budget
    assert budget["ledger_store"] == str(tmp_path / "team") and not budget["ledger_scratch"]
    assert budget["dataset_epsilon"] == pytest.approx(first.ledger.epsilon()) and budget["dataset_runs"] == 1
    with pytest.raises(BudgetError, match="privacy budget exhausted for dataset"):
        aisec_train.fit(build_model("mlp", in_channels=1, num_classes=3, image_size=6), loader, overrides)
    (ledger,) = LedgerStore().datasets()
    led = LedgerStore().view(ledger)
    assert len(led.runs()) == 1 and len(led.of_kind("refusal")) == 1 and led.runs().popitem()[0].startswith("api")


def test_the_default_store_is_the_user_s_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    seen = set()
    for cwd in (tmp_path / "a", tmp_path / "b"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        choice = choose_store()
        seen.add(choice.path)
        assert choice.source == "user data folder" and not choice.scratch
    assert seen == {tmp_path / "data" / "aisec-train" / "privacy_ledgers"}
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "team"))  # a whole team on shared storage
    assert choose_store().path == tmp_path / "team" and choose_store().source == f"${STORE_ENV}"
    assert choose_store(str(tmp_path / "mine")).path == tmp_path / "mine"  # privacy.ledger_store still wins
    scratch = choose_store("scratch", run_id="/runs/x")
    assert scratch.scratch and scratch.path.parent == tmp_path / "data" / "aisec-train" / "scratch_ledgers"
    assert choose_store("scratch", run_id="/runs/y").path != scratch.path  # each experiment its own
    assert os.path.isabs(scratch.path)
