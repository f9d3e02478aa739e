"""The broken-DP drill (issue 12): a private step that adds far less noise than the ledger charges (the noise draw
patched by the test: ours, privacy/noise.py, and Opacus' own, which the data-parallel optimizers keep) is caught by
the pipeline's one-run privacy audit, and the report fails that checklist item."""

from __future__ import annotations

import opacus.optimizers.optimizer as opacus_optimizer
import opacus.optimizers.optimizer_fast_gradient_clipping as opacus_fast_optimizer
import pytest
import torch

import aisec_train
from aisec_train.audit.privacy_audit import ITEM
from aisec_train.privacy import noise

# A recipe that memorises when nothing stops it (an MLP, many steps, a large step size; as in
# tests/test_privacy_audit.py), so that the audit has power: honest noise for epsilon 1 hides the canaries,
# no noise exposes them.
DRILL = ["model=mlp", "privacy.target_epsilon=1", "privacy.max_grad_norm=1.0", "train.epochs=100", "train.lr=2.0",
         "train.batch_size=256", "train.ema_decay=0", "audit.enabled=false", "robustness.evaluate=false",
         "audit.privacy_audit=on", "audit.canaries.m=500"]  # fmt: skip


def audited(tmp_path, name, extra=()):
    report = aisec_train.run(aisec_train.compose([*DRILL, *extra]), run_dir=tmp_path / name)
    item = next(c for c in report.checklist if c["item"] == ITEM)
    return report.get("audit.privacy_audit.epsilon_lower_bound"), report.get("privacy.epsilon"), item


@pytest.mark.slow
def test_an_honest_private_step_passes_the_audit(tmp_path):
    bound, claimed, item = audited(tmp_path, "honest")
    assert bound <= claimed and item["status"] == "pass"


def test_a_broken_private_step_is_caught(tmp_path, monkeypatch):
    # No noise at all, while epsilon 1 is charged: our grouped draw (every optimizer our engine makes) and Opacus'
    # own (the optimizers that keep theirs) are replaced from here.
    monkeypatch.setattr(noise, "_draw", lambda *args: (None, 1.0))  # what std 0 draws: nothing
    for module in (opacus_optimizer, opacus_fast_optimizer):
        monkeypatch.setattr(module, "_generate_noise", lambda std, reference, *a, **k: torch.zeros_like(reference))
    bound, claimed, item = audited(tmp_path, "broken")
    assert claimed == pytest.approx(1.0, abs=0.01)  # the ledger still reports the configured, honest-looking claim
    assert bound > claimed, (bound, claimed)
    assert item["status"] == "fail" and "exceeds the claimed epsilon" in item["evidence"]
