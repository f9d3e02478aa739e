"""Infrastructure every part of aisec-train uses: keyed tags, safe writes, locks, tagged artifacts.

One import surface (docs/integrity.md explains the threat model, key custody, rotation and crash consistency):

    from aisec_train.store import (tag, verify, atomic_write, safe_open_for_write, exclusive_lock, lock_run_dir,
                                   save_artifact, read_artifact, IntegrityError, LockError, BudgetError)

Nothing here imports torch or Opacus. The privacy ledger store built on it is aisec_train/privacy/.
"""

from aisec_train.store.artifacts import (
    manifest_path,
    read_artifact,
    read_manifest,
    retag_artifact,
    save_artifact,
    verified_digest,
)
from aisec_train.store.errors import BudgetError, IntegrityError, LockError, StoreError
from aisec_train.store.files import (
    atomic_write,
    create_exclusive,
    open_in_place,
    open_live,
    open_nofollow,
    read_nofollow,
    safe_mkdir,
    safe_open_for_write,
    shred,
    validate_output_path,
)
from aisec_train.store.keys import current_key, key_path, tag, verify
from aisec_train.store.locks import exclusive_lock, holder, lock_run_dir

__all__ = [
    "BudgetError",
    "IntegrityError",
    "LockError",
    "StoreError",
    "atomic_write",
    "create_exclusive",
    "current_key",
    "exclusive_lock",
    "holder",
    "key_path",
    "lock_run_dir",
    "manifest_path",
    "open_in_place",
    "open_live",
    "open_nofollow",
    "read_artifact",
    "read_manifest",
    "read_nofollow",
    "retag_artifact",
    "safe_mkdir",
    "safe_open_for_write",
    "save_artifact",
    "shred",
    "tag",
    "validate_output_path",
    "verified_digest",
    "verify",
]
