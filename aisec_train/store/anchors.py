"""Anchors: the last known length of each ledger, kept beside the key, so a truncated or deleted ledger is refused.

A hash chain detects an edited, deleted or reordered record, but not a file cut back to an older prefix, replaced by
an older copy, or deleted outright (each is a consistent chain). So every commit also writes a keyed anchor
(sequence number and digest of the newest record) into ``$AISEC_TRAIN_ANCHOR_DIR`` (default: ``anchors/`` beside
the key file), which a run directory's writer cannot reach. Opening a ledger that is shorter than its anchor, or
missing while its anchor exists, is refused. The digest leaves out the tags, so re-tagging under a new key keeps
the anchor valid.

An anchor that is missing altogether must not mean "nothing to check" (docs/integrity.md, "Anchors"):

- ``check_anchor(..., required=True)`` (the dataset ledgers) refuses a ledger holding records but no anchor: an
  emptied or replaced anchor folder does not accept an older copy. A ledger's first anchor is written *before* its
  first record (``begin``: sequence -1, "nothing recorded yet"), so a kill between the two leaves an anchor that
  accepts the ledger. Re-anchoring a ledger one trusts is a recorded act (``aisec-train-ledger anchor``).
- The anchor folder is bound to the key: the first anchor written records the folder (and a random id kept in its
  ``.anchor-dir`` marker) in ``KEY_FILE.anchor-dir`` beside the key, tagged under that key. Every later read or
  write refuses another folder (``$AISEC_TRAIN_ANCHOR_DIR`` pointed at a fresh one) or the bound folder without its
  marker (emptied, deleted or replaced). The binding of every key that verifies (the current one and
  ``$AISEC_TRAIN_OLD_KEY_FILES``) is checked, so a fresh key with the real one listed as old does not escape it.

A record set (privacy/record_sets.py) is anchored the same way and its anchor is required too, but it is replaced
as it grows, not appended to: ``write_replacing`` anchors it at {old, new} before the new set lands, then at {new}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aisec_train.store import keys
from aisec_train.store.artifacts import canonical
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import atomic_write, create_exclusive, read_nofollow

ANCHOR_ENV = "AISEC_TRAIN_ANCHOR_DIR"
MARKER = ".anchor-dir"  # in the anchor folder: its random id (not *.json: record_sets lists anchors by that glob)
BINDING_SUFFIX = ".anchor-dir"  # beside the key: KEY_FILE.anchor-dir names the key's anchor folder and its id
REANCHOR = "aisec-train-ledger anchor"


def anchor_dir() -> Path:
    chosen = os.environ.get(ANCHOR_ENV)
    if chosen and not Path(chosen).expanduser().is_absolute():  # " " or "anchors": a fresh folder per working dir
        raise IntegrityError(
            f"${ANCHOR_ENV}={chosen!r} is not allowed: an absolute folder (or ~/...); a relative one follows the "
            "working directory, so a run from another folder would find no anchors"
        )
    return Path(chosen).expanduser().absolute() if chosen else keys.key_path().parent / "anchors"


def anchor_path(ledger_file: Path) -> Path:
    name = hashlib.sha256(os.path.realpath(ledger_file).encode()).hexdigest()[:32]
    return anchor_dir() / f"{name}.json"


def record_digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k not in ("tag", "prev")})).hexdigest()


def binding_path(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + BINDING_SUFFIX)


def _binding_body(anchor_folder: str, marker: str) -> bytes:
    return canonical({"anchor_dir": anchor_folder, "marker": marker})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(read_nofollow(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path} is unreadable ({err}); refusing to use anchors it cannot vouch for") from None
    if not isinstance(body, dict):
        raise IntegrityError(f"{path} is malformed; refusing to use anchors it cannot vouch for")
    return body


def _binding(key_file: Path) -> dict[str, Any] | None:
    """The anchor folder ``key_file`` is bound to, verified under that key itself (None: not bound yet)."""
    path = binding_path(key_file)
    body = _read_json(path)
    if body is None:
        return None
    folder, marker, tag_ = body.get("anchor_dir"), body.get("marker"), body.get("tag")
    key = keys._cached(key_file, create=False)  # noqa: SLF001 - the key this binding sits beside
    ok = isinstance(folder, str) and isinstance(marker, str) and isinstance(tag_, str)
    if not ok or not hmac.compare_digest(tag_, keys._mac(key.secret, _binding_body(folder, marker), "ledger")):  # noqa: SLF001
        raise IntegrityError(f"anchor binding {path} does not verify under the key beside it (edited or forged)")
    return body


def _marker(folder: Path) -> str | None:
    body = _read_json(folder / MARKER)
    if body is not None and not isinstance(body.get("marker"), str):
        raise IntegrityError(f"anchor folder marker {folder / MARKER} is malformed")
    return None if body is None else body["marker"]


def _key_files() -> list[Path]:
    """The key files whose bindings apply: the current key and every verify-only old key that exists."""
    found = [keys.key_path()] + keys.old_key_paths()
    return [path for path in dict.fromkeys(found) if os.path.lexists(path)]


def check_folder(*, create: bool = False) -> Path:
    """The anchor folder, refused unless it is the folder every verifying key is bound to and still holds the
    marker recorded in those bindings. ``create`` (a write): bind an unbound key, marking the folder first."""
    folder = anchor_dir()
    here = os.path.realpath(folder)
    marker = _marker(folder) if folder.is_dir() else None
    unbound = []
    for key_file in _key_files():
        bound = _binding(key_file)
        if bound is None:
            unbound.append(key_file)
            continue
        if bound["anchor_dir"] != here:
            raise IntegrityError(
                f"anchor folder {here} is not the one key {key_file} is bound to ({bound['anchor_dir']}, recorded in "
                f"{binding_path(key_file)}): a fresh anchor folder would forget how long every ledger was. Unset "
                f"${ANCHOR_ENV} (or point it at {bound['anchor_dir']}); moving the anchors is the key owner's act "
                "(docs/integrity.md, 'Anchors')"
            )
        if marker != bound["marker"]:
            what = "has lost the" if marker is None else "holds another marker than the"
            raise IntegrityError(
                f"anchor folder {here} {what} {MARKER} marker key {key_file} is bound to: it was emptied, deleted "
                "or replaced, so no ledger's length can be vouched for; restore it from a backup "
                "(docs/integrity.md, 'Anchors')"
            )
    if create and unbound:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if marker is None:
            create_exclusive(folder / MARKER, json.dumps({"marker": secrets.token_hex(16)}).encode(), root=folder)
            marker = _marker(folder)
        for key_file in unbound:
            if keys.key_path() != key_file:
                continue  # an old key is verify-only: it is never written beside
            body = {"anchor_dir": here, "marker": marker, "at": datetime.now(UTC).isoformat(timespec="seconds")}
            secret = keys.current_key().secret  # tagged under the key it sits beside (rotation-proof)
            body["tag"] = keys._mac(secret, _binding_body(here, str(marker)), "ledger")  # noqa: SLF001
            try:
                create_exclusive(binding_path(key_file), json.dumps(body).encode(), root=key_file.parent)
            except OSError:
                pass  # a read-only key folder (a secrets mount): unbound, as documented; the anchors still work
    return folder


def begin(ledger_file: Path) -> None:
    """Before a ledger's first record: an anchor at sequence -1 ("nothing recorded yet") unless it has one, so a
    kill between the first record and its anchor leaves a ledger its anchor accepts (``required`` refuses one
    with none)."""
    if read_anchor(ledger_file) is None:
        _write(ledger_file, -1, "", durable=True)  # lost to a power cut, it would leave records with no anchor


def write_anchor(ledger_file: Path, records: list[dict[str, Any]]) -> None:
    _write(ledger_file, len(records) - 1, record_digest(records[-1]))


def write_replacing(file: Path, current: dict[str, Any], following: dict[str, Any] | None = None) -> None:
    """The anchor of a file whose one record is *replaced* on each write (a record set: its summary), not appended
    to: it vouches for ``current`` and, while a write is under way, also for ``following`` (written before the file
    is replaced, then made final by a second call without it), so a kill between the file and its anchor leaves a
    file the anchor accepts and never vouches for any third content. ``n``: how many items ``current`` counts."""
    extra = {"n": current.get("n")} if isinstance(current.get("n"), int) else {}
    if following is not None:
        extra["next"] = record_digest(following)
    # the {current, following} anchor must reach the disk before the file is replaced: behind it is not harmless
    _write(file, 0, record_digest(current), durable=following is not None, **extra)


def _write(ledger_file: Path, seq: int, digest: str, *, durable: bool = False, **extra: Any) -> None:
    check_folder(create=True)
    body = {"ledger": os.path.realpath(ledger_file), "seq": seq, "digest": digest, **extra}
    body["tag"] = keys.tag(canonical(body), "ledger")
    path = anchor_path(ledger_file)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(body), root=path.parent, sync_dir=durable)  # behind a ledger is harmless


def read_anchor(ledger_file: Path) -> dict[str, Any] | None:
    check_folder()
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


def check_anchor(ledger_file: Path, records: list[dict[str, Any]] | None, *, required: bool = False) -> None:
    """Refuse a ledger that is shorter than, or differs from, what its anchor recorded; ``required``: also one that
    holds records but has no anchor at all (an emptied or replaced anchor folder)."""
    anchor = read_anchor(ledger_file)
    if anchor is None:
        if required and records:
            raise IntegrityError(
                f"ledger {ledger_file} holds {len(records)} record(s) but has no anchor in {anchor_dir()}: the anchors "
                "were emptied or replaced, or the ledger was copied in, and an older copy would give spent budget "
                f"back; if this ledger is the true one, re-anchor it knowingly: {REANCHOR} "
                f"{ledger_file.stem[:16]} --why TEXT"
            )
        return
    if records is None:
        if anchor["seq"] < 0:
            return  # anchored before its first record, which never landed
        raise IntegrityError(
            f"ledger {ledger_file} is missing but its anchor {anchor_path(ledger_file)} records {anchor['seq'] + 1} "
            "record(s): a deleted ledger does not reset a privacy budget; restore the file"
        )
    seq = anchor["seq"]
    if seq < 0:
        return
    if seq >= len(records) or record_digest(records[seq]) != anchor.get("digest"):
        raise IntegrityError(
            f"ledger {ledger_file} holds {len(records)} record(s) but its anchor {anchor_path(ledger_file)} records "
            f"{seq + 1}: records were removed or the file was rolled back; refusing"
        )


def retag_anchor(ledger_file: Path, records: list[dict[str, Any]]) -> None:
    if records:
        write_anchor(ledger_file, records)
