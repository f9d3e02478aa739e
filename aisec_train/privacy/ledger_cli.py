"""``aisec-train-ledger``: show, verify and raise the privacy budget charged to each dataset.

    aisec-train-ledger [--store DIR] list                                   # every dataset: runs, steps, epsilon
    aisec-train-ledger [--store DIR] show DATASET_HASH [--json]             # runs, refusals, raises, tag status
    aisec-train-ledger [--store DIR] raise-target DATASET_HASH --epsilon E --why TEXT   # a recorded act
    aisec-train-ledger [--store DIR] verify [DATASET_HASH ...]              # tags, chain, anchors; record sets too
    aisec-train-ledger [--store DIR] retag [DATASET_HASH ...] [--artifact FILE ...]     # after a key rotation
    aisec-train-ledger [--store DIR] anchor DATASET_HASH --why TEXT         # re-anchor a trusted ledger, recorded

The store is ``--store``, else ``$AISEC_TRAIN_LEDGER_STORE``, else the user's own store in the platform's user data
folder (``~/.local/share/aisec-train/privacy_ledgers``). ``show``, ``verify``, ``raise-target`` and ``anchor`` take a
unique prefix of the hash (at least 4 characters, as refusals print it). ``anchor`` is for a ledger refused for its
anchor (lost with an emptied anchor folder, or a ledger restored from a backup older than its anchor) that the key's
owner trusts: it appends an ``anchor`` record (who, host, when, why, what the anchor held) and anchors it as it is.
``raise-target`` takes a finite ``--epsilon`` of at most 100; ``raise-target`` and ``anchor`` a one-line printable
``--why`` of at most 200 characters and a finite ``--wait`` >= 0. The store must be
an existing folder (this tool never creates one: a job does), and the key file must exist (created only during a
rotation, when ``$AISEC_TRAIN_OLD_KEY_FILES`` lists the old key); ``retag --artifact`` files are checked first.
Exit status: 0 done, 2 refused (bad input, a ledger that does not verify, a lock held by another job).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from aisec_train import errors
from aisec_train.errors import Refusal
from aisec_train.privacy.ledger_rules import check_reason
from aisec_train.privacy.ledger_store import STORE_ENV, DatasetLedger, LedgerStore
from aisec_train.privacy.record_sets import RecordSets
from aisec_train.store import artifacts, keys
from aisec_train.store.errors import StoreError

PROG = "aisec-train-ledger"


def summary(led: DatasetLedger) -> dict[str, Any]:
    """What ``show`` prints, as data (every record verified first)."""
    records, b = led.records, led.budget()
    runs = []
    for run_id, r in led.runs().items():
        entry = {"run_id": run_id, "started": r["at"], "by": f"{r['who']}@{r['host']}", "steps": led.steps(run_id)}
        if b is not None and entry["steps"]:
            entry["epsilon_alone"] = led.total_epsilon(run_id=run_id)
        runs.append(entry | r["invariants"])
    spent = led.total_epsilon() if b is not None else None
    old = sorted({keys.tag_key_id(r["tag"]) for r in records} - {keys.current_key().id})
    return {
        "dataset": led.dataset,
        "ledger": str(led.file),
        "budget": b,
        "epsilon_spent": spent,
        "epsilon_left": None if b is None or spent is None else max(0.0, b["target_epsilon"] - spent),
        "steps": led.steps(),
        "runs": runs,
        "raises": [_pick(r, "at", "who", "host", "previous", "target_epsilon", "why") for r in _kind(records, "raise")],
        "delta_overrides": [
            _pick(r, "at", "who", "run_id", "delta", "n_train", "why") for r in _kind(records, "delta_override")
        ],
        "exceeds": [
            _pick(r, "at", "who", "host", "run_id", "target_epsilon", "epsilon_before", "epsilon_after", "why")
            for r in _kind(records, "exceed")
        ],
        "refusals": [_pick(r, "at", "who", "host", "run_id", "why") for r in _kind(records, "refusal")],
        "reanchors": [_pick(r, "at", "who", "host", "records", "previous", "why") for r in _kind(records, "anchor")],
        "records": len(records),
        "tags": {"verified": len(records), "current_key": keys.current_key().id, "old_keys": old},
    }


def _kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def _pick(record: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: record.get(n) for n in names}


def _show(s: dict[str, Any]) -> None:
    b = s["budget"]
    print(f"dataset {s['dataset']}  ledger {s['ledger']}")
    if b is None:
        print("budget: none recorded (no run with a target yet)")
    else:
        print(
            f"budget: target epsilon {b['target_epsilon']} at delta {b['delta']:g} by the {b['accountant']} accountant"
        )
        print(f"spent: epsilon {s['epsilon_spent']:.4f} over {s['steps']} step(s); {s['epsilon_left']:.4f} left")
    for r in s["runs"]:
        eps = r.get("epsilon_alone")
        print(
            f"  run {r['run_id']}  started {r['started']} by {r['by']}  steps {r['steps']}  "
            f"epsilon alone {'-' if eps is None else f'{eps:.4f}'}  noise {r['noise_multiplier']}  "
            f"sample rate {r['sample_rate']}  seed {r['split_seed']}  scope {r['budget_scope']}"
        )
    for r in s["raises"]:
        print(f"  raise {r['previous']} -> {r['target_epsilon']}  at {r['at']} by {r['who']}@{r['host']}: {r['why']}")
    for r in s["delta_overrides"]:
        print(f"  delta override {r['delta']} (n={r['n_train']}) for run {r['run_id']} by {r['who']}: {r['why']}")
    for r in s["exceeds"]:
        print(
            f"  target passed by run {r['run_id']} at {r['at']} by {r['who']}@{r['host']}: epsilon "
            f"{r['epsilon_before']:.4f} -> {r['epsilon_after']:.4f} planned, target {r['target_epsilon']}: {r['why']}"
        )
    for r in s["refusals"]:
        print(f"  refused run {r['run_id']} at {r['at']} by {r['who']}@{r['host']}: {r['why']}")
    for r in s["reanchors"]:
        was = "no anchor" if r["previous"] is None else f"an anchor of {r['previous']} record(s)"
        print(
            f"  re-anchored at {r['records']} record(s) (was {was}) at {r['at']} by {r['who']}@{r['host']}: {r['why']}"
        )
    t = s["tags"]
    old = f"; under old key(s) {', '.join(t['old_keys'])}: run retag" if t["old_keys"] else ""
    print(f"tags: {t['verified']} record(s) verified, chain and anchor intact (key {t['current_key']}){old}")


def _list(store: LedgerStore) -> int:
    datasets = store.datasets()
    print(f"{len(datasets)} dataset(s) in {store.path}")
    failures = 0
    for ds in datasets:
        try:
            led = store.view(ds)
            b = led.budget()
            eps = f"{led.total_epsilon():.4f}" if b else "-"
            target = b["target_epsilon"] if b else "-"
            refused = len(led.of_kind("refusal"))
            print(f"{ds}  runs {len(led.runs())}  steps {led.steps()}  epsilon {eps} of {target}  refused {refused}")
        except StoreError as err:
            failures += 1
            print(f"{ds}  FORGED  {' '.join(str(err).split())}")
    return failures


def _verify(store: LedgerStore, datasets: list[str]) -> int:
    """Each dataset's ledger and its record set (tags, chain, anchors); by default every dataset with either, so a
    record set deleted or renamed while its anchor remains is reported, not skipped."""
    sets = RecordSets(store.path)
    failures = 0
    for ds in datasets or sorted(set(store.datasets()) | set(sets.datasets())):
        try:
            line = f"ok  {ds}  {len(store.view(ds).records)} record(s)"
            digests = sets.load(ds)
            print(line + (f", record set of {len(digests)}" if len(digests) else ""))
        except StoreError as err:
            failures += 1
            print(f"FORGED  {ds}  {' '.join(str(err).split())}")
    return failures


def _retag(store: LedgerStore, datasets: list[str], files: list[Path]) -> None:
    sets = RecordSets(store.path)
    for ds in datasets or store.datasets():
        with store.open(ds, wait=60.0) as led:
            print(f"{ds}: re-tagged {led.retag()} record(s)")
            if sets.retag(led):  # its record set and the set's anchor (privacy/record_sets.py)
                print(f"{ds}: re-tagged its record set")
    for path in files:
        done = artifacts.retag_artifact(path)
        print(f"{path}: {'re-tagged' if done else 'already under the current key'}")


def _anchor(store: LedgerStore, args: argparse.Namespace) -> int:
    check_reason(args.why, "--why")  # bad input is refused before the ledger is read or locked
    ds = store.find(args.dataset)
    if not os.path.lexists(store.view(ds).file):  # no lock file left behind for a dataset this store never charged
        errors.refuse(PROG, f"no ledger for dataset {args.dataset} in {store.path}; nothing to anchor")
    sets = RecordSets(store.path)
    with store.open(ds, wait=args.wait, reanchor=True) as led:
        set_refused = _set_refused(sets, ds)
        if led.anchor_problem is not None or not set_refused:  # both verify: "nothing to re-anchor"
            r = led.reanchor(why=args.why)
            was = "no anchor" if r["previous"] is None else f"an anchor of {r['previous']} record(s)"
            print(f"re-anchored dataset {ds[:16]} at {r['records']} record(s) (was {was}; recorded)")
        if set_refused:  # the dataset's record set, refused for its anchor (privacy/record_sets.py)
            r = sets.reanchor(led, why=args.why)
            was = "no anchor" if r["previous"] is None else f"an anchor of {r['previous']}"
            print(f"re-anchored the record set of dataset {ds[:16]} at {r['records']} record digest(s) (was {was})")
    return 0


def _set_refused(sets: RecordSets, ds: str) -> bool:
    try:
        sets.load(ds)
    except StoreError:
        return True
    return False


def _store_path(text: str) -> Path:
    # an empty --store would be the working directory: never a store by accident (nor by a blank variable)
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a ledger store folder, not an empty path")
    return Path(text)


def _wait_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):  # nan, inf or negative: no lock wait means that
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a finite number of seconds >= 0")
    return seconds


def _check_store(store: LedgerStore, source: str) -> None:
    """A store must exist as a folder: a mistyped --store would otherwise list 0 datasets, verify nothing and exit
    0, and raise-target would create a folder (and a lock) where no ledger ever was. Jobs create their store;
    this tool only reads and amends ledgers a job wrote."""
    if not store.path.is_dir():
        what = "is not a directory" if store.path.exists() else "does not exist"
        raise StoreError(
            f"ledger store {store.path} (from {source}) {what}: pass --store (or "
            f"${STORE_ENV}) naming the folder a DP run charged"
        )


def _check_key() -> None:
    """The key the ledgers are tagged under must exist and be sound before anything is read. A missing key is
    created only during a rotation (old keys listed in ``$AISEC_TRAIN_OLD_KEY_FILES`` verify what exists,
    docs/integrity.md): otherwise a fresh key at a mistyped ``$AISEC_TRAIN_KEY_FILE`` would verify nothing and every
    ledger would be called forged. A key file it refuses is one line naming the file, not a FORGED line per ledger."""
    try:
        if not keys.old_key_paths():
            keys.existing_key()
        keys.verify_keys()  # the current key (created in a rotation) and $AISEC_TRAIN_OLD_KEY_FILES
    except StoreError as err:
        where = f"${keys.KEY_ENV}: " if os.environ.get(keys.KEY_ENV) and not str(err).startswith("$") else ""
        raise StoreError(
            f"{where}{err}; {PROG} creates no key outside a rotation: point ${keys.KEY_ENV} at the key file the "
            f"ledgers were tagged under (rotating: list the old key in ${keys.OLD_KEYS_ENV})"
        ) from None


def _check_artifacts(files: list[Path]) -> None:
    """Every ``--artifact`` is a regular file with its keyed manifest beside it, checked before any ledger or file is
    re-tagged: a mistyped path is bad input, not a failure half-way through the work."""
    for path in files:
        tag = artifacts.manifest_path(Path(os.path.abspath(path)))
        if path.is_symlink() or not path.is_file():
            what = "is a symlink" if path.is_symlink() else "is not a file" if path.exists() else "does not exist"
            raise StoreError(
                f"--artifact {str(path)!r} is not allowed: it {what}; give a checkpoint or model.pt file with its "
                "keyed manifest (NAME.tag) beside it"
            )
        if not tag.is_file():
            raise StoreError(
                f"--artifact {str(path)!r} is not allowed: it has no keyed manifest {tag.name} beside it, so there is "
                "no tag to re-tag (only files a run tagged can be re-tagged)"
            )


def _datasets(store: LedgerStore, given: list[str]) -> list[str]:
    """The full hashes of the given hashes or unique prefixes; a malformed, unknown or ambiguous one is bad input
    (refused before anything is read), not a forged ledger."""
    return [store.find(ds) for ds in given]


def _parser() -> argparse.ArgumentParser:
    parser = errors.RefusingParser(prog=PROG, description="The privacy budget charged to each dataset.")
    parser.add_argument(
        "--store", type=_store_path, help="ledger store folder (default: $AISEC_TRAIN_LEDGER_STORE, ...)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every dataset in the store")
    show = sub.add_parser("show", help="one dataset's runs, spend, raises and tag status")
    show.add_argument("dataset")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    raise_ = sub.add_parser("raise-target", help="raise a dataset's target epsilon (recorded: who, when, why)")
    raise_.add_argument("dataset")
    raise_.add_argument("--epsilon", type=float, required=True, help="the new target: finite, at most 100")
    raise_.add_argument("--why", required=True, help="the reason, recorded in the ledger")
    raise_.add_argument(
        "--wait", type=_wait_seconds, default=0.0, help="seconds to wait for a running job's lock (finite, >= 0)"
    )
    verify = sub.add_parser("verify", help="verify every record's keyed tag, the chain and the anchor")
    verify.add_argument("datasets", nargs="*")
    anchor = sub.add_parser("anchor", help="anchor a ledger that lost its anchor, knowingly (recorded: who, why)")
    anchor.add_argument("dataset")
    anchor.add_argument("--why", required=True, help="the reason, recorded in the ledger")
    anchor.add_argument(
        "--wait", type=_wait_seconds, default=0.0, help="seconds to wait for a running job's lock (finite, >= 0)"
    )
    retag = sub.add_parser("retag", help="re-tag ledgers (and --artifact files) under the current key")
    retag.add_argument("datasets", nargs="*")
    retag.add_argument("--artifact", type=Path, action="append", default=[], help="a checkpoint to re-tag too")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with errors.refusing(PROG, Refusal, OSError):
        store = LedgerStore(args.store, key="--store")
        if args.command != "retag" or args.datasets or not args.artifact:  # artifacts alone need no store
            _check_store(store, "--store" if args.store else store.choice.source)
        _check_key()  # before any ledger is read: never a fresh key, never FORGED for a key file's fault
        if args.command == "retag":
            _check_artifacts(args.artifact)
        if args.command in ("verify", "retag"):
            args.datasets = _datasets(store, args.datasets)
        if args.command == "list":
            failures = _list(store)
        elif args.command == "verify":
            failures = _verify(store, args.datasets)
        elif args.command == "show":
            led = store.view(store.find(args.dataset))
            if not led.records:
                errors.refuse(PROG, f"no ledger for dataset {args.dataset} in {store.path}")
            s = summary(led)
            print(json.dumps(s, indent=2)) if args.json else _show(s)
            failures = 0
        elif args.command == "raise-target":
            ds = store.find(args.dataset)
            if not store.view(ds).records:  # no lock file left behind for a dataset this store never charged
                errors.refuse(PROG, f"no ledger for dataset {args.dataset} in {store.path}")
            with store.open(ds, wait=args.wait) as led:
                r = led.raise_target(args.epsilon, why=args.why)
            print(f"raised dataset {args.dataset[:16]} target {r['previous']} -> {r['target_epsilon']} (recorded)")
            failures = 0
        elif args.command == "anchor":
            failures = _anchor(store, args)
        else:
            _retag(store, args.datasets, args.artifact)
            failures = 0
    if failures:
        errors.refuse(PROG, f"{failures} ledger(s) in {store.path} failed verification (see above)")


if __name__ == "__main__":
    main()
