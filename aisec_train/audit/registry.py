"""Model inventory, known-good registry and rollback, every entry and every file verified under the project key.

The registry is one JSON file for a whole project. Where it lives, in order: ``audit.registry_path`` (a run) or
``--registry`` (the command), else ``$AISEC_TRAIN_REGISTRY``, else ``outputs/registry.json`` under the launch
directory. Each entry is HMAC-tagged (aisec_train/store), so an edited hash, path or flag is refused; each file
an entry touches is verified twice: by its own keyed manifest (``model.pt.tag``) and against the entry's hash.
A model whose manifest does not record finite weights is never registered. Marking a run known-good copies its
checkpoint into the content-addressed vault ``known_good/<sha256>.pt`` (the path is derived from the keyed hash,
never read from the file); rollback verifies the vault copy and commits it to ``--dest`` with a fresh keyed tag.

    aisec-train-registry [--registry FILE] list
    aisec-train-registry [--registry FILE] register RUN_DIR
    aisec-train-registry [--registry FILE] mark-good RUN_ID
    aisec-train-registry [--registry FILE] rollback [--to RUN_ID] --dest FILE
    aisec-train-registry [--registry FILE] retag            # after a key rotation (docs/integrity.md)

Exit status: 0 done, 2 refused (unknown run, forged entry, tampered file, unreadable registry).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aisec_train.hashing import sha256_bytes
from aisec_train.report.report import json_safe  # as report.json writes values: the tag's copy compares equal
from aisec_train.store import artifacts, keys
from aisec_train.store.errors import IntegrityError, StoreError
from aisec_train.store.files import atomic_write, read_nofollow, validate_output_path
from aisec_train.store.locks import exclusive_lock

REGISTRY_ENV = "AISEC_TRAIN_REGISTRY"
DEFAULT_REGISTRY = Path("outputs") / "registry.json"
# What the membership AUC was measured on: its 95% interval, the attack and the member / non-member counts. Every
# place that quotes the AUC quotes them with it, `aisec-train-registry list` included, so the tag records them beside
# it. A model saved before they were recorded has none in its tag (its entry then says so, and is not held to them).
MEMBERSHIP_CONTEXT = (
    "audit.membership.auc_ci95",
    "audit.membership.auc_attack",
    "audit.membership.members",
    "audit.membership.nonmembers",
)
HEADLINE = (
    "metrics.clean_accuracy",
    "robustness.robust_accuracy",
    "privacy.epsilon",
    "audit.membership.auc",
    "audit.extraction.fidelity",
    *MEMBERSHIP_CONTEXT,
)
_STR, _OPT = (str,), (str, type(None))
ENTRY_SCHEMA: dict[str, tuple] = {
    "id": _STR, "run_dir": _STR, "checkpoint": _STR, "sha256": _STR, "data_manifest_sha256": _OPT,
    "registered_at": _STR, "metrics": (dict,), "governance": (dict,), "known_good": (bool,), "tag": _STR,
}  # fmt: skip


class RegistryError(IntegrityError, RuntimeError):
    """An unknown run, a forged entry, a tampered checkpoint or an unusable registry (one line, exit 2)."""


def resolve_registry_path(configured: str | os.PathLike | None = None) -> Path:
    """The registry file: ``configured``, else ``$AISEC_TRAIN_REGISTRY``, else ``outputs/registry.json``."""
    chosen = configured or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY
    return Path(chosen).expanduser().absolute()


def recorded_hash(model: Path) -> str:
    """SHA-256 of ``model`` once its keyed manifest verifies (no torch: bytes only)."""
    return verify_file(Path(model))[0]


def verify_file(path: Path, expected: str | None = None, *, root: Path | None = None) -> tuple[str, dict]:
    """(digest, manifest) of ``path``: keyed manifest verified, and the digest equal to ``expected`` if given."""
    try:
        digest, manifest = artifacts.verified_digest(path, root=root)
    except FileNotFoundError:
        raise RegistryError(f"checkpoint {path} does not exist") from None
    except (IntegrityError, OSError) as err:
        raise RegistryError(f"checkpoint {err}") from None
    if expected is not None and digest != expected:
        raise RegistryError(f"checkpoint {path} has SHA-256 {digest}, its registry entry {expected}: refusing a swap")
    return digest, manifest


def _dig(report: dict[str, Any], dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


CLAIMS = {  # what a model.pt's keyed tag records about its run (report/stage.py: stage_save_model) -> the report's key
    "data_manifest_sha256": "data.manifest_sha256",
    "privacy_mode": "privacy.mode",
    "epsilon": "privacy.epsilon",
    "delta": "privacy.delta",
}


def _json_value(value: Any) -> Any:
    """A value a keyed tag can hold (its canonical JSON has finite numbers only)."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics and governance a registry entry carries, as report.json writes them."""
    return {
        "metrics": {key: json_safe(_dig(report, key)) for key in HEADLINE},
        "governance": json_safe(report.get("governance") or {}),
    }


