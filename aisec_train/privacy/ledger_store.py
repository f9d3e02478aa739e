"""The privacy ledger store: every run's spend on a dataset, charged to the data (its manifest hash).

One JSON file per dataset, ``STORE/<manifest sha256>.json``, holds an append-only list of records: the dataset's
budget, each run with its invariants, each charge (Opacus accountant history entries), each recorded target raise
or delta override. Every record is HMAC-tagged and carries the previous record's tag (a chain: editing, deleting
or reordering a record is refused), and every commit moves a keyed anchor kept beside the key (truncating,
rolling back or deleting the file is refused; so is a ledger with records but no anchor: store/anchors.py).
Writes replace the whole file atomically under the dataset's lock, so a kill leaves the old or the new ledger.

Where the store lives (``choose_store``), in order: the ``configured`` path (``privacy.ledger_store`` / ``--store``),
``$AISEC_TRAIN_LEDGER_STORE`` (a whole team or cluster on shared storage), else the user's own store in the
platform's user data folder (``$XDG_DATA_HOME/aisec-train/privacy_ledgers``, ``~/.local/share/...``): never a
folder relative to the working directory, so the same user on the same data meets the same budget from anywhere.
``scratch`` (as either setting) is a throwaway store per run directory for experiments: the report marks it as
not the team's ledger.

    >>> with LedgerStore().open(manifest_sha256, wait=60) as led:
    ...     led.begin_run(run_id, delta=1e-5, accountant="prv", sample_rate=q, noise_multiplier=s, split_seed=0,
    ...                   target_epsilon=3.0, n_train=n)
    ...     allowed = led.steps_within(noise_multiplier=s, sample_rate=q, limit=planned)
    ...     led.charge(run_id, [(s, q, steps_just_taken)])     # before the checkpoint holding those steps
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aisec_train.privacy import budget
from aisec_train.privacy.ledger_rules import LedgerRules, check_reason
from aisec_train.store import anchors, keys
from aisec_train.store.artifacts import canonical
from aisec_train.store.errors import IntegrityError, StoreError
from aisec_train.store.files import atomic_write, read_nofollow, validate_output_path
from aisec_train.store.locks import exclusive_lock, held_by
from aisec_train.store.timing import timed

FORMAT = "aisec-train-ledger/1"
STORE_ENV = "AISEC_TRAIN_LEDGER_STORE"
_DATASET = re.compile(r"[0-9a-f]{64}")
_NUM, _STR, _INT = (int, float), (str,), (int,)
_COMMON = {"seq": _INT, "kind": _STR, "at": _STR, "who": _STR, "host": _STR, "prev": _STR, "dataset": _STR}
SCHEMA: dict[str, dict[str, tuple]] = {
    "budget": {"run_id": _STR, "target_epsilon": _NUM, "delta": _NUM, "accountant": _STR},
    "run": {"run_id": _STR, "invariants": (dict,), "target_epsilon": (int, float, type(None)), "n_train": _INT},
    "charge": {"run_id": _STR, "history": (list,)},
    "raise": {"target_epsilon": _NUM, "previous": _NUM, "why": _STR},
    "delta_override": {"run_id": _STR, "delta": _NUM, "n_train": _INT, "why": _STR},
    "retag": {"to_key": _STR, "from_keys": (list,)},
    # a run-scoped run allowed past the dataset's target: how much, and the reason given (privacy.budget_reason)
    "exceed": {"run_id": _STR, "target_epsilon": _NUM, "epsilon_before": _NUM, "epsilon_after": _NUM, "why": _STR},
    "refusal": {"run_id": _STR, "why": _STR},  # a run refused before its first step, and the refusal's line
    # the ledger re-anchored knowingly (aisec-train-ledger anchor): how many records it held, what the anchor folder
    # held for it before (None: no anchor; else the record count that anchor vouched for), and why
    "anchor": {"records": _INT, "previous": (int, type(None)), "why": _STR},
}


SCRATCH = "scratch"


@dataclass(frozen=True)
class StoreChoice:
    """Which ledger store a run charges, and why that one (the report records all three)."""

    path: Path
    source: str  # "privacy.ledger_store", "$AISEC_TRAIN_LEDGER_STORE" or "user data folder"
    scratch: bool  # a throwaway store for experiments: not the team's ledger


def user_data_dir() -> Path:
    """The platform's per-user data folder for aisec-train (platformdirs when installed, else the XDG rule)."""
    try:
        from platformdirs import user_data_dir as platform_dir
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base).expanduser().absolute() / "aisec-train"
    return Path(platform_dir("aisec-train", appauthor=False)).absolute()


