"""Anchors: the last known length of each ledger, kept beside the key, so a truncated or deleted ledger is refused.

A hash chain detects an edited, deleted or reordered record, but not a file cut back to an older prefix, replaced by
an older copy, or deleted outright (each is a consistent chain). So every commit also writes a keyed anchor
(sequence number and digest of the newest record) into ``$AISEC_TRAIN_ANCHOR_DIR`` (default: ``anchors/`` beside
the key file), which a run directory's writer cannot reach. Opening a ledger that is shorter than its anchor, or
missing while its anchor exists, is refused. The digest leaves out the tags, so re-tagging under a new key keeps
the anchor valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from aisec_train.store import keys
from aisec_train.store.artifacts import canonical
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import atomic_write, read_nofollow

ANCHOR_ENV = "AISEC_TRAIN_ANCHOR_DIR"


def anchor_dir() -> Path:
    chosen = os.environ.get(ANCHOR_ENV)
    return Path(chosen).expanduser().absolute() if chosen else keys.key_path().parent / "anchors"


def anchor_path(ledger_file: Path) -> Path:
    name = hashlib.sha256(os.path.realpath(ledger_file).encode()).hexdigest()[:32]
    return anchor_dir() / f"{name}.json"


def record_digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k not in ("tag", "prev")})).hexdigest()


def write_anchor(ledger_file: Path, records: list[dict[str, Any]]) -> None:
    body = {"ledger": os.path.realpath(ledger_file), "seq": len(records) - 1}
    body["digest"] = record_digest(records[-1])
    body["tag"] = keys.tag(canonical(body), "ledger")
    path = anchor_path(ledger_file)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(body), root=path.parent, sync_dir=False)  # behind is harmless


def read_anchor(ledger_file: Path) -> dict[str, Any] | None:
    path = anchor_path(ledger_file)
    try:
        body = json.loads(read_nofollow(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise IntegrityError(f"anchor {path} of ledger {ledger_file} is unreadable: {err}") from None
    if not isinstance(body, dict) or not isinstance(body.get("seq"), int):
        raise IntegrityError(f"anchor {path} of ledger {ledger_file} is malformed; refusing")
    keys.verify(
        canonical({k: v for k, v in body.items() if k != "tag"}), body.get("tag"), "ledger", what=f"anchor {path}"
    )
    return body


def check_anchor(ledger_file: Path, records: list[dict[str, Any]] | None) -> None:
    """Refuse a ledger that is shorter than, or differs from, what its anchor recorded."""
    anchor = read_anchor(ledger_file)
    if anchor is None:
        return
    if records is None:
        raise IntegrityError(
            f"ledger {ledger_file} is missing but its anchor {anchor_path(ledger_file)} records {anchor['seq'] + 1} "
            "record(s): a deleted ledger does not reset a privacy budget; restore the file"
        )
    seq = anchor["seq"]
    if seq >= len(records) or record_digest(records[seq]) != anchor.get("digest"):
        raise IntegrityError(
            f"ledger {ledger_file} holds {len(records)} record(s) but its anchor {anchor_path(ledger_file)} records "
            f"{seq + 1}: records were removed or the file was rolled back; refusing"
        )


def retag_anchor(ledger_file: Path, records: list[dict[str, Any]]) -> None:
    if records:
        write_anchor(ledger_file, records)
