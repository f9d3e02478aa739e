"""The trainer interface (issue 25): the loop takes the ledger it charges directly, and a trainer hands what it
measured back in its result for the train stage to report."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aisec_train.components import build
from aisec_train.data.views import Sample
from aisec_train.models import build_model
from aisec_train.privacy.ledger import PrivacyLedger
from aisec_train.report.report import Report
from aisec_train.train.config import PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import sgd, train

CPU = torch.device("cpu")
# Seeded noise and batches, so two ways of running the same training can be compared bit for bit.
PRIVATE = PrivacyConfig(
    mode=PrivacyMode.dpsgd, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=None, reproducible_noise=True
)
CFG = TrainConfig(epochs=1, batch_size=16, lr=0.1, seed=3, max_physical_batch_size=16)


def blobs(n=64, classes=3) -> Sample:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return Sample((torch.rand(n, 1, 6, 6, generator=g) * 0.4 + y[:, None, None, None] * 0.25).clamp(0, 1), y)


def model(seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_channels=1, num_classes=3, image_size=6)


def run(**kwargs):
    return train(model(), blobs(), train_cfg=CFG, privacy_cfg=PRIVATE, device=CPU, progress=False, **kwargs)


def test_the_loop_charges_the_ledger_it_is_given_and_a_second_round_continues_it():
    ledger = PrivacyLedger(PRIVATE.accountant.value, PRIVATE.delta)
    first = run(ledger=ledger)
    assert first.ledger is ledger and ledger.steps > 0
    steps, epsilon = ledger.steps, ledger.epsilon()
    second = run(ledger=ledger)  # a federated client's next round: the same account, charged on
    assert second.ledger is ledger and ledger.steps == 2 * steps and ledger.epsilon() > epsilon


def test_a_given_ledger_trains_exactly_as_the_resume_payload_it_replaces():
    """What the federated client used to do (a made-up resume payload carrying its ledger) and what it does now
    (the ledger, directly) train the same weights and charge the same account."""
    saved = PrivacyLedger(PRIVATE.accountant.value, PRIVATE.delta)
    run(ledger=saved)  # a client's earlier round
    state = saved.state_dict()

    direct = PrivacyLedger(PRIVATE.accountant.value, PRIVATE.delta)
    direct.load_state_dict(state)
    new = run(ledger=direct)

    start = model()
    torch.manual_seed(CFG.seed)
    payload = {
        "model": {k: v.detach().clone() for k, v in start.state_dict().items()},
        "optimizer": build(sgd(CFG), "optimizer", params=start.parameters()).state_dict(),
        "ledger": state,
        "history": [],
        "epoch": 0,
        "rng": torch.get_rng_state(),
    }
    old = train(start, blobs(), train_cfg=CFG, privacy_cfg=PRIVATE, device=CPU, progress=False, resume=payload)
    for key, value in old.model.state_dict().items():
        assert torch.equal(value, new.model.state_dict()[key]), key
    assert old.ledger.state_dict() == new.ledger.state_dict()


def test_a_ledger_and_a_resume_payload_holding_one_are_refused_together():
    ledger = PrivacyLedger(PRIVATE.accountant.value, PRIVATE.delta)
    with pytest.raises(ValueError, match="not both"):
        run(ledger=ledger, resume={"ledger": ledger.state_dict()})


def test_without_dp_a_given_ledger_is_left_alone():
    ledger = PrivacyLedger(PRIVATE.accountant.value, PRIVATE.delta)
    result = train(model(), blobs(), train_cfg=CFG, device=CPU, progress=False, ledger=ledger)
    assert result.ledger is None and ledger.steps == 0


def test_a_trainers_own_sections_merge_into_the_report_as_if_written_there():
    """The federated trainer fills a Report of its own; the train stage merges it: same sections, same answers,
    owned by the train stage (so a later stage still cannot overwrite them)."""

    def measure(report: Report) -> None:
        report.add("privacy", budget={"spent": 1.0})
        report.add("federated", rounds=2, clients=[0, 1])
        report.check("deployment", "federated transport encrypted (TLS to the SuperLink)", "not_applicable", "sim")
        report.check(
            "deployment", "aggregation server never sees a client update (encrypted aggregation)", "fail", "plain"
        )

    direct = Report(sections={"privacy": {"ledger_store": "x"}})
    direct.stage = "train"
    measure(direct)

    part = Report()
    measure(part)
    merged = Report(sections={"privacy": {"ledger_store": "x"}})
    merged.stage = "train"
    merged.merge(part.sections, part.checklist)
    assert merged.to_dict() == direct.to_dict()
    assert list(merged.sections) == list(direct.sections)

    merged.stage = "evaluate"
    with pytest.raises(RuntimeError, match="belongs to stage 'train'"):
        merged.check("deployment", "federated transport encrypted (TLS to the SuperLink)", "pass", "x")


def test_the_federated_report_reads_typed_inputs_not_a_stand_in():
    from aisec_train.federated.report import ReportInputs

    names = [f.name for f in dataclasses.fields(ReportInputs)]
    assert names == ["cfg", "report", "run_dir", "model", "objective", "data"]
