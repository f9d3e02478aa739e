"""Admission to the dataset's privacy budget: under DP, the data stage opens the dataset's ledger (locked for the
rest of the run) and the run's account in it, before the model is built and long before the first step.

The pipeline's data stage and the Python API's ``train`` both call :func:`open_spend`, so a loader passed to the
API is charged exactly as a CLI run on the same records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aisec_train.privacy.budget import check_delta
from aisec_train.privacy.ledger_store import LedgerStore
from aisec_train.privacy.record_sets import register_and_share
from aisec_train.privacy.spend import DatasetSpend, new_spend, store_record
from aisec_train.train.config import PrivacyMode

if TYPE_CHECKING:
    from aisec_train.run_state import Run


def open_spend(run: Run, run_id: str | None = None) -> DatasetSpend | None:
    """Under DP: the dataset's ledger, locked for the rest of the run (a second job on the same data waits up to
    ``train.lock_wait_s`` or refuses), and the run's account in it (``run_id``: default the run directory; the
    Python API's ``train`` passes its own). Under torchrun the data stage calls it on rank 0 only: the job has
    one ledger."""
    cfg, data = run.cfg, run.data
    assert data is not None
    if cfg.privacy.mode is not PrivacyMode.dpsgd:  # no DP, no delta to check and nothing to charge
        return None
    override = check_delta(cfg.privacy.delta, len(data.train), reason=cfg.privacy.delta_reason)
    run_id = run_id or str(run.run_dir.resolve())
    store = LedgerStore(cfg.privacy.ledger_store, run_id=run_id)  # the user's, the team's ($AISEC_...) or scratch
    store.validate(data.manifest_sha256)
    ledger = run.resources.enter_context(store.open(data.manifest_sha256, wait=cfg.train.lock_wait_s))
    run.report.add("privacy", **store_record(store), delta_override=cfg.privacy.delta_reason if override else None)
    spend = new_spend(cfg, ledger.delegate(), run_id, data.split_seed, len(data.train))
    if data.record_digests is not None:  # charged by records too, whatever file, order or dtype held them
        spend.shared = register_and_share(ledger, data.record_digests, hold=run.resources, wait=cfg.train.lock_wait_s)
    return spend
