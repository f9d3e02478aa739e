"""Artifact substitutions against the registry: each builds honest run folders with the real writers, swaps or
edits one artifact as an attacker who can write ``outputs/`` (not the key) would, and names the command that must
refuse it. Shared by tests/test_registry_swaps.py and scripts/figures/artifact_swaps.py.

    for swap in SWAPS:
        code, err = attempt(swap, tmp_path / swap.name)   # exit status 2 and one line, or the swap went through
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aisec_train.audit import registry, registry_cli
from aisec_train.hashing import sha256_file
from aisec_train.train import checkpoint

DATA_A, DATA_B = "a" * 64, "b" * 64


def make_run(run: Path, value: float = 1.0, *, private: bool = True, data: str = DATA_A, epsilon: float = 2.5,
             stopped_by_budget: bool = False) -> Path:  # fmt: skip
    """A run folder as the pipeline leaves it: model.pt whose keyed tag records the run's claims, report.json."""
    run.mkdir(parents=True, exist_ok=True)
    privacy = {"mode": "dpsgd", "epsilon": epsilon, "delta": 1e-5} if private else {"mode": "none", "epsilon": None,
                                                                                  "delta": None}  # fmt: skip
    report = {"data": {"manifest_sha256": data}, "privacy": privacy, "metrics": {"clean_accuracy": 0.9},
              "train": {"stopped_by_budget": stopped_by_budget}, "governance": {"owner": "me"}}  # fmt: skip
    meta = {"model": {"private": private}, "run": registry.run_claims(report, run)}
    state = {"w": torch.full((64,), value), "b": torch.zeros(3)}
    report["model"] = {"sha256": checkpoint.save(state, run / "model.pt", root=run, meta=meta)}
    (run / "report.json").write_text(json.dumps(report))
    return run


def copy_model(source: Path, dest: Path) -> None:
    for name in ("model.pt", "model.pt.tag", "model.pt.sha256"):
        shutil.copyfile(source / name, dest / name)


def edit_report(run: Path, section: str, key: str, value: object) -> None:
    report = json.loads((run / "report.json").read_text())
    report.setdefault(section, {})[key] = value
    (run / "report.json").write_text(json.dumps(report))


@dataclass
class Swap:
    name: str
    what: str
    setup: Callable[[Path], Path]  # builds the folders, does the swap, returns the DP run folder attacked
    command: str = "register"  # register | mark-good | rollback
    register_first: bool = False  # register (and for rollback: mark good) the honest run before the swap


def _copied_non_dp(root: Path) -> Path:
    target, other = make_run(root / "dp" / "run"), make_run(root / "plain" / "run", 3.0, private=False, data=DATA_B)
    copy_model(other, target)
    return target


def _swapped_report(root: Path) -> Path:
    target, other = make_run(root / "dp" / "run"), make_run(root / "dp2" / "run", 2.0)
    shutil.copyfile(other / "report.json", target / "report.json")
    return target


def _swapped_tag(root: Path) -> Path:
    target, other = make_run(root / "dp" / "run"), make_run(root / "dp2" / "run", 2.0)
    shutil.copyfile(other / "model.pt.tag", target / "model.pt.tag")
    return target


def _non_dp_same_data(root: Path) -> Path:
    target, other = make_run(root / "dp" / "run"), make_run(root / "plain" / "run", 3.0, private=False)
    copy_model(other, target)
    return target