def choose_store(
    configured: str | os.PathLike | None = None, *, run_id: str | None = None, key: str = "privacy.ledger_store"
) -> StoreChoice:
    """The store: ``configured``, else ``$AISEC_TRAIN_LEDGER_STORE``, else the user's data folder; ``scratch`` is a
    store of the run's own (``run_id``: its directory) under the user's data folder. ``key``: what a refusal calls
    ``configured`` (``--store`` on aisec-train-ledger's command line)."""
    for source, chosen in ((key, configured), (f"${STORE_ENV}", os.environ.get(STORE_ENV))):
        if chosen and not str(chosen).strip():  # Path(" "): a fresh store (and budget) in the working directory
            raise StoreError(
                f"{source}={str(chosen)!r} is not allowed: a ledger store folder, not blank (unset it for the default)"
            )
        if chosen and str(chosen) == SCRATCH:
            tail = hashlib.sha256(str(run_id).encode()).hexdigest()[:16] if run_id else ""
            return StoreChoice(user_data_dir() / "scratch_ledgers" / tail, source, True)
        if chosen and not Path(chosen).expanduser().is_absolute():  # resolved per working directory: cd, fresh budget
            raise StoreError(
                f"{source}={str(chosen)!r} is not allowed: an absolute folder (or ~/...); a relative one follows the "
                "working directory, so a run from another folder would charge a fresh, empty budget"
            )
        if chosen:
            return StoreChoice(Path(chosen).expanduser().absolute(), source, False)
    return StoreChoice(user_data_dir() / "privacy_ledgers", "user data folder", False)


def resolve_store_path(configured: str | os.PathLike | None = None, *, registry_path: str | None = None) -> Path:
    """The store folder (``choose_store``); ``registry_path`` is accepted for old callers and no longer used: the
    store used to sit beside the registry, which followed the working directory."""
    return choose_store(configured).path


def check_dataset(dataset_sha256: object) -> str:
    if not (isinstance(dataset_sha256, str) and _DATASET.fullmatch(dataset_sha256)):
        raise IntegrityError(f"dataset hash {dataset_sha256!r} is not allowed: 64 lowercase hexadecimal characters")
    return dataset_sha256


