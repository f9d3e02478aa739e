"""``aisec-train-registry``: the command line of the model inventory (aisec_train/audit/registry.py).

Exit status: 0 done, 2 refused (unknown run, forged entry, tampered file, unreadable registry); ``list`` exits 2
when any entry or file fails verification, after printing every row.
"""

from __future__ import annotations

from pathlib import Path

from aisec_train import errors
from aisec_train.audit.registry import (
    DEFAULT_REGISTRY,
    REGISTRY_ENV,
    Registry,
    membership_text,
    resolve_registry_path,
    short_number,
)
from aisec_train.store import keys
from aisec_train.store.errors import StoreError


def _list(reg: Registry) -> int:
    """Print the inventory; return how many entries or files failed verification."""
    checked = reg.audit()
    print(f"{len(checked)} run(s) in {reg.path}")
    failures = 0
    width = max((len(str(r.get("id"))) for r, why in checked if r and not why), default=0)  # aligned columns
    for i, (r, why) in enumerate(checked):
        if why:
            failures += 1
            print(f"{(r or {}).get('id', f'entry {i}')}  FORGED  {why}")
            continue
        assert r is not None
        run, vault = reg.status(r)
        failures += "TAMPERED" in (run, vault)
        m, g = r["metrics"], r["governance"]
        flag = "known-good" if r["known_good"] else "-"
        print(
            f"{r['id']:{width}}  {flag:10}  run {run:8}  vault {vault:8}  sha256 {r['sha256'][:12]}  "
            f"acc {short_number(m.get('metrics.clean_accuracy'))}  "
            f"eps {short_number(m.get('privacy.epsilon'), none='none (no DP)')}  "
            f"mia_auc {membership_text(m)}  owner {g.get('owner')}  risk {g.get('risk_level')}"
        )
    return failures


PROG = "aisec-train-registry"


def main(argv: list[str] | None = None) -> None:
    parser = errors.RefusingParser(prog=PROG, description="Model inventory and rollback.")
    parser.add_argument(
        "--registry",
        type=Path,
        help=f"registry file (default: ${REGISTRY_ENV}, else {DEFAULT_REGISTRY} under the current directory)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered run, and whether its entry, run copy and vault copy verify")
    sub.add_parser("register", help="register a finished run folder").add_argument("run_dir", type=Path)
    sub.add_parser("mark-good", help="verify a run and keep a known-good copy").add_argument("run_id")
    rb = sub.add_parser("rollback", help="restore a known-good checkpoint after verifying it")
    rb.add_argument("--to", dest="run_id", help="a known-good run id (default: the latest known-good)")
    rb.add_argument("--dest", type=Path, required=True, help="where to restore model.pt (with its .tag, .sha256)")
    sub.add_parser("retag", help="re-sign every entry under the current key after a key rotation")
    args = parser.parse_args(argv)
    reg = Registry(resolve_registry_path(args.registry))
    with errors.refusing(PROG, StoreError, OSError):
        if args.command == "list":
            failures = _list(reg)
            if failures:
                errors.refuse(PROG, f"{failures} entr(ies) or file(s) in {reg.path} failed verification (see above)")
        elif args.command == "register":
            print(f"registered {reg.register(args.run_dir)['id']} in {reg.path}")
        elif args.command == "mark-good":
            print(f"known-good {reg.mark_good(args.run_id)['id']} (verified copy in {reg.vault})")
        elif args.command == "retag":
            print(f"re-signed {reg.retag()} entr(ies) in {reg.path} under key {keys.current_key().id}")
        else:
            entry = reg.rollback(args.dest, args.run_id)
            print(f"rolled back {args.dest} to {entry['id']} (sha256 {entry['sha256']}, verified)")


if __name__ == "__main__":
    main()