def _truncated(root: Path) -> Path:
    target = make_run(root / "dp" / "run")
    data = (target / "model.pt").read_bytes()
    (target / "model.pt").write_bytes(data[: len(data) // 2])
    return target


def _edited(section: str, key: str, value: object, **run: object) -> Callable[[Path], Path]:
    def setup(root: Path) -> Path:
        target = make_run(root / "dp" / "run", **run)  # type: ignore[arg-type]
        edit_report(target, section, key, value)
        return target

    return setup


def _report_deleted(root: Path) -> Path:
    target = make_run(root / "dp" / "run")
    (target / "report.json").unlink()
    return target


def _other_data_same_privacy(root: Path) -> Path:
    target, other = make_run(root / "dp" / "run"), make_run(root / "dp2" / "run", 2.0, data=DATA_B)
    copy_model(other, target)
    edit_report(target, "model", "sha256", sha256_file(target / "model.pt"))
    return target


def _checkpoint_as_model(root: Path) -> Path:
    target = make_run(root / "dp" / "run")
    ckpt = target / "checkpoints" / "last.pt"
    checkpoint.save({"w": torch.full((64,), 5.0)}, ckpt, root=target)
    shutil.copyfile(ckpt, target / "model.pt")
    shutil.copyfile(ckpt.with_name("last.pt.tag"), target / "model.pt.tag")
    return target


def _digest_edited_to_match(root: Path) -> Path:
    target = _copied_non_dp(root)
    edit_report(target, "model", "sha256", sha256_file(target / "model.pt"))
    return target


def _sidecar_recomputed(root: Path) -> Path:
    target = make_run(root / "dp" / "run")
    torch.save({"w": torch.full((64,), -1.0), "b": torch.zeros(3)}, target / "model.pt")
    (target / "model.pt.sha256").write_text(f"{sha256_file(target / 'model.pt')}  model.pt\n")
    return target


def _after_registration(swap: Callable[[Path, Path], None]) -> Callable[[Path], Path]:
    def setup(root: Path) -> Path:
        target = make_run(root / "dp" / "run")
        _register(root, target)
        swap(root, target)
        return target

    return setup


def _copy_in_plain(root: Path, target: Path) -> None:
    copy_model(make_run(root / "plain" / "run", 3.0, private=False, data=DATA_B), target)


def _stopped(root: Path) -> Path:
    target = make_run(root / "dp" / "run", stopped_by_budget=True)
    _register(root, target)
    return target


SWAPS = [
    Swap(
        "issue-scenario-register", "a non-DP model on other data (model.pt + tag) copied into a DP run", _copied_non_dp
    ),
    Swap(
        "issue-scenario-mark-good",
        "the same copy after the DP run was registered: mark-good",
        _after_registration(_copy_in_plain),
        "mark-good",
    ),  # fmt: skip
    Swap(
        "issue-scenario-rollback",
        "the same copy: rollback (nothing known-good may come of it)",
        _after_registration(_copy_in_plain),
        "rollback",
    ),  # fmt: skip
    Swap("report-swapped", "another DP run's report.json in place of this run's", _swapped_report),
    Swap("tag-swapped", "another run's model.pt.tag beside this model.pt", _swapped_tag),
    Swap("non-dp-same-data", "a non-private model on the same data (with its valid tag)", _non_dp_same_data),
    Swap("truncated-model", "model.pt cut to half its bytes", _truncated),
    Swap("report-epsilon-edited", "report.json's privacy.epsilon lowered to 0.1", _edited("privacy", "epsilon", 0.1)),
    Swap("report-data-hash-edited", "report.json's data hash replaced", _edited("data", "manifest_sha256", DATA_B)),
    Swap(
        "report-claims-dp",
        "a non-DP run's report edited to privacy.mode=dpsgd",
        _edited("privacy", "mode", "dpsgd", private=False),
    ),  # fmt: skip
    Swap("report-deleted", "report.json removed (nothing to hold the model against)", _report_deleted),
    Swap(
        "other-data-digest-matched",
        "a DP model trained on other data, report digest edited to match",
        _other_data_same_privacy,
    ),  # fmt: skip
    Swap("checkpoint-as-model", "checkpoints/last.pt and its tag renamed to model.pt", _checkpoint_as_model),
    Swap(
        "digest-edited-to-match",
        "a copied-in model with report.json's model.sha256 edited to match it",
        _digest_edited_to_match,
    ),  # fmt: skip
    Swap("sidecar-recomputed", "an attacker's model.pt with a recomputed model.pt.sha256", _sidecar_recomputed),
    Swap("stopped-by-budget", "a model the privacy budget stopped early, offered as known-good", _stopped, "mark-good"),
]


def _registry_path(root: Path) -> Path:
    return root / "inventory" / "registry.json"


def _register(root: Path, run: Path) -> None:
    registry.Registry(_registry_path(root)).register(run)


def cli(args: list[str]) -> tuple[int, str]:
    """``aisec-train-registry ARGS`` in-process: (exit status, stderr)."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            registry_cli.main(args)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    return code, err.getvalue()


def attempt(swap: Swap, root: Path) -> tuple[int, str]:
    """Build the swap under ``root`` and run its command; (exit status, stderr)."""
    target = swap.setup(root)
    reg = ["--registry", str(_registry_path(root))]
    if swap.command == "register":
        return cli([*reg, "register", str(target)])
    entries = registry.Registry(_registry_path(root)).entries()
    if swap.command == "mark-good":
        return cli([*reg, "mark-good", entries[-1]["id"]])
    return cli([*reg, "rollback", "--dest", str(root / "restored" / "model.pt")])


def refused(code: int, err: str) -> bool:
    return code == 2 and err.count("\n") == 1 and err.startswith("aisec-train-registry: error:")
