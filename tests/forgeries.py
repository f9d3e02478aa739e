"""The forgery drill: every tampering issue 11 lists, tried against the real command lines.

Each scenario takes the :class:`Base` (one finished DP job that spent its dataset's budget, and its lab) and a
scratch folder, tampers, runs the command an attacker or a careless user would, and returns a :class:`Finding`:
``detected`` is True when the tampering was refused in one line (exit 2, no traceback, nothing changed) or
made harmless (the crash case: the run resumes). Scenarios never change the base for good (they work on copies
of the run directory or the ledger store, or put back what they moved).

    base = make_base(Path("/tmp/forgery"))
    findings = [scenario(base, Path("/tmp/forgery") / name) for name, _, scenario in FORGERIES]
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.drills import Lab, Outcome, report, same_run_dir

EPOCHS = "train.epochs=3"


@dataclass
class Base:
    lab: Lab
    run: Path  # a finished 3-epoch DP job on the digits; it spent the dataset's budget (epsilon ~2.99 of 3)


@dataclass
class Finding:
    name: str
    detected: bool
    evidence: str


def make_base(root: Path) -> Base:
    lab = Lab(Path(root) / "base")
    out = lab.run(lab.root / "run", EPOCHS)
    assert out.rc == 0, out.err[-2000:]
    return Base(lab, lab.root / "run")


def _all(name: str, checks: list[tuple[bool, str]]) -> Finding:
    failed = [why for ok, why in checks if not ok]
    return Finding(name, not failed, "; ".join(failed) if failed else "; ".join(why for _, why in checks))


def _refused(out: Outcome, *words: str) -> tuple[bool, str]:
    return out.refused(*words), out.last[:200] or f"exit {out.rc}"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the privacy budget ------------------------------------------------------------------------------------------
def reset_by_deleting_checkpoints(base: Base, scratch: Path) -> Finding:
    lab = base.lab.clone(scratch.name)
    aside = scratch / "checkpoints_aside"
    shutil.move(base.run / "checkpoints", aside)
    try:
        steps = lab.ledger_steps()
        out = lab.run(base.run, EPOCHS)
        unchanged = lab.ledger_steps() == steps and not (base.run / "checkpoints" / "last.pt").exists()
    finally:
        shutil.rmtree(base.run / "checkpoints", ignore_errors=True)
        shutil.move(aside, base.run / "checkpoints")
    return _all(
        "reset: checkpoints/ deleted", [_refused(out, "privacy budget exhausted"), (unchanged, "nothing spent")]
    )


def reset_by_new_run_dir(base: Base, scratch: Path) -> Finding:
    lab = base.lab.clone(scratch.name)
    out = lab.run(scratch / "fresh_run", EPOCHS)
    return _all(
        "reset: a new hydra.run.dir",
        [_refused(out, "privacy budget exhausted"), (not (scratch / "fresh_run" / "model.pt").exists(), "no model")],
    )


def ledger_history_emptied(base: Base, scratch: Path) -> Finding:
    """The checkpoint's own ledger emptied with its .sha256 recomputed; the dataset ledger's charges removed (tags
    recomputed without the key), cut back to a valid prefix, or deleted."""
    import torch

    checks = []
    run = scratch / "run"
    shutil.copytree(base.run, run, ignore=shutil.ignore_patterns("*.lock"))
    ckpt = run / "checkpoints" / "last.pt"
    payload = torch.load(ckpt, weights_only=True)
    payload["ledger"]["history"] = []
    torch.save(payload, ckpt)
    (run / "checkpoints" / "last.pt.sha256").write_text(f"{_file_hash(ckpt)}  last.pt\n")
    out = base.lab.clone(f"{scratch.name}_ckpt").run(run, "train.epochs=6")
    checks.append(_refused(out, "refusing a tampered file"))

    def tamper(name: str, edit: Callable[[Path, dict], None], *words: str) -> None:
        lab = base.lab.clone(f"{scratch.name}_{name}")
        ledger = next(lab.store.glob("*.json"))
        body = json.loads(ledger.read_text())
        edit(ledger, body)
        checks.append(_refused(lab.run(scratch / f"run_{name}", EPOCHS), *words))

    def drop_charges(path: Path, body: dict) -> None:
        kept = [r for r in body["records"] if r["kind"] != "charge"]
        prev = ""
        for seq, r in enumerate(kept):  # re-chain and "re-hash" as an attacker without the key can
            r.update(seq=seq, prev=prev)
            key_id = r["tag"].split(":")[1]
            r["tag"] = prev = f"v1:{key_id}:{hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()}"
        path.write_text(json.dumps({**body, "records": kept}))

    def cut_back(path: Path, body: dict) -> None:  # a valid prefix: every tag and link still verifies
        path.write_text(json.dumps({**body, "records": [r for r in body["records"] if r["kind"] != "charge"][:2]}))

    tamper("charges_removed", drop_charges, "keyed tag does not verify")
    tamper("cut_back", cut_back, "records were removed or the file was rolled back")
    tamper("deleted", lambda path, body: path.unlink(), "a deleted ledger does not reset a privacy budget")
    return _all("forged: ledger history emptied, hash recomputed", checks)


def two_jobs_at_once(base: Base, scratch: Path) -> Finding:
    result = same_run_dir(Lab(scratch), 2, wait=False, epochs=4)
    return _all(
        "overspent: two jobs on one run directory",
        [
            (result["exit_codes"] == [0, 2], f"exit codes {result['exit_codes']}"),
            (result["refused_naming_holder"] == 1, (result["refusals"] or ["no refusal"])[0][:200]),
            (result["ledger_steps"] == result["report_steps"], f"ledger {result['ledger_steps']} steps = report"),
        ],
    )


def delta_raised_on_resume(base: Base, scratch: Path) -> Finding:
    lab = base.lab.clone(scratch.name)
    before = _file_hash(base.run / "checkpoints" / "last.pt")
    outs = [
        lab.run(base.run, "train.epochs=6", "privacy.delta=1e-4"),
        lab.run(base.run, "train.epochs=6", "privacy.accountant=rdp"),
    ]
    same = _file_hash(base.run / "checkpoints" / "last.pt") == before
    return _all(
        "overspent: privacy.delta raised on resume",
        [_refused(outs[0], "privacy.delta=0.0001 differs"), _refused(outs[1], "privacy.accountant='rdp' differs"),
         (same, "checkpoint untouched")],
    )  # fmt: skip


def delta_half_fresh(base: Base, scratch: Path) -> Finding:
    lab = Lab(scratch)
    outs = [lab.run(scratch / "run", "privacy.delta=0.5"), lab.run(scratch / "run_inf", "privacy.target_epsilon=inf")]
    return _all(
        "overspent: privacy.delta=0.5 on a fresh run",
        [_refused(outs[0], "privacy.delta=0.5", "below 1/n"), _refused(outs[1], "privacy.target_epsilon=inf")],
    )


def crash_between_payload_and_tag(base: Base, scratch: Path) -> Finding:
    """A kill after last.pt is replaced and before its final tag and .sha256: the two-digest manifest accepts it."""
    import torch

    from aisec_train.store import artifacts

    lab = base.lab.clone(scratch.name)
    folder = base.run / "checkpoints"
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    try:
        payload = torch.load(folder / "last.pt", weights_only=True)
        payload["drill"] = 1  # new bytes, same training state
        steps = artifacts.save_steps(folder / "last.pt", lambda fh: torch.save(payload, fh), root=base.run)
        while next(steps) != "payload":
            pass
        steps.close()  # the process dies here: last.pt is new, last.pt.tag accepts old and new, .sha256 is stale
        stale = (folder / "last.pt.sha256").read_text().split()[0] != _file_hash(folder / "last.pt")
        out = lab.run(base.run, EPOCHS)
        resumed = out.rc == 0 and report(base.run)["train"]["resumed_from_epoch"] == 3
    finally:
        for p in folder.iterdir():
            p.unlink()
        for name, data in saved.items():
            (folder / name).write_bytes(data)
    return _all(
        "crash: kill between last.pt and its tag",
        [(stale, "sidecar stale"), (resumed, f"resumed from epoch 3, exit {out.rc} {out.last[:120]}")],
    )


def seed_changed_on_resume(base: Base, scratch: Path) -> Finding:
    lab = base.lab.clone(scratch.name)
    out = lab.run(base.run, EPOCHS, "train.seed=7")
    return _all("contaminated: train.seed changed on resume", [_refused(out, "train.seed=7", "split")])


# ---- the registry ------------------------------------------------------------------------------------------------
def _registered(base: Base, scratch: Path) -> tuple[Lab, Path, str]:
    """A copy of the base run registered and marked known-good in a fresh registry."""
    lab = Lab(scratch)
    run = scratch / "run"
    shutil.copytree(base.run, run, ignore=shutil.ignore_patterns("*.lock"))
    out = lab.tool("registry", "--registry", lab.registry, "register", run)
    assert out.rc == 0, out.err
    run_id = json.loads(lab.registry.read_text())["runs"][0]["id"]
    assert lab.tool("registry", "--registry", lab.registry, "mark-good", run_id).rc == 0
    return lab, run, run_id


def _attacker_model(path: Path) -> str:
    import torch

    torch.save({"w": torch.full((8,), -1.0)}, path)
    path.with_name(path.name + ".sha256").write_text(f"{_file_hash(path)}  {path.name}\n")
    return _file_hash(path)


def registry_model_swapped(base: Base, scratch: Path) -> Finding:
    lab, run, run_id = _registered(base, scratch)
    _attacker_model(run / "model.pt")
    reg = ("registry", "--registry", lab.registry)
    listed = lab.tool(*reg, "list")
    return _all(
        "registry: model.pt swapped, sidecar recomputed",
        [
            _refused(lab.tool(*reg, "register", run), "refusing a tampered file"),
            _refused(lab.tool(*reg, "mark-good", run_id), "refusing a tampered file"),
            (listed.rc == 2 and "TAMPERED" in listed.out, "list: TAMPERED, exit 2"),
        ],
    )


def registry_entry_edited(base: Base, scratch: Path) -> Finding:
    lab, run, run_id = _registered(base, scratch)
    evil = _attacker_model(scratch / "evil.pt")
    shutil.copy(scratch / "evil.pt", lab.registry.parent / "known_good" / f"{evil}.pt")
    body = json.loads(lab.registry.read_text())
    body["runs"][0].update(sha256=evil, checkpoint=str(scratch / "evil.pt"))
    lab.registry.write_text(json.dumps(body))
    dest = scratch / "restored" / "model.pt"
    reg = ("registry", "--registry", lab.registry)
    return _all(
        "registry: registry.json hash and vault path edited",
        [
            _refused(lab.tool(*reg, "rollback", "--dest", dest), "keyed tag does not verify"),
            _refused(lab.tool(*reg, "mark-good", run_id), "keyed tag does not verify"),
            (not dest.exists(), "nothing restored"),
        ],
    )


def registry_malformed(base: Base, scratch: Path) -> Finding:
    lab = Lab(scratch)
    contents = {
        "not json": "{runs: [",
        "runs not a list": '{"runs": 5}',
        "entry not an object": '{"runs": [1]}',
        "entry missing fields": '{"runs": [{"id": "x"}]}',
        "wrong types": '{"runs": [{"id": 1, "sha256": [], "known_good": "yes"}]}',
        "no tag": json.dumps({"runs": [{"id": "a", "run_dir": "r", "checkpoint": "c", "sha256": "0" * 64,
                                        "data_manifest_sha256": None, "registered_at": "t", "metrics": {},
                                        "governance": {}, "known_good": True, "tag": ""}]}),
    }  # fmt: skip
    checks = []
    for name, text in contents.items():
        lab.registry.write_text(text)
        for command in (["list"], ["rollback", "--dest", scratch / "out.pt"], ["mark-good", "a"]):
            ok, why = _refused(lab.tool("registry", "--registry", lab.registry, *command))
            checks.append((ok, f"{name} / {command[0]}: {why}"))
    return _all("registry: malformed entries", checks)


# ---- outputs and numerics ----------------------------------------------------------------------------------------
def planted_symlinks(base: Base, scratch: Path) -> Finding:
    victim = scratch / "victim.txt"
    outside = scratch / "outside"
    checks = []
    plants = {
        "report.json": lambda run: (run / "report.json").symlink_to(victim),
        "checkpoints": lambda run: (run / "checkpoints").symlink_to(outside, target_is_directory=True),
        ".hydra/config.yaml": lambda run: (run / ".hydra" / "config.yaml").symlink_to(victim),
        "run dir": lambda run: run.symlink_to(scratch / "real_run", target_is_directory=True),
    }
    for i, (name, plant) in enumerate(plants.items()):
        victim.write_text("precious\n")
        shutil.rmtree(outside, ignore_errors=True)
        outside.mkdir(parents=True)
        run = scratch / f"run{i}"
        if name == "run dir":
            (scratch / "real_run").mkdir()
        else:
            shutil.copytree(base.run, run, ignore=shutil.ignore_patterns("*.lock"))
            for linked in (run / "report.json", run / "checkpoints", run / ".hydra" / "config.yaml"):
                if name.endswith(linked.name):
                    shutil.rmtree(linked) if linked.is_dir() else linked.unlink()
        plant(run)
        out = base.lab.clone(f"{scratch.name}_{i}").run(run, EPOCHS)
        ok, why = _refused(out, "is a symlink")
        intact = victim.read_text() == "precious\n" and not any(outside.iterdir())
        checks.append((ok and intact, f"{name}: {why}" + ("" if intact else " (WRITTEN THROUGH)")))
    return _all("outputs: planted symlinks in a run directory", checks)


def huge_lr_nan(base: Base, scratch: Path) -> Finding:
    checks = []
    for name, extra in (("dpsgd", []), ("none", ["privacy=none"])):
        lab = Lab(scratch / name)
        run = scratch / name / "run"
        out = lab.run(run, EPOCHS, "train.lr=1e30", *extra)
        ok, why = _refused(out, "non-finite") if "weights" in out.last else _refused(out, "the loss became")
        clean = not (run / "model.pt").exists() and not lab.registry.exists()
        checks.append((ok and clean, f"{name}: {why}" + ("" if clean else " (model.pt or registry entry written)")))
    return _all("broken: train.lr huge -> NaN", checks)


FORGERIES: list[tuple[str, Callable[[Base, Path], Finding]]] = [
    ("reset_checkpoints", reset_by_deleting_checkpoints),
    ("reset_run_dir", reset_by_new_run_dir),
    ("ledger_emptied", ledger_history_emptied),
    ("two_jobs", two_jobs_at_once),
    ("delta_resume", delta_raised_on_resume),
    ("delta_half", delta_half_fresh),
    ("crash_tag", crash_between_payload_and_tag),
    ("seed_resume", seed_changed_on_resume),
    ("registry_swap", registry_model_swapped),
    ("registry_edit", registry_entry_edited),
    ("registry_malformed", registry_malformed),
    ("symlinks", planted_symlinks),
    ("lr_nan", huge_lr_nan),
]
