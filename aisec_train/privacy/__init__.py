"""Differential privacy, in one place: everything the DP guarantee rests on.

- ``engine``: DP-SGD through Opacus (wrapping model, optimizer and loader), ``randomness``: where the noise and
  the Poisson batches come from (OS entropy), ``claims``: whether a run's epsilon is a guarantee.
- ``ledger``: the run's accountant and the parameters it charges; ``accounting``: epsilon of an accountant history.
- ``ledger_store`` / ``ledger_rules`` / ``budget`` / ``record_sets``: the dataset-level budget store charged to the
  data across runs, its composition rules and the per-record digest sets; ``spend`` and ``federated_budget``: a
  central and a federated run's account in it; ``admission``: the data stage's opening of that account;
  ``ledger_cli``: the ``aisec-train-ledger`` command.
- ``report``: the one writer of the report's ``privacy`` section and DP checklist item, for every trainer.

The light names are importable from here (nothing below imports torch):

    from aisec_train.privacy import LedgerStore, DatasetLedger, compose_epsilon, check_delta
"""

from aisec_train.privacy.budget import check_delta, check_target_epsilon, compose_epsilon, merge, steps_within
from aisec_train.privacy.ledger_store import DatasetLedger, LedgerStore, resolve_store_path

__all__ = [
    "DatasetLedger",
    "LedgerStore",
    "check_delta",
    "check_target_epsilon",
    "compose_epsilon",
    "merge",
    "resolve_store_path",
    "steps_within",
]
