"""Model inventory, known-good registry and rollback.

The registry is one JSON file for a whole project, not one per run folder. Where it lives, in order:
``audit.registry_path`` (a run) or ``--registry`` (the command), else ``$AISEC_TRAIN_REGISTRY``, else
``outputs/registry.json`` under the directory the job was launched from (beside Hydra's default
``outputs/DATE/TIME`` run folders, so every run of a project lands in the same inventory).

Every finished run is registered with its checkpoint hash, headline metrics and governance fields. Marking a
run known-good verifies its checkpoint and copies it into the registry's content-addressed vault
(``known_good/<sha256>.pt``), so a later tampering of the run folder cannot touch the copy; rollback verifies
the vault copy's hash again before it restores it. Writes take a file lock and replace the file atomically,
so concurrent runs never lose each other's entries and a crash never leaves a half-written registry.

    aisec-train-registry [--registry FILE] list
    aisec-train-registry [--registry FILE] register RUN_DIR
    aisec-train-registry [--registry FILE] mark-good RUN_ID
    aisec-train-registry [--registry FILE] rollback [--to RUN_ID] --dest FILE

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

from aisec_train.hashing import sha256_file

REGISTRY_ENV = "AISEC_TRAIN_REGISTRY"
DEFAULT_REGISTRY = Path("outputs") / "registry.json"
HEADLINE = (
    "metrics.clean_accuracy",
    "robustness.robust_accuracy",
    "privacy.epsilon",
    "audit.membership.auc",
    "audit.extraction.fidelity",
)


class RegistryError(RuntimeError):
    """An unknown run, a tampered checkpoint or an unusable registry (a refusal: one line, exit 2)."""


# The registry verifies and copies bytes; it never unpickles a checkpoint. So it reads the same hash sidecar
# as aisec_train.train.checkpoint (``NAME.sha256`` holding "DIGEST  NAME") without importing torch or the
# data stack, which keeps the command instant on a 2-core box.
def recorded_hash(model: Path) -> str:
    sidecar = model.with_name(model.name + ".sha256")
    try:
        return sidecar.read_text().split()[0]
    except (OSError, IndexError) as err:
        raise RegistryError(f"{model} has no readable {sidecar.name}; refusing an unverified checkpoint") from err


def verify(path: Path, expected: str) -> None:
    if not path.is_file():
        raise RegistryError(f"checkpoint {path} does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise RegistryError(
            f"checkpoint {path} has SHA-256 {actual}, expected {expected}: refusing a tampered checkpoint"
        )


def resolve_registry_path(configured: str | os.PathLike | None = None) -> Path:
    """The registry file: ``configured``, else ``$AISEC_TRAIN_REGISTRY``, else ``outputs/registry.json``."""
    chosen = configured or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY
    return Path(chosen).expanduser().absolute()


def _dig(report: dict[str, Any], dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _atomic_copy(source: Path, dest: Path, sha256: str) -> None:
    """Copy, verify the copy's hash, then rename into place: ``dest`` is either the old file or a good copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        if sha256_file(Path(tmp)) != sha256:
            raise RegistryError(f"copy of {source} changed while it was copied; nothing was written to {dest}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.vault = self.path.parent / "known_good"

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            runs = json.loads(self.path.read_text())["runs"]
        except (ValueError, KeyError, TypeError) as err:
            raise RegistryError(f"registry {self.path} is not readable JSON with a 'runs' list: {err}") from err
        if not isinstance(runs, list):
            raise RegistryError(f"registry {self.path}: 'runs' is not a list")
        return runs

    def get(self, run_id: str) -> dict[str, Any]:
        for entry in self.entries():
            if entry["id"] == run_id:
                return entry
        raise RegistryError(f"no run {run_id!r} in {self.path}; `aisec-train-registry list` shows the ids")

    @contextmanager
    def _editing(self) -> Iterator[list[dict[str, Any]]]:
        """Lock, read, let the caller edit, write atomically. A refusal inside the block writes nothing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            runs = self.entries()
            yield runs
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump({"runs": runs}, fh, indent=2)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            finally:
                Path(tmp).unlink(missing_ok=True)

    def register(self, run_dir: Path, governance: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record a finished run; its model.pt is verified against its recorded hash first."""
        run_dir = Path(run_dir).resolve()
        model = run_dir / "model.pt"
        digest = recorded_hash(model)
        verify(model, digest)
        try:
            report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").exists() else {}
        except ValueError as err:
            raise RegistryError(f"{run_dir / 'report.json'} is not readable JSON: {err}") from err
        entry = {
            "id": f"{run_dir.parent.name}_{run_dir.name}-{digest[:8]}",
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
            if old and old[0]["known_good"]:  # re-registering the same checkpoint keeps its known-good copy
                entry.update(known_good=True, vault_copy=old[0].get("vault_copy"))
            runs[:] = [r for r in runs if r["id"] != entry["id"]] + [entry]
        return entry

    def mark_good(self, run_id: str) -> dict[str, Any]:
        with self._editing() as runs:
            entry = next((r for r in runs if r["id"] == run_id), None)
            if entry is None:
                raise RegistryError(f"no run {run_id!r} in {self.path}; `aisec-train-registry list` shows the ids")
            verify(Path(entry["checkpoint"]), entry["sha256"])
            copy = self.vault / f"{entry['sha256']}.pt"
            _atomic_copy(Path(entry["checkpoint"]), copy, entry["sha256"])
            entry.update(known_good=True, vault_copy=str(copy), marked_good_at=datetime.now(UTC).isoformat())
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
        verify(source, entry["sha256"])  # a tampered vault copy is refused before anything is restored
        dest = Path(dest)
        _atomic_copy(source, dest, entry["sha256"])
        sidecar = dest.with_name(dest.name + ".sha256")
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{sidecar.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{entry['sha256']}  {dest.name}\n")
        os.replace(tmp, sidecar)
        return entry

    def status(self, entry: dict[str, Any]) -> str:
        """'ok', 'missing' or 'TAMPERED' for the run's checkpoint (the vault copy for a known-good run)."""
        path = Path(entry.get("vault_copy") or entry["checkpoint"])
        if not path.is_file():
            return "missing"
        return "ok" if sha256_file(path) == entry["sha256"] else "TAMPERED"


def _list(reg: Registry) -> None:
    runs = reg.entries()
    print(f"{len(runs)} run(s) in {reg.path}")
    for r in runs:
        m, g = r["metrics"], r["governance"]
        flag = "known-good" if r["known_good"] else "-"
        print(
            f"{r['id']}  {flag:10}  {reg.status(r):8}  sha256 {r['sha256'][:12]}  acc {m.get('metrics.clean_accuracy')}"
            f"  eps {m.get('privacy.epsilon')}  mia_auc {m.get('audit.membership.auc')}  owner {g.get('owner')}  "
            f"risk {g.get('risk_level')}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aisec-train-registry", description="Model inventory and rollback.")
    parser.add_argument(
        "--registry",
        type=Path,
        help=f"registry file (default: ${REGISTRY_ENV}, else {DEFAULT_REGISTRY} under the current directory)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered run, its known-good flag and whether its checkpoint verifies")
    sub.add_parser("register", help="register a finished run folder").add_argument("run_dir", type=Path)
    sub.add_parser("mark-good", help="verify a run and keep a known-good copy").add_argument("run_id")
    rb = sub.add_parser("rollback", help="restore a known-good checkpoint after verifying its hash")
    rb.add_argument("--to", dest="run_id", help="a known-good run id (default: the latest known-good)")
    rb.add_argument("--dest", type=Path, required=True, help="where to restore model.pt (and its .sha256)")
    args = parser.parse_args(argv)
    reg = Registry(resolve_registry_path(args.registry))
    try:
        if args.command == "list":
            _list(reg)
        elif args.command == "register":
            print(f"registered {reg.register(args.run_dir)['id']} in {reg.path}")
        elif args.command == "mark-good":
            print(f"known-good {reg.mark_good(args.run_id)['id']} (verified copy in {reg.vault})")
        else:
            entry = reg.rollback(args.dest, args.run_id)
            print(f"rolled back {args.dest} to {entry['id']} (sha256 {entry['sha256']}, verified)")
    except (RegistryError, OSError) as err:
        print(f"aisec-train-registry: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