def run_claims(report: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What ``model.pt``'s keyed tag says about the run that wrote it: its data, privacy, how training ended, where
    it ran, and its headline metrics and governance (the save stage runs after evaluation and audit). ``register``
    holds report.json against these and takes the entry's metrics and governance from the tag, so neither a model
    copied in beside another run's report nor an edited report passes (a whole run folder moved elsewhere is still
    one run: it registers, and its entry's ``trained_in`` names where it was trained)."""
    claims = {name: _json_value(_dig(report, key)) for name, key in CLAIMS.items()}
    stopped = "budget" if _dig(report, "train.stopped_by_budget") else None
    return {**claims, "run_dir": str(Path(run_dir).resolve()), "stopped": stopped, **headline(report)}


def check_claims(model: Path, digest: str, manifest: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The tag's run claims, once report.json agrees with every one of them and with the model's digest."""
    claims = manifest["meta"].get("run")
    if not isinstance(claims, dict):
        raise RegistryError(
            f"{model}'s keyed tag records no run (data hash, privacy): it was not written by a run's save stage; "
            "refusing a model of unknown origin"
        )
    found = [
        f"report.json says {key}={_dig(report, key)!r}, the model's keyed tag {claims.get(name)!r}"
        for name, key in CLAIMS.items()
        if _json_value(_dig(report, key)) != claims.get(name)
    ]
    if "metrics" not in claims or "governance" not in claims:
        found.append("the model's keyed tag records no headline metrics or governance (saved before they were)")
    else:
        said = headline(report)
        older = {"metrics": set(MEMBERSHIP_CONTEXT) - set(claims["metrics"]), "governance": set()}  # not in its tag
        found += [
            f"report.json says {key if part == 'metrics' else f'governance.{key}'}={said[part].get(key)!r}, "
            f"the model's keyed tag {claims[part].get(key)!r}"
            for part in ("metrics", "governance")
            for key in sorted((set(said[part]) | set(claims[part])) - older[part])
            if said[part].get(key) != claims[part].get(key)
        ]
    named = _dig(report, "model.sha256")
    if named != digest:
        found.append(f"report.json names model SHA-256 {str(named)[:16]}..., the file is {digest[:16]}...")
    if bool(_dig(manifest, "meta.model.private")) != (claims.get("privacy_mode") == "dpsgd"):
        found.append("the tag's model recipe and its privacy mode disagree")
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise RegistryError(f"{model} does not belong to this run: {found[0]}{more}; refusing a substituted artifact")
    return claims


def short_number(value: Any, none: str = "None") -> str:
    if value is None:
        return none
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def membership_text(metrics: dict[str, Any]) -> str:
    """The membership AUC as `list` prints it: with its 95% interval, its attack and its target counts, or what the
    entry does not record (an entry registered before they were recorded)."""
    auc = metrics.get("audit.membership.auc")
    if auc is None:
        return "not measured"
    ci, attack = metrics.get("audit.membership.auc_ci95"), metrics.get("audit.membership.auc_attack")
    members, nonmembers = metrics.get("audit.membership.members"), metrics.get("audit.membership.nonmembers")
    interval = f" [95% CI {short_number(ci[0])}-{short_number(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else ""
    if members is None or nonmembers is None:
        return f"{short_number(auc)}{interval} (members / non-members not recorded)"
    by = f"{attack}; " if attack else ""
    return f"{short_number(auc)}{interval} ({by}{members} members vs {nonmembers} non-members)"


def _sign(entry: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in entry.items() if k != "tag"}
    return {**body, "tag": keys.tag(artifacts.canonical(body), "registry")}


def _superseded(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """An honest resume of a registered run: its earlier entry is dropped, or, when it was marked known-good
    (the vault keeps that model), kept and marked as replaced by the new one, never reported as tampered."""
    if old["run_dir"] != new["run_dir"]:
        return old
    return {**old, "superseded_by": new["id"]} if old["known_good"] else None


def _offerable(entry: dict[str, Any], manifest: dict[str, Any] | None) -> None:
    """Refuse to offer as known-good a model the budget stopped early or whose tag records no run claims."""
    claims = manifest["meta"].get("run") if manifest is not None else {"stopped": entry.get("stopped")}
    if not isinstance(claims, dict):
        raise RegistryError(f"run {entry['id']!r}: its model's keyed tag records no run; it is never known-good")
    if manifest is not None and manifest["meta"].get("finite") is not True:
        raise RegistryError(f"run {entry['id']!r}: its model's weights are not finite; it is never known-good")
    stopped = claims.get("stopped") or entry.get("stopped")
    if stopped:
        raise RegistryError(
            f"run {entry['id']!r} was stopped by the privacy {stopped} before its planned epochs: a partly trained "
            "model is never offered as known-good"
        )


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path).absolute()
        self.vault = self.path.parent / "known_good"

    def vault_path(self, sha256: str) -> Path:
        return self.vault / f"{sha256}.pt"

    # -- reading and verifying ------------------------------------------------------------------------------
    def _raw(self) -> list[Any]:
        try:
            raw = read_nofollow(self.path, root=self.path.parent)
        except FileNotFoundError:
            return []
        except (IntegrityError, OSError) as err:
            raise RegistryError(f"registry {self.path} cannot be read safely: {err}") from None
        try:
            runs = json.loads(raw)["runs"]
        except (ValueError, KeyError, TypeError) as err:
            raise RegistryError(f"registry {self.path} is not readable JSON with a 'runs' list: {err}") from None
        if not isinstance(runs, list):
            raise RegistryError(f"registry {self.path}: 'runs' is not a list")
        return runs

    def check_entry(self, entry: Any, index: int) -> dict[str, Any]:
        """The entry, after its schema and keyed tag verify (RegistryError naming what is wrong)."""
        what = f"registry {self.path} entry {index}"
        if not isinstance(entry, dict):
            raise RegistryError(f"{what} is not an object; refusing a malformed registry")
        for key, types in ENTRY_SCHEMA.items():
            if not isinstance(entry.get(key), types):
                raise RegistryError(f"{what} ({entry.get('id')!r}): field {key!r} is missing or of the wrong type")
        try:
            keys.verify(artifacts.canonical({k: v for k, v in entry.items() if k != "tag"}), entry["tag"],
                        "registry", what=f"{what} ({entry['id']!r})")  # fmt: skip
        except IntegrityError as err:
            raise RegistryError(str(err)) from None
        if not artifacts.is_sha256(entry["sha256"]):
            raise RegistryError(f"{what} ({entry['id']!r}): sha256 {entry['sha256']!r} is not a SHA-256")
        return entry

    def audit(self) -> list[tuple[dict[str, Any] | None, str]]:
        """Every entry with '' when it verifies, else the one-line reason it does not."""
        out: list[tuple[dict[str, Any] | None, str]] = []
        for i, raw in enumerate(self._raw()):
            try:
                out.append((self.check_entry(raw, i), ""))
            except RegistryError as err:
                out.append((raw if isinstance(raw, dict) else None, str(err)))
        return out

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, verified; any forged or malformed entry refuses the whole registry."""
        checked = self.audit()
        bad = [why for _, why in checked if why]
        if bad:
            raise RegistryError(f"{bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        return [entry for entry, _ in checked]  # type: ignore[misc]

    def get(self, run_id: str) -> dict[str, Any]:
        for entry in self.entries():
            if entry["id"] == run_id:
                return entry
        raise RegistryError(f"no run {run_id!r} in {self.path}; `aisec-train-registry list` shows the ids")

    def validate(self) -> None:
        """Before training: the registry path is writable without following a symlink and its entries verify."""
        try:
            validate_output_path(self.path, what="audit.registry_path")
        except StoreError as err:
            raise RegistryError(str(err)) from None
        self.entries()

    # -- editing --------------------------------------------------------------------------------------------
    @contextmanager
    def _editing(self) -> Iterator[list[dict[str, Any]]]:
        """Lock, read and verify, let the caller edit, sign and write atomically. A refusal writes nothing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path.with_name(self.path.name + ".lock"), wait=120.0, what=f"registry {self.path}"):
            runs = self.entries()
            yield runs
            signed = [_sign(r) for r in runs]
            atomic_write(self.path, json.dumps({"runs": signed}, indent=2), root=self.path.parent)

    def register(
        self, run_dir: Path, governance: dict[str, Any] | None = None, report: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record a finished run; its model.pt must verify under its keyed tag and hold finite weights.

        ``report`` (the run's report so far; default: the run's report.json) must agree with the tag's claims;
        the entry's headline metrics and governance are the tag's own (``governance`` overrides the latter).
        """
        run_dir = Path(run_dir).resolve()
        model = run_dir / "model.pt"
        digest, manifest = verify_file(model, root=run_dir)
        if manifest["meta"].get("finite") is not True:
            raise RegistryError(f"{model} has non-finite weights (per its keyed tag); it is never registered")
        report = report if report is not None else self._report(run_dir)
        claims = check_claims(model, digest, manifest, report)
        entry = {
            "id": f"{run_dir.parent.name}_{run_dir.name}-{digest[:8]}",
            "run_dir": str(run_dir),
            "checkpoint": str(model),
            "sha256": digest,
            "data_manifest_sha256": claims["data_manifest_sha256"],
            "privacy_mode": claims["privacy_mode"],
            "stopped": claims["stopped"],
            "trained_in": claims.get("run_dir"),  # a moved or copied run stays registrable, and says where it ran
            "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
            # from the keyed tag (report.json was held to it above): an edited report cannot raise a metric
            "metrics": claims["metrics"],
            "governance": governance or claims["governance"],
            "known_good": False,
        }
        with self._editing() as runs:
            old = [r for r in runs if r["id"] == entry["id"]]
            if old and old[0]["known_good"]:  # re-registering the same checkpoint keeps its known-good copy
                entry.update(known_good=True, marked_good_at=old[0].get("marked_good_at"))
            runs[:] = [_superseded(r, entry) for r in runs if r["id"] != entry["id"]]
            runs[:] = [r for r in runs if r is not None] + [entry]
        return _sign(entry)

    @staticmethod
    def _report(run_dir: Path) -> dict[str, Any]:
        try:
            report = json.loads(read_nofollow(run_dir / "report.json", root=run_dir))
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as err:
            raise RegistryError(f"{run_dir / 'report.json'} is not readable JSON: {err}") from None
        if not isinstance(report, dict):
            raise RegistryError(f"{run_dir / 'report.json'} is not a JSON object")
        return report

    def mark_good(self, run_id: str) -> dict[str, Any]:
        with self._editing() as runs:
            entry = next((r for r in runs if r["id"] == run_id), None)
            if entry is None:
                raise RegistryError(f"no run {run_id!r} in {self.path}; `aisec-train-registry list` shows the ids")
            model = Path(entry["checkpoint"])
            _, manifest = verify_file(model, entry["sha256"], root=Path(entry["run_dir"]))
            _offerable(entry, manifest)
            self._copy_verified(model, self.vault_path(entry["sha256"]), entry["sha256"], root=self.path.parent)
            entry.update(known_good=True, marked_good_at=datetime.now(UTC).isoformat(timespec="seconds"))
        return {**entry, "vault_copy": str(self.vault_path(entry["sha256"]))}

    @staticmethod
    def _copy_verified(source: Path, dest: Path, sha256: str, *, root: Path) -> None:
        data = read_nofollow(source)
        if sha256_bytes(data) != sha256:
            raise RegistryError(f"checkpoint {source} changed while it was copied; nothing was written to {dest}")
        atomic_write(dest, data, root=root)

    def rollback(self, dest: Path, run_id: str | None = None) -> dict[str, Any]:
        """Restore a known-good checkpoint (the latest one unless ``run_id``) to ``dest``, verified, re-tagged."""
        entries = self.entries()
        self._check_dest(Path(dest), entries)
        good = [r for r in entries if r["known_good"]]
        if run_id is not None:
            good = [r for r in good if r["id"] == run_id]
        if not good:
            what = f"run {run_id!r} is not marked known-good" if run_id else "no run is marked known-good"
            raise RegistryError(f"cannot roll back: {what} in {self.path}")
        entry = good[-1]
        _offerable(entry, None)
        source = self.vault_path(entry["sha256"])
        try:
            data = read_nofollow(source, root=self.path.parent)
        except FileNotFoundError:
            raise RegistryError(f"checkpoint {source} (the known-good copy of {entry['id']}) is missing") from None
        if sha256_bytes(data) != entry["sha256"]:
            raise RegistryError(
                f"checkpoint {source} has SHA-256 {sha256_bytes(data)}, expected {entry['sha256']}: "
                "refusing a tampered checkpoint"
            )
        dest = Path(dest).absolute()
        meta = {"finite": True, "restored_from": entry["id"]}
        artifacts.save_artifact(dest, lambda fh: fh.write(data), root=dest.parent, meta=meta)
        return entry

    def _check_dest(self, dest: Path, entries: list[dict[str, Any]]) -> None:
        """Refuse a rollback destination that is one of the registry's own files or a registered checkpoint: the
        restored model (and its .tag, .sha256) replaced registry.json itself (exit 0, the inventory gone), a vault
        copy, or a run's model.pt (its entry then TAMPERED). Checked before anything is read or written."""
        if not dest.absolute().name or dest.is_dir():  # '' (the working directory) or a folder: no file to write
            raise RegistryError(f"--dest {str(dest)!r} is a directory, not a file path; e.g. --dest serving/model.pt")
        ours = {
            self.path.resolve(): "overwrite the registry file itself",
            self.path.with_name(self.path.name + ".lock").resolve(): "overwrite the registry's lock",
            **{
                Path(e["checkpoint"] + suffix).resolve(): f"overwrite the registered checkpoint of run {e['id']}"
                for e in entries
                for suffix in ("", ".tag", ".sha256")  # its keyed tag and digest too: either makes it TAMPERED
            },
        }
        vault = self.vault.resolve()
        for path in (dest, dest.with_name(dest.name + ".tag"), dest.with_name(dest.name + ".sha256")):
            where = path.absolute().resolve()
            what = ours.get(where) or ("write into the known-good vault" if where.is_relative_to(vault) else None)
            if what:
                raise RegistryError(
                    f"--dest {dest} would {what} ({where}); restore to a serving path (not the registry's files, "
                    "its vault or a registered run's checkpoint), e.g. --dest serving/model.pt"
                )

    def status(self, entry: dict[str, Any]) -> tuple[str, str]:
        """('ok' | 'missing' | 'replaced' | 'TAMPERED') of the run-directory copy, and of the vault copy ('-' if
        none). 'replaced': a resume of the run registered a newer model; the vault keeps this one."""
        if entry.get("superseded_by"):
            run = "replaced"
        else:
            run = self._run_status(entry)
        if not entry["known_good"]:
            return run, "-"
        vault = self.vault_path(entry["sha256"])
        if not vault.is_file() or vault.is_symlink():
            return run, "missing" if not vault.is_symlink() else "TAMPERED"
        return run, "ok" if sha256_bytes(read_nofollow(vault)) == entry["sha256"] else "TAMPERED"

    @staticmethod
    def _run_status(entry: dict[str, Any]) -> str:
        try:
            verify_file(Path(entry["checkpoint"]), entry["sha256"], root=Path(entry["run_dir"]))
            return "ok"
        except RegistryError as err:
            return "missing" if "does not exist" in str(err) else "TAMPERED"

    def retag(self) -> int:
        """Re-sign every entry and its run's model.pt manifest under the current key (after a rotation)."""
        with self._editing() as runs:
            for entry in runs:
                try:
                    artifacts.retag_artifact(Path(entry["checkpoint"]), root=Path(entry["run_dir"]))
                except (IntegrityError, FileNotFoundError):
                    pass  # a missing or tampered run copy stays as it is; `list` reports it
            return len(runs)