def who() -> tuple[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return user, socket.gethostname()


class DatasetLedger(LedgerRules):
    """One dataset's ledger. Mutations need the dataset lock: held by this object (``LedgerStore.open``) or by the
    process that handed it over (``delegate()``, for data-parallel ranks and federated clients)."""

    def __init__(self, store: Path, dataset_sha256: str, token: str | None = None, *, reanchor: bool = False):
        self.store, self.dataset, self.token = Path(store), check_dataset(dataset_sha256), token
        self._cache: tuple[tuple, list[dict[str, Any]]] | None = None
        # reanchor: verified but for the anchor itself, whose refusal is kept for ``reanchor()`` (the CLI's only)
        self._reanchor, self.anchor_problem = reanchor, None

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "dataset": self.dataset, "token": self.token, "_cache": None,
                "_reanchor": False, "anchor_problem": None}  # fmt: skip

    @property
    def file(self) -> Path:
        return self.store / f"{self.dataset}.json"

    @property
    def lock_path(self) -> Path:
        return self.store / f"{self.dataset}.lock"

    def delegate(self) -> DatasetLedger:
        """A picklable handle that a child process may charge through while this one holds the lock."""
        return DatasetLedger(self.store, self.dataset, self.token)

    @property
    @timed("ledger.read")
    def records(self) -> list[dict[str, Any]]:
        """Every record, verified (keyed tags, chain, anchor); [] for a dataset never trained on."""
        try:
            st = os.stat(self.file, follow_symlinks=False)
        except FileNotFoundError:
            anchors.check_anchor(self.file, None, required=True)
            return []
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self._verified(read_nofollow(self.file, root=self.store)))
        return self._cache[1]

    def _verified(self, raw: bytes) -> list[dict[str, Any]]:
        try:
            body = json.loads(raw)
            records = body["records"]
            ok = body.get("format") == FORMAT and body.get("dataset") == self.dataset and isinstance(records, list)
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise IntegrityError(f"ledger {self.file} is not a {FORMAT} file for dataset {self.dataset}; refusing")
        prev = ""
        for seq, record in enumerate(records):
            what = f"ledger {self.file} record {seq}"
            if not isinstance(record, dict):
                raise IntegrityError(f"{what} is not an object; refusing")
            keys.verify(
                canonical({k: v for k, v in record.items() if k != "tag"}), record.get("tag"), "ledger", what=what
            )
            _check_schema(record, what)
            if record["seq"] != seq or record["prev"] != prev or record["dataset"] != self.dataset:
                raise IntegrityError(f"{what} is out of place (deleted or reordered records); refusing")
            prev = record["tag"]
        if not self._reanchor:
            anchors.check_anchor(self.file, records, required=True)
            return records
        anchors.check_folder()  # a re-anchor still refuses a fresh or emptied anchor folder
        try:
            anchors.check_anchor(self.file, records, required=True)
        except IntegrityError as err:
            self.anchor_problem = str(err)
        return records

    @timed("ledger.commit")
    def _commit(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._require_lock()
        records = list(self.records)
        user, host = who()
        record = {"seq": len(records), "kind": kind, "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        record |= {"who": user, "host": host, "dataset": self.dataset, **fields}
        record["prev"] = records[-1]["tag"] if records else ""
        _check_schema(record, f"new {kind} record")
        record["tag"] = keys.tag(canonical(record), "ledger")
        self._write(records + [record])
        return record

    def _write(self, records: list[dict[str, Any]]) -> None:
        body = {"format": FORMAT, "dataset": self.dataset, "records": records}
        if not os.path.lexists(self.file):  # a first record: anchored (at "nothing yet") before it lands
            anchors.begin(self.file)
        atomic_write(self.file, json.dumps(body, indent=1), root=self.store)
        anchors.write_anchor(self.file, records)
        st = os.stat(self.file, follow_symlinks=False)  # what we just wrote needs no second verification
        self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), records)

    def _require_lock(self) -> None:
        if self.token is None or not held_by(self.lock_path, self.token):
            raise IntegrityError(f"ledger {self.file} is changed only under its lock; open it with LedgerStore.open()")

    def retag(self) -> int:
        """Re-tag every record under the current key (verified first under current or old keys); return count."""
        records = self.records
        old = sorted({keys.tag_key_id(r["tag"]) for r in records} - {keys.current_key().id})
        if not old:
            return 0
        self._require_lock()
        prev, fresh = "", []
        for record in records:
            body = {k: v for k, v in record.items() if k != "tag"} | {"prev": prev}
            body["tag"] = prev = keys.tag(canonical(body), "ledger")
            fresh.append(body)
        self._write(fresh)
        self._commit("retag", to_key=keys.current_key().id, from_keys=old)
        return len(records)

    def reanchor(self, *, why: str) -> dict[str, Any]:
        """Anchor this ledger as it is, knowingly (``aisec-train-ledger anchor``): for a ledger whose anchor was
        lost (or that is restored from a backup older than its anchor) and that the key owner trusts. Recorded:
        who, host, when, why, the records it holds and what the anchor folder held for it."""
        why = check_reason(why, "--why")
        if not self._reanchor:
            raise IntegrityError(f"ledger {self.file} is re-anchored only through LedgerStore.open(..., reanchor=True)")
        records = self.records
        if not records:
            raise IntegrityError(f"no ledger for dataset {self.dataset} in {self.store}; nothing to anchor")
        if self.anchor_problem is None:
            raise IntegrityError(
                f"ledger {self.file} is anchored and verifies ({len(records)} record(s)); nothing to re-anchor"
            )
        try:
            found = anchors.read_anchor(self.file)
        except IntegrityError:
            found = None  # an unreadable or forged anchor vouches for nothing: replaced below
        previous = None if found is None else int(found["seq"]) + 1
        record = self._commit("anchor", records=len(records), previous=previous, why=why)
        self.anchor_problem = None
        return record


