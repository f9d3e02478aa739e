"""The loop's dataset account (aisec_train/privacy/spend.py) in the real loop: charge before checkpoint, resume
reconciliation, and a resume that finishes instead of being refused forever (in-process, a few seconds)."""

from __future__ import annotations

import pytest
import torch

from aisec_train.data.views import Sample
from aisec_train.models import build_model
from aisec_train.privacy import LedgerStore
from aisec_train.privacy.spend import DatasetSpend
from aisec_train.store import BudgetError
from aisec_train.train.config import Accountant, GradSampleMode, PrivacyConfig, TrainConfig
from aisec_train.train.loop import train

CPU = torch.device("cpu")
DATASET = "d" * 64
RUN = "/runs/a"


def blobs(n=96, classes=3) -> Sample:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return Sample((torch.rand(n, 1, 6, 6, generator=g) * 0.4 + y[:, None, None, None] * 0.25).clamp(0, 1), y)


def job(ledger, *, epochs=4, resume=None, run_id=RUN):
    """One DP run of ``epochs`` epochs (3 steps each, noise calibrated to epsilon 3 at the end; RDP: fast)."""
    saved: list[dict] = []
    spend = DatasetSpend(ledger.delegate(), run_id, "dataset", 0, 3.0, 96)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.1, ema_decay=0.0)
    privacy = PrivacyConfig(
        target_epsilon=3.0, delta=1e-3, grad_sample_mode=GradSampleMode.hooks, accountant=Accountant.rdp
    )
    result = train(build_model("mlp", in_channels=1, num_classes=3, image_size=6), blobs(), train_cfg=cfg,
                   privacy_cfg=privacy, device=CPU, persist=saved.append, spend=spend, resume=resume,
                   progress=False)  # fmt: skip
    return result, saved, spend


def ckpt_steps(payload: dict) -> int:
    return sum(e[2] for e in payload["ledger"]["history"])


def test_every_checkpoint_is_charged_before_it_is_written(tmp_path):
    store = LedgerStore(tmp_path / "store")
    with store.open(DATASET) as led:
        seen = []
        result, saved, _ = job(led)
        for payload in saved:
            seen.append(ckpt_steps(payload))
        assert led.steps(RUN) == result.ledger.steps == seen[-1] and seen == sorted(seen)
        assert led.total_epsilon() == pytest.approx(result.ledger.epsilon()) and led.total_epsilon() <= 3.0


def test_a_resume_whose_last_checkpoint_was_lost_after_its_charge_finishes_and_counts_it(tmp_path):
    """The kill landed between the last epoch's charge and its checkpoint: the ledger holds every step (the budget
    is spent) but the checkpoint is one epoch behind. The resume must not be refused forever: it adds the lost
    steps to its accountant and finishes with the model it has."""
    store = LedgerStore(tmp_path / "store")
    with store.open(DATASET) as led:
        full, saved, _ = job(led)
        charged = led.steps(RUN)
        behind = saved[-2]  # the checkpoint on disk after the kill
        result, _, spend = job(led, resume=behind)
        assert spend.reconciled == charged - ckpt_steps(behind) > 0
        assert result.stopped_by_budget and len(result.history) == len(behind["history"])  # nothing new trained
        assert result.ledger.steps == led.steps(RUN) == charged  # the report counts the lost steps
        for name, value in result.model.state_dict().items():  # the released model is the checkpoint's
            torch.testing.assert_close(value, behind["model"][name])


def test_without_a_checkpoint_an_exhausted_budget_is_refused(tmp_path):
    """checkpoints/ deleted after the budget was spent: nothing to finish, so no fresh model is trained."""
    store = LedgerStore(tmp_path / "store")
    with store.open(DATASET) as led:
        job(led)
        with pytest.raises(BudgetError, match="privacy budget exhausted for dataset"):
            job(led)
        with pytest.raises(BudgetError, match="privacy budget exhausted for dataset"):
            job(led, run_id="/runs/b")  # or a new run directory


def test_a_checkpoint_the_ledger_never_saw_is_charged_at_once(tmp_path):
    """A run directory copied in (or another store): its checkpoint's steps are charged before any new step."""
    first, second = LedgerStore(tmp_path / "one"), LedgerStore(tmp_path / "two")
    with first.open(DATASET) as led:
        _, saved, _ = job(led, epochs=4)
    with second.open(DATASET) as led:
        _, _, spend = job(led, epochs=4, resume=saved[1])
        assert led.steps(RUN) >= ckpt_steps(saved[1]) and spend.reconciled == 0
