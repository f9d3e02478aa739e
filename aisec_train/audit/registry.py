"""Model inventory, known-good registry and rollback.

The registry is one JSON file: a run registers itself in ``<run dir>/../registry.json`` unless
``audit.registry_path`` names another; the command takes it as ``--registry``. Every finished run is
registered with its checkpoint hash, headline metrics and governance fields. Marking a run known-good verifies its checkpoint and copies it into the registry's
content-addressed vault (``known_good/<sha256>.pt``), so a later tampering of the run folder cannot touch the
copy; rollback verifies the vault copy's hash again before it restores it. Writes take a file lock and
replace the file atomically, so concurrent runs do not lose each other's entries.

    aisec-train-registry --registry FILE list
    aisec-train-registry --registry FILE register RUN_DIR
    aisec-train-registry --registry FILE mark-good RUN_ID
    aisec-train-registry --registry FILE rollback [--to RUN_ID] --dest FILE

Exit status: 0 done, 2 refused (unknown run, tampered checkpoint, unreadable registry).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aisec_train.data.dataset import sha256_file
from aisec_train.train import checkpoint
from aisec_train.train.checkpoint import CheckpointError

HEADLINE = (
    "metrics.clean_accuracy",
    "robustness.robust_accuracy",
    "privacy.epsilon",
    "audit.membership.auc",
    "audit.extraction.fidelity",
)


class RegistryError(CheckpointError):
    """An unknown run or an unusable registry (a refusal: one line, exit 2)."""


def _dig(report: dict[str, Any], dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.vault = self.path.parent / "known_good"

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            return json.loads(self.path.read_text())["runs"]
        except (ValueError, KeyError) as err:
            raise RegistryError(f"registry {self.path} is not readable JSON with a 'runs' list: {err}") from err

    def get(self, run_id: str) -> dict[str, Any]:
        for entry in self.entries():
            if entry["id"] == run_id:
                return entry
        raise RegistryError(f"no run {run_id!r} in {self.path}; `aisec-train-registry list` shows the ids")

    @contextmanager
    def _editing(self) -> Iterator[list[dict[str, Any]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            runs = self.entries()
            yield runs
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry.", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump({"runs": runs}, fh, indent=2)
            os.replace(tmp, self.path)

    def register(self, run_dir: Path, governance: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record a finished run; its model.pt is verified against its recorded hash first."""
        run_dir = Path(run_dir).resolve()
        model = run_dir / "model.pt"
        digest = checkpoint.recorded_hash(model)
        checkpoint.load(model, digest)  # refuses a tampered or unreadable checkpoint
        report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").exists() else {}
        entry = {
            "id": f"{run_dir.name}-{digest[:8]}",
            "run_dir": str(run_dir),
            "checkpoint": str(model),
            "sha256": digest,
            "data_manifest_sha256": _dig(report, "data.manifest_sha256"),
            "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "metrics": {key: _dig(report, key) for key in HEADLINE},
            "governance": governance or report.get("governance", {}),
            "known_good": False,
        }
        with self._editing() as runs:
            old = [r for r in runs if r["id"] == entry["id"]]
            entry["known_good"] = bool(old and old[0]["known_good"])
            runs[:] = [r for r in runs if r["id"] != entry["id"]] + [entry]
        return entry

    def mark_good(self, run_id: str) -> dict[str, Any]:
        with self._editing() as runs:
            entry = next((r for r in runs if r["id"] == run_id), None)
            if entry is None:
                raise RegistryError(f"no run {run_id!r} in {self.path}")
            checkpoint.load(Path(entry["checkpoint"]), entry["sha256"])
            self.vault.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry["checkpoint"], self.vault / f"{entry['sha256']}.pt")
            entry["known_good"] = True
            entry["vault_copy"] = str(self.vault / f"{entry['sha256']}.pt")
        return entry

    def rollback(self, dest: Path, run_id: str | None = None) -> dict[str, Any]:
        """Restore a known-good checkpoint (the latest one unless ``run_id``) to ``dest``, hash verified."""
        good = [r for r in self.entries() if r["known_good"]]
        if run_id is not None:
            good = [r for r in good if r["id"] == run_id]
        if not good:
            what = f"run {run_id!r} is not marked known-good" if run_id else "no run is marked known-good"
            raise RegistryError(f"cannot roll back: {what} in {self.path}")
        entry = good[-1]
        source = Path(entry["vault_copy"])
        checkpoint.load(source, entry["sha256"])  # refuses a tampered vault copy before anything is restored
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(source, tmp)
        if sha256_file(Path(tmp)) != entry["sha256"]:
            os.unlink(tmp)
            raise CheckpointError(f"copy of {source} changed while it was restored; nothing was rolled back")
        os.replace(tmp, dest)
        checkpoint.hash_path(dest).write_text(f"{entry['sha256']}  {dest.name}\n")
        return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aisec-train-registry", description="Model inventory and rollback.")
    parser.add_argument(
        "--registry", type=Path, required=True, help="registry.json (a run writes <run dir>/../registry.json)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    sub.add_parser("register").add_argument("run_dir", type=Path)
    sub.add_parser("mark-good").add_argument("run_id")
    rb = sub.add_parser("rollback")
    rb.add_argument("--to", dest="run_id")
    rb.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)
    reg = Registry(args.registry)
    try:
        if args.command == "list":
            for r in reg.entries():
                m = r["metrics"]
                flag = "known-good" if r["known_good"] else "-"
                print(
                    f"{r['id']}  {flag:10}  sha256 {r['sha256'][:12]}  acc {m.get('metrics.clean_accuracy')}  "
                    f"eps {m.get('privacy.epsilon')}  mia_auc {m.get('audit.membership.auc')}  "
                    f"owner {r['governance'].get('owner')}  risk {r['governance'].get('risk_level')}"
                )
        elif args.command == "register":
            print(f"registered {reg.register(args.run_dir)['id']}")
        elif args.command == "mark-good":
            print(f"known-good {reg.mark_good(args.run_id)['id']}")
        else:
            entry = reg.rollback(args.dest, args.run_id)
            print(f"rolled back {args.dest} to {entry['id']} (sha256 {entry['sha256']}, verified)")
    except (CheckpointError, OSError) as err:
        print(f"aisec-train-registry: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
