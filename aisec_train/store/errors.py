"""The refusals of the infrastructure: each is one line naming the file or value and what is allowed.

All derive from ``Refusal`` (aisec_train/errors.py) and ``ValueError`` like the rest of the project's refusals,
so the CLIs map them to exit 2.
"""

from __future__ import annotations

from aisec_train.errors import Refusal


class StoreError(Refusal, ValueError):
    """Base of every refusal raised by :mod:`aisec_train.store`."""


class IntegrityError(StoreError):
    """A keyed tag that does not verify, a malformed record, a planted symlink, an unsafe key file."""


class LockError(StoreError):
    """Another job holds the run directory or the dataset ledger (the message names the holder)."""


class BudgetError(StoreError):
    """A privacy-budget rule refuses: invariant changed on resume, target exceeded, delta too large."""
