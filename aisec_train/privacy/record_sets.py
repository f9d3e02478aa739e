"""The budget store's record sets: per dataset, the sorted digests of the records trained on, and the spend
composed per record across every dataset that holds it.

A dataset's ledger (ledger_store.py) is keyed by its manifest hash, which changes with a file's name, the row
order or the container. Privacy is spent on records, so the store also keeps, per dataset, the set of its
training records' content digests (aisec_train/data/records.py): ``STORE/records/<dataset>.digests``, 16 bytes a
record, sorted, keyed-tagged and anchored like a ledger (a rolled-back or deleted set is refused). Sets only grow:
a run on another split of the same dataset adds its records, and every charge to the dataset counts for all of
them (conservative).

The spend charged to a record is every ledger whose dataset holds it, composed. Before any step, a run is refused
if any record it would train on would go past its target: the smallest target of the datasets holding it (a
record does not get a fresh budget by being copied into a dataset with a higher one).

    >>> shared = register_and_share(ledger, data.record_digests, hold=run.resources)  # under the dataset's lock
    >>> allowed = shared.require_steps(ledger, noise_multiplier=s, sample_rate=q, limit=n, target_epsilon=3.0)
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aisec_train.privacy import budget
from aisec_train.privacy.ledger_rules import check_reason
from aisec_train.privacy.ledger_store import _DATASET, DatasetLedger, LedgerStore, check_dataset
from aisec_train.store import anchors, keys
from aisec_train.store.errors import BudgetError, IntegrityError
from aisec_train.store.files import atomic_write, read_nofollow
from aisec_train.store.timing import timed

if TYPE_CHECKING:
    from aisec_train.privacy.accounting import History

FORMAT = b"aisec-train-records/1\n"
DIGEST = np.dtype("V16")
REANCHOR = anchors.REANCHOR  # aisec-train-ledger anchor: re-anchors the dataset's record set when its ledger verifies
# another dataset holding some of a run's records: (hash, which records, its history, its target, its terms)
Member = tuple[str, np.ndarray, "History", float | None, list[tuple[str, float, str]]]


def as_set(digests: np.ndarray) -> np.ndarray:
    """Sorted, distinct 16-byte digests. (Sorted as fixed-width byte strings: numpy sorts ``S16`` twice as fast
    as ``V16``, and with a fixed width the padding rule cannot make two distinct digests equal; neighbours are
    compared as integer pairs, ten times faster than ``np.unique``'s string comparison.)"""
    if len(digests) == 0:
        return np.empty(0, dtype=DIGEST)
    ordered = np.sort(np.ascontiguousarray(digests, dtype=DIGEST).view("S16"))
    pairs = ordered.view("<u8").reshape(-1, 2)
    distinct = np.ones(len(ordered), dtype=bool)
    distinct[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    return ordered[distinct].view(DIGEST)


def contains(sorted_set: np.ndarray, query: np.ndarray) -> np.ndarray:
    """For each digest of ``query``: is it in ``sorted_set``?"""
    if len(sorted_set) == 0 or len(query) == 0:
        return np.zeros(len(query), dtype=bool)
    s, q = sorted_set.view("S16"), np.ascontiguousarray(query, dtype=DIGEST).view("S16")
    at = np.minimum(np.searchsorted(s, q), len(s) - 1)
    return s[at] == q


class RecordSets:
    """The store's folder of per-dataset record sets."""

    def __init__(self, store: str | os.PathLike):
        self.folder = Path(store) / "records"

    def path(self, dataset: str) -> Path:
        return self.folder / f"{check_dataset(dataset)}.digests"

    def datasets(self) -> list[str]:
        """Every dataset with a record set here, or whose set's anchor says it had one: a deleted or renamed set
        is then refused by ``load``, never skipped as if it had not been."""
        found = {p.stem for p in self.folder.glob("*.digests")} if self.folder.is_dir() else set()
        return sorted(name for name in found | self._anchored() if _DATASET.fullmatch(name))

    def _anchored(self) -> set[str]:
        """Datasets whose record-set anchor (kept beside the key, out of the store's reach) names this folder.
        Only the anchor's path is read here; ``load`` verifies its keyed tag."""
        folder, found = os.path.realpath(self.folder), set()
        for path in anchors.anchor_dir().glob("*.json"):
            try:
                named = Path(json.loads(path.read_bytes())["ledger"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not an anchor we can read: whatever it guards refuses when opened
            if str(named.parent) == folder and named.suffix == ".digests":
                found.add(named.stem)
        return found

    @timed("records.read")
    def load(self, dataset: str) -> np.ndarray:
        """The dataset's record set, verified (tag, anchor); empty for a dataset never registered."""
        return self._read(dataset)[0]

    def _read(self, dataset: str) -> tuple[np.ndarray, dict[str, Any] | None]:
        """The verified set and its anchor (None: no set was ever anchored here and none is on disk)."""
        path = self.path(dataset)
        try:
            raw = read_nofollow(path, root=self.folder)
        except FileNotFoundError:
            anchor = anchors.read_anchor(path)
            if anchor is not None and anchor["seq"] >= 0:  # the set was written here once: deleted or renamed since
                raise IntegrityError(
                    f"record set {path} is missing but its anchor {anchors.anchor_path(path)} records it: a deleted "
                    "or renamed record set does not free its records' privacy spend; restore the file"
                ) from None
            return np.empty(0, dtype=DIGEST), anchor  # never written, or a first write that never landed
        body = self._verified(dataset, path, raw)
        return np.frombuffer(body, dtype=DIGEST), self._check_anchor(dataset, path, body)

    def _verified(self, dataset: str, path: Path, raw: bytes) -> bytes:
        """The set's digests, its format and keyed tag verified (not its anchor)."""
        head, _, rest = raw.partition(b"\n")
        meta_line, _, body = rest.partition(b"\n")
        try:
            meta = json.loads(meta_line)
            ok = head + b"\n" == FORMAT and meta["dataset"] == dataset and meta["n"] * DIGEST.itemsize == len(body)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise IntegrityError(f"record set {path} is not an {FORMAT.decode().strip()} file of dataset {dataset}")
        keys.verify(_signed(dataset, body), meta.get("tag"), "ledger", what=f"record set {path}")
        return body

    def retag(self, ledger: DatasetLedger) -> bool:
        """Re-tag the dataset's record set and its anchor under the current key (a key rotation's ``retag``;
        verified first under the current or an old key); False when both are under it already or there is no set.
        The digests do not change, so the anchor, which leaves the tags out, accepts the set before and after."""
        ledger._require_lock()  # noqa: SLF001
        digests, anchor = self._read(ledger.dataset)
        path, current = self.path(ledger.dataset), keys.current_key().id
        raw = read_nofollow(path, root=self.folder) if len(digests) else None
        if raw is None or anchor is None:
            return False
        meta = json.loads(raw.split(b"\n", 2)[1])
        if keys.tag_key_id(meta["tag"]) == current and keys.tag_key_id(anchor.get("tag")) == current:
            return False
        body = digests.tobytes()
        meta["tag"] = keys.tag(_signed(ledger.dataset, body), "ledger")
        atomic_write(path, FORMAT + json.dumps(meta).encode() + b"\n" + body, root=self.folder)
        anchors.write_replacing(path, _summary(body))  # (also makes final an anchor a kill left unfinished)
        return True

    def _check_anchor(self, dataset: str, path: Path, body: bytes) -> dict[str, Any]:
        """Refuse a set its anchor does not vouch for, and one with no anchor at all (required, as for ledgers:
        one anchor file deleted, or the set copied in, must not let an older copy through). The anchor vouches
        for one content (two while a write is under way: ``anchors.write_replacing``); sequence -1 (``begin``) is
        a first write whose anchor never moved, the state a kill leaves."""
        anchor = anchors.read_anchor(path)
        n = len(body) // DIGEST.itemsize
        fix = f"if this set is the true one, re-anchor it knowingly: {REANCHOR} {dataset[:16]} --why TEXT"
        if anchor is None:
            raise IntegrityError(
                f"record set {path} holds {n} record digest(s) but has no anchor in {anchors.anchor_dir()}: its "
                "anchor was deleted, the anchors were emptied or replaced, or the set was copied in, and an older "
                f"copy would free its records' privacy spend; {fix}"
            )
        if anchor["seq"] >= 0 and anchors.record_digest(_summary(body)) not in (anchor["digest"], anchor.get("next")):
            had = f" of {anchor['n']} record digest(s)" if isinstance(anchor.get("n"), int) else ""
            raise IntegrityError(
                f"record set {path} holds {n} record digest(s) but its anchor {anchors.anchor_path(path)} records "
                f"another set{had}: the set was cut back or replaced by an older copy; refusing ({fix})"
            )
        return anchor

    @timed("records.write")
    def add(self, ledger: DatasetLedger, digests: np.ndarray) -> np.ndarray:
        """Add ``digests`` to the ledger's dataset's set (the caller holds the dataset's lock); return the set.

        Crash-safe like a ledger: a first set is anchored at "nothing yet" (``anchors.begin``) before it lands, a
        grown one at "the old or the new set" (``anchors.write_replacing``), then at the new set alone; the next
        ``add`` makes an anchor a kill left unfinished final, so it never keeps vouching for an older set."""
        ledger._require_lock()  # noqa: SLF001 - the same lock guards the ledger and its record set
        old, anchor = self._read(ledger.dataset)
        new = as_set(np.concatenate([old, np.ascontiguousarray(digests, dtype=DIGEST)]))
        path = self.path(ledger.dataset)
        if len(new) == len(old):
            if len(old) and anchor is not None and (anchor["seq"] < 0 or "next" in anchor):
                anchors.write_replacing(path, _summary(old.tobytes()))  # a write a kill left unfinished
            return old
        body = new.tobytes()
        meta = {"dataset": ledger.dataset, "n": len(new), "tag": keys.tag(_signed(ledger.dataset, body), "ledger")}
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if anchor is None or not len(old):
            anchors.begin(path)  # no set yet: anchored at "nothing recorded" before it lands
        else:
            anchors.write_replacing(path, _summary(old.tobytes()), _summary(body))
        atomic_write(path, FORMAT + json.dumps(meta).encode() + b"\n" + body, root=self.folder)
        anchors.write_replacing(path, _summary(body))
        return new

    def reanchor(self, ledger: DatasetLedger, *, why: str) -> dict[str, Any]:
        """Anchor the dataset's record set as it is, knowingly: for a set refused for its anchor (lost, or left
        behind by an anchor folder restored from an older backup) that the key owner trusts. Its keyed tag must
        verify (only this store writes a set) and the anchor folder must be the bound one. Recorded in the
        dataset's ledger as an ``anchor`` record (who, host, when; ``records``: the set's size, ``previous``: the
        size its old anchor vouched for, None for none; ``why`` begins "record set"). Needs the dataset's lock."""
        why = check_reason(why, "--why")
        ledger._require_lock()  # noqa: SLF001
        anchors.check_folder()  # a fresh or emptied anchor folder is refused, not re-anchored
        path = self.path(ledger.dataset)
        try:
            raw = read_nofollow(path, root=self.folder)
        except FileNotFoundError:
            raise IntegrityError(
                f"no record set for dataset {ledger.dataset} in {self.folder}; nothing to anchor"
            ) from None
        body = self._verified(ledger.dataset, path, raw)
        n = len(body) // DIGEST.itemsize
        try:
            self._check_anchor(ledger.dataset, path, body)
        except IntegrityError:
            pass
        else:
            raise IntegrityError(
                f"record set {path} is anchored and verifies ({n} record digest(s)); nothing to re-anchor"
            )
        try:
            found = anchors.read_anchor(path)
        except IntegrityError:
            found = None  # an unreadable or forged anchor vouches for nothing: replaced below
        previous = found.get("n") if found is not None and isinstance(found.get("n"), int) else None
        was = "no anchor" if found is None else "an anchor of another set"
        record = ledger._commit(  # noqa: SLF001 - recorded first: a kill before the anchor moves leaves it refused
            "anchor", records=n, previous=previous, why=f"record set of {n} record digest(s) (was {was}): {why}"
        )
        anchors.write_replacing(path, _summary(body))
        return record


def _signed(dataset: str, body: bytes) -> bytes:
    return b"aisec-train records\0" + dataset.encode() + b"\0" + body


def _summary(body: bytes) -> dict[str, Any]:
    return {"n": len(body) // DIGEST.itemsize, "sha256": hashlib.sha256(body).hexdigest()}


@dataclass(frozen=True)
class Group:
    """Records of this run that other datasets also hold: which datasets, how many records, their spend."""

    datasets: tuple[str, ...]
    n_records: int
    history: History
    target_epsilon: float | None  # the smallest target of those datasets (None: none has a budget)
    # (dataset, delta, accountant) each of those datasets is accounted at: its budget's, else its runs' own
    terms: tuple[tuple[str, float, str], ...] = ()


@dataclass
class SharedSpend:
    """What other datasets have spent on this run's records (picklable: data-parallel rank 0 charges with it)."""

    n_records: int
    groups: list[Group] = field(default_factory=list)

    def shared_with(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for group in self.groups:
            for name in group.datasets:
                counts[name] = counts.get(name, 0) + group.n_records
        return counts

    def _target(self, group: Group, own: dict[str, Any], run_target: float | None) -> float:
        targets = [own["target_epsilon"], run_target, group.target_epsilon]
        return min(float(t) for t in targets if t is not None)

    def require_steps(
        self, ledger: DatasetLedger, *, noise_multiplier: float, sample_rate: float, limit: int,
        target_epsilon: float | None = None,
    ) -> int:  # fmt: skip
        """The most new steps (0..``limit``) that keep every shared record within its target; refuses (one line)
        when a shared record allows none. (For ``budget_scope=dataset``, whose dataset always has a budget by
        admission; ``budget_scope=run`` is held to the records' target through :meth:`limits`.)"""
        own = ledger.budget()
        if own is None:
            raise BudgetError(f"dataset {ledger.dataset[:16]} has no budget; call begin_run first")
        if not self.groups:
            return limit
        self.check_terms(ledger, own)
        if limit <= 0:  # the dataset's own refusal names it
            return limit
        for group in self.groups:
            target = self._target(group, own, target_epsilon)
            prior = ledger.history() + group.history
            limit = budget.steps_within(
                prior, noise_multiplier=noise_multiplier, sample_rate=sample_rate, target_epsilon=target,
                limit=limit, delta=own["delta"], accountant=own["accountant"],
            )  # fmt: skip
            if limit <= 0:
                spent = budget.compose_epsilon(prior, delta=own["delta"], accountant=own["accountant"])
                others = _names(group)
                raise BudgetError(
                    f"privacy budget exhausted for {group.n_records} record(s) of dataset {ledger.dataset[:16]} that "
                    f"dataset(s) {others} also hold: epsilon {spent:.3f} composed over every run on them, target "
                    f"{target}; nothing was trained. Records are charged by content (a renamed, reordered, cast or "
                    "re-encoded copy shares its original's budget; docs/privacy.md)"
                )
        return limit

    def binding(self, ledger: DatasetLedger, added: tuple[float, float, int]) -> tuple[str, float, float, float]:
        """For a refusal whose binding limit is shared records: the group whose spend after ``added`` (noise,
        sample rate, steps) passes its target furthest, as (which records, spent, after, target)."""
        own = ledger.budget()
        assert own is not None and self.groups
        terms = {"delta": own["delta"], "accountant": own["accountant"]}
        rows = []
        for group in self.groups:
            prior = ledger.history() + group.history
            spent, after = (budget.compose_epsilon(h, **terms) for h in (prior, [*prior, added]))
            target = self._target(group, own, None)
            what = f"{group.n_records} record(s) that dataset(s) {_names(group)} also hold"
            rows.append((after - target, (what, spent, after, target)))
        return max(rows, key=lambda row: row[0])[1]

    def check_terms(self, ledger: DatasetLedger, own: dict[str, Any]) -> None:
        """Refuse (one line) a run whose delta or accountant differs from those of a dataset sharing its records.

        A record is charged every ledger whose dataset holds it, composed; that sum is only meaningful at one delta
        by one accountant. At the run's own, looser delta it understates the spend at the delta the other datasets'
        guarantee is stated at (a byte-identical copy at delta 6e-4 showed 2.19 of 3 where its original, at 1e-5,
        was at 3.28), and a copy must not pick terms its original refuses. Composing at the strictest delta would
        also be sound, but the dataset's own ledger and its records' spend would then be reported at two deltas,
        and a group mixing accountants has no single right one (GDP can under-count): so, as for one dataset,
        every dataset holding a record is accounted at one delta by one accountant."""
        counts = self.shared_with()
        for group in self.groups:
            for name, delta, accountant in group.terms:
                if delta == own["delta"] and accountant == own["accountant"]:
                    continue
                raise BudgetError(
                    f"privacy.delta={own['delta']!r} with privacy.accountant={own['accountant']!r} differs from "
                    f"dataset {name[:16]} (delta {delta!r}, accountant {accountant!r}), which holds "
                    f"{counts.get(name, 0)} of the records of dataset {ledger.dataset[:16]}: records shared between "
                    "datasets are accounted at one delta by one accountant (a looser delta would understate their "
                    f"spend); run with privacy.delta={delta!r} privacy.accountant={accountant}"
                )

    def limits(self, ledger: DatasetLedger, terms: dict[str, Any]) -> list[tuple[History, float | None, str]]:
        """For ``budget_scope=run`` (ledger_rules.admit_past_target): per group of shared records, the other
        datasets' history, their smallest target and which records they are. Refuses (one line) terms (the
        dataset's budget's, else the run's own delta and accountant) that differ from those datasets'."""
        self.check_terms(ledger, terms)
        return [
            (g.history, g.target_epsilon, f"{g.n_records} record(s) that dataset(s) {_names(g)} also hold")
            for g in self.groups
        ]

    def records(self, ledger: DatasetLedger, terms: dict[str, Any] | None) -> list[tuple[float, float | None]]:
        """(composed spend, target) of each kind of this run's records: those only this dataset holds, then each
        group shared with other datasets (every run on every dataset holding them; the smallest of their targets).
        ``terms``: the delta and accountant when the dataset has no budget yet (its run's)."""
        own = ledger.budget()
        terms = own or terms
        if terms is None:
            return []
        mine = None if own is None else float(own["target_epsilon"])
        kinds = [(ledger.history(), mine)] + [
            (ledger.history() + g.history, _smallest(mine, g.target_epsilon)) for g in self.groups
        ]
        return [(budget.compose_epsilon(h, delta=terms["delta"], accountant=terms["accountant"]), t) for h, t in kinds]

    def records_epsilon(self, ledger: DatasetLedger, terms: dict[str, Any] | None = None) -> float:
        """The largest composed spend of any of this run's records (every dataset holding it, every run)."""
        return max((spent for spent, _ in self.records(ledger, terms)), default=0.0)

    def summary(self, ledger: DatasetLedger, terms: dict[str, Any] | None = None) -> dict[str, Any]:
        """``n``, ``shared_with``, ``epsilon_max`` (the largest spend of any record), ``target_epsilon`` (that
        record's target: the smallest of the datasets holding it) and ``exceeded`` (some record is past its
        target: only ever on record, by budget_scope=run with privacy.budget_reason)."""
        found = self.records(ledger, terms)
        top = max(found, key=lambda r: r[0], default=(0.0, None))
        return {
            "n": self.n_records,
            "shared_with": {name[:16]: n for name, n in self.shared_with().items()},
            "epsilon_max": top[0],
            "target_epsilon": top[1],
            "exceeded": any(t is not None and spent > t + 1e-9 for spent, t in found),
        }


def _smallest(*targets: float | None) -> float | None:
    return min((float(t) for t in targets if t is not None), default=None)


def _names(group: Group) -> str:
    return ", ".join(d[:16] for d in group.datasets)


@timed("records.share")
def register_and_share(
    ledger: DatasetLedger, digests: np.ndarray, *, hold: ExitStack, wait: bool | float = False
) -> SharedSpend:
    """Add this run's training records to its dataset's set (under the dataset's lock, before any step), then
    find every other dataset of the ledger's store that holds any of them and has spent on it.

    Each such dataset's lock is taken into ``hold`` (kept until the run's last charge; waiting up to ``wait``
    seconds, else refused in one line naming the holder) before its spend is read: a run on a copy of the
    records cannot then be admitted on a spend that a job still running on the other dataset has yet to charge.
    Of two such jobs started at once, the one that registers its records second finds the first's set and waits
    for it (or is refused); if both register before either looks, each waits for the other's lock and both are
    refused when ``wait`` runs out, never both admitted."""
    sets, ledgers = RecordSets(ledger.store), LedgerStore(ledger.store)
    mine = as_set(digests)
    sets.add(ledger, mine)
    members: list[Member] = []
    # Every dataset with a record set or a ledger: a set whose file was deleted or renamed is not in the folder's
    # listing, but its dataset's ledger is, and loading it then meets the set's anchor (refused as tampering).
    for other in sorted(set(sets.datasets()) | set(ledgers.datasets())):
        if other == ledger.dataset:
            continue
        inside = contains(sets.load(other), mine)  # first: most datasets of a store share nothing with this one
        if not inside.any():
            continue
        why = f" (it holds {int(inside.sum())} of this run's records, so its spend is part of theirs)"
        hold.enter_context(ledgers.lock(other, wait=wait, why=why))
        inside = contains(sets.load(other), mine)  # as it is now that no job can add to it
        view = ledgers.view(other)
        history = view.history()
        if history:  # registered but never charged: nothing to compose
            members.append((other, inside, history, view.target_epsilon, _terms(view)))
    return SharedSpend(len(mine), _groups(members))


def _terms(view: DatasetLedger) -> list[tuple[str, float, str]]:
    """The (delta, accountant) a dataset is accounted at: its budget's; without one (only run-scoped runs without
    a target so far), each of its runs' own."""
    b = view.budget()
    found = [(b["delta"], b["accountant"])] if b is not None else []
    found = found or [(r["invariants"]["delta"], r["invariants"]["accountant"]) for r in view.runs().values()]
    return [(view.dataset, float(delta), str(accountant)) for delta, accountant in dict.fromkeys(found)]


def _groups(members: list[Member]) -> list[Group]:
    """One group per maximal set of datasets that hold a record together (a record in a subset of another
    group's datasets has no more spend and no lower target, so it never binds)."""
    if not members:
        return []
    rows, counts = np.unique(np.stack([m[1] for m in members], axis=1), axis=0, return_counts=True)
    keep = [i for i, r in enumerate(rows) if r.any() and not any((r <= s).all() and (r != s).any() for s in rows)]
    groups = []
    for i in keep:
        chosen = [m for m, bit in zip(members, rows[i], strict=True) if bit]
        targets = [t for _, _, _, t, _ in chosen if t is not None]
        groups.append(
            Group(
                datasets=tuple(name for name, _, _, _, _ in chosen),
                n_records=int(counts[i]),
                history=budget.merge(e for _, _, h, _, _ in chosen for e in h),
                target_epsilon=min(targets) if targets else None,
                terms=tuple(term for *_, terms in chosen for term in terms),
            )
        )
    return groups