def _check_schema(record: dict[str, Any], what: str) -> None:
    spec = SCHEMA.get(record.get("kind"))  # type: ignore[arg-type]
    if spec is None:
        raise IntegrityError(f"{what} has unknown kind {record.get('kind')!r}; refusing")
    for name, types in (_COMMON | spec).items():
        value = record.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise IntegrityError(f"{what}: field {name!r}={value!r} is missing or of the wrong type; refusing")
    if record["kind"] == "charge":
        for entry in record["history"]:
            budget.check_entry(entry, what)


class LedgerStore:
    """The project's ledger store (a folder of per-dataset ledgers)."""

    def __init__(self, path: str | os.PathLike | None = None, *, run_id: str | None = None, key: str | None = None):
        self.choice = choose_store(path, run_id=run_id, key=key or "privacy.ledger_store")
        self.path = self.choice.path

    @contextmanager
    def open(
        self, dataset_sha256: str, *, wait: bool | float = False, reanchor: bool = False
    ) -> Iterator[DatasetLedger]:
        """The dataset's ledger, verified, under its exclusive lock for the whole block (a second job on the
        same data waits up to ``wait`` seconds, or refuses in one line naming the holder). ``reanchor``: for
        ``DatasetLedger.reanchor`` alone, its anchor is not required to agree."""
        with self.lock(dataset_sha256, wait=wait) as held:
            ledger = DatasetLedger(self.path, dataset_sha256, held.token, reanchor=reanchor)
            ledger.records  # noqa: B018 - verify before the caller does anything
            yield ledger

    def lock(self, dataset_sha256: str, *, wait: bool | float = False, why: str = ""):
        """The dataset's exclusive lock (``STORE/<dataset>.lock``), for a job that charges its ledger or, while
        the job runs, reads its spend as final (``why`` is added to the refusal's name for the lock)."""
        lock = self.path / f"{check_dataset(dataset_sha256)}.lock"
        return exclusive_lock(lock, wait=wait, what=f"privacy ledger of dataset {dataset_sha256[:16]}{why}")

    def validate(self, dataset_sha256: str) -> None:
        """Before training: the dataset's ledger can be written without following a symlink, and it verifies."""
        validate_output_path(self.path / f"{check_dataset(dataset_sha256)}.json", what="privacy ledger store")
        _ = self.view(dataset_sha256).records

    def view(self, dataset_sha256: str) -> DatasetLedger:
        """A read-only, verified view (no lock: files are replaced atomically, so a read is always whole)."""
        return DatasetLedger(self.path, dataset_sha256)

    def datasets(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.stem for p in self.path.glob("*.json") if _DATASET.fullmatch(p.stem))

    def find(self, prefix: str) -> str:
        """The dataset hash that ``prefix`` (at least 4 hexadecimal characters, as refusals print) starts; an
        ambiguous or unknown prefix is refused in one line naming the candidates."""
        prefix = str(prefix).lower()
        if _DATASET.fullmatch(prefix):
            return prefix
        if not re.fullmatch(r"[0-9a-f]{4,63}", prefix):
            raise IntegrityError(f"dataset hash {prefix!r} is not allowed: 4 to 64 lowercase hexadecimal characters")
        found = [ds for ds in self.datasets() if ds.startswith(prefix)]
        if len(found) != 1:
            which = f"{len(found)} match: {', '.join(found)}" if found else "none matches"
            raise IntegrityError(f"dataset hash prefix {prefix} is ambiguous or unknown in {self.path} ({which})")
        return found[0]
