"""Audit defects left open by the last red-team session (docs/audits.md): the one-run privacy audit's canary model
after a budget stop, the registry's list without the membership AUC's counts, and the audit CLIs' bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aisec_train
from aisec_train.audit import privacy_audit, registry, registry_cli
from aisec_train.audit.stage import _privacy_audit
from aisec_train.data.stage import stage_data
from aisec_train.run_state import Run
from aisec_train.train import checkpoint
from aisec_train.train.stage import stage_train


def _npz(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(n, 6, 6), dtype=np.uint8), y=np.arange(n) % 2)
    return path


def _trained(tmp_path: Path, *overrides: str) -> Run:
    """A real DP run through the data and train stages on a tiny npz split (an MLP, seconds)."""
    train, test = _npz(tmp_path / "train.npz", 64, 0), _npz(tmp_path / "test.npz", 16, 1)
    cfg = aisec_train.compose(
        ["model=mlp", "dataset=npz", f"dataset.path={train}", f"dataset.test_path={test}", "train.batch_size=16",
         "train.ema_decay=0", *overrides]
    )  # fmt: skip
    run = Run(cfg=cfg, run_dir=tmp_path / "run")
    run.run_dir.mkdir()
    with run.resources:
        stage_data(run)
        stage_train(run)
    return run


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Run:
    """Explicit noise with a small own target: the budget stops the audited run after a few of its 6 planned epochs
    (shared: each test adds its own report section)."""
    stop = ("privacy.noise_multiplier=2.0", "privacy.target_epsilon=2", "train.epochs=6")
    audits = ("audit.privacy_audit=on", "audit.canaries.m=20", "audit.membership.reference_models=1",
              "audit.membership.targets=10")  # fmt: skip
    run = _trained(tmp_path_factory.mktemp("stopped"), *stop, *audits)
    assert run.report.get("train.stopped_by_budget") and run.report.get("train.epochs_completed") < 6
    return run


def test_the_canary_model_stops_where_the_privacy_budget_stopped_the_audited_run(stopped_run):
    """Explicit noise with a small own target: the budget stops the audited run after a few of its 6 planned epochs,
    so it claims the epsilon of the steps it took. The canary model trained all 6 epochs and spent more than that
    claim (3.58 vs 2.93 on the smoke job), so its bound was compared against a claim its own training exceeded."""
    run = stopped_run
    steps, claimed = run.report.get("privacy.steps"), run.report.get("privacy.epsilon")
    _privacy_audit(run)
    audit = run.report.get("audit.privacy_audit")
    # The canary model spends what the audited run claims (its batch is rounded to the canary set: about as much).
    assert audit["canary_epsilon"] == pytest.approx(claimed, rel=0.05), (audit["canary_epsilon"], claimed)
    assert audit.get("canary_steps") == steps, audit  # the audited run's steps, not its planned epochs'
    assert audit["audited_steps"] == steps and audit["audited_stopped_by_budget"] is True
    item = next(c for c in run.report.checklist if c["item"] == privacy_audit.ITEM)
    assert (
        f"canary model trained {steps} step(s) (audited run: {steps}, stopped by the privacy budget"
        in (item["evidence"])
    ), item


def test_the_membership_reference_models_stop_at_the_audited_run_s_steps_too(stopped_run):
    """LiRA's OUT models mimic the audited training; after a budget stop they trained all the planned epochs."""
    from aisec_train.audit.stage import _membership

    run = stopped_run
    assert run.model is not None
    steps = run.report.get("privacy.steps")
    _membership(run, run.model)
    membership = run.report.get("audit.membership")
    assert membership.get("reference_steps") == [steps], (membership.get("reference_steps"), steps)
    assert membership["reference_max_steps"] == steps


# ---- aisec-train-registry list: the membership AUC with what it was measured on ----------------------------------
MEMBERSHIP = {"auc": 0.5152160493827, "auc_ci95": [0.4709274691358, 0.5609388503086], "auc_attack": "lira_offline",
              "strongest_attack": "lira_offline", "members": 360, "nonmembers": 360}  # fmt: skip


def _registered_run(run: Path, *, tag_counts: bool = True) -> Path:
    """A run folder as the pipeline leaves it (tests/test_audit_registry.py's make_run) with a membership audit.
    ``tag_counts=False``: a model saved before the tag recorded the AUC's counts and interval."""
    run.mkdir(parents=True)
    report = {"data": {"manifest_sha256": "d" * 64}, "metrics": {"clean_accuracy": 0.93125},
              "privacy": {"mode": "none", "epsilon": None, "delta": None}, "governance": {"owner": "me"},
              "audit": {"membership": MEMBERSHIP}}  # fmt: skip
    claims = registry.run_claims(report, run)
    if not tag_counts:
        claims["metrics"] = {k: v for k, v in claims["metrics"].items() if k not in registry.MEMBERSHIP_CONTEXT}
    meta = {"model": {"private": False}, "run": claims}
    digest = checkpoint.save({"w": torch.ones(8)}, run / "model.pt", root=run, meta=meta)
    report["model"] = {"sha256": digest}
    (run / "report.json").write_text(json.dumps(report))
    return run


def _registry(capsys, reg: Path, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        registry_cli.main(["--registry", str(reg), *map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.usefixtures("keyed")
def test_registry_list_quotes_the_membership_auc_with_its_interval_attack_and_counts(tmp_path, capsys):
    """`list` printed `mia_auc 0.5152160493827` alone: not what it was measured on, nor its interval, where the
    checklist, the security report and the model card all quote them."""
    reg = tmp_path / "registry.json"
    assert _registry(capsys, reg, "register", _registered_run(tmp_path / "a" / "run"))[0] == 0
    code, out, err = _registry(capsys, reg, "list")
    assert code == 0, err
    row = out.splitlines()[1]
    assert "mia_auc 0.515 [95% CI 0.471-0.561] (lira_offline; 360 members vs 360 non-members)" in row, row
    assert "acc 0.931" in row  # three decimals, as the report quotes them


@pytest.mark.usefixtures("keyed")
def test_an_entry_whose_tag_predates_the_counts_still_registers_and_says_they_are_not_recorded(tmp_path, capsys):
    reg = tmp_path / "registry.json"
    code, _, err = _registry(capsys, reg, "register", _registered_run(tmp_path / "old" / "run", tag_counts=False))
    assert code == 0, err  # its report.json has the counts, its tag not: not a substitution
    row = _registry(capsys, reg, "list")[1].splitlines()[1]
    assert "mia_auc 0.515 (members / non-members not recorded)" in row, row


# ---- the guard's rate limit: never a control of a guard that has none ---------------------------------------------
@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_a_guard_without_a_rate_limit_does_not_pass_the_over_rate_item(tiny_model):
    """A guard with audit.guard.rate_limit=0 (unlimited, the default until this was found) passed the item 'refuses
    malformed and over-rate queries': the probe built its own guard at 10 queries/s, and the threat model named
    'rate limit' as this run's mitigation. The default is now 100 queries/s, which the probe measures."""
    from aisec_train.audit import evidence
    from aisec_train.audit.config import GuardConfig
    from aisec_train.audit.probes import guard_probes

    probes = guard_probes(tiny_model, torch.rand(4, 1, 4, 4), GuardConfig(rate_limit=0.0))
    status, text = evidence.guard(probes, None)
    assert status == "fail" and "this guard has NO rate limit (audit.guard.rate_limit=0" in text, text
    assert probes["rate_limit"]["configured"] is False
    default = guard_probes(tiny_model, torch.rand(4, 1, 4, 4), GuardConfig())
    assert default["rate_limit"]["configured"] and default["rate_limit"]["queries_per_s"] == 100.0, default
    assert evidence.guard(default, None)[0] == "pass"


def test_the_rate_limit_probe_measures_the_configured_limit_and_burst(tiny_model):
    from aisec_train.audit import evidence
    from aisec_train.audit.config import GuardConfig
    from aisec_train.audit.probes import guard_probes

    probes = guard_probes(tiny_model, torch.rand(4, 1, 4, 4), GuardConfig(rate_limit=5.0, burst=150))
    assert probes["rate_limit"] == {"queries_per_s": 5.0, "burst": 150, "configured": True, "configured_burst": 150}
    assert probes["rate_limit_refused_burst"] and probes["rate_limit_recovered"], probes
    status, text = evidence.guard(probes, None)
    assert status == "pass" and "at the guard's rate limit of 5 queries/s with burst 150:" in text, text
    # An unbounded burst is probed at PROBE_MAX_BURST (10^9 tokens were 1.6e7 forward passes), at an awkward rate.
    probes = guard_probes(tiny_model, torch.rand(4, 1, 4, 4), GuardConfig(rate_limit=0.3, burst=10**9))
    assert probes["rate_limit_refused_burst"] and probes["rate_limit_recovered"], probes
    status, text = evidence.guard(probes, None)
    assert status == "pass" and "burst 1024 (probed at 1024 of its burst of 1000000000)" in text, text


def test_the_threat_model_does_not_name_a_rate_limit_the_guard_lacks(tiny_model):
    from aisec_train.audit.config import GuardConfig
    from aisec_train.audit.probes import guard_probes
    from aisec_train.report.report import Report
    from aisec_train.report.security_report import threat_model

    def rows(cfg: GuardConfig) -> dict[str, str]:
        report = Report()
        extraction = {"guard": {"query_budget": cfg.query_budget}, "effects": {}, "fidelity": 0.5, "queries": 10,
                      "settings": {"undefended": {}}}  # the fields the threat model reads  # fmt: skip
        report.add("audit", guard_probes=guard_probes(tiny_model, torch.rand(4, 1, 4, 4), cfg), extraction=extraction)
        return {r["threat"]: r["mitigation"] for r in threat_model(report)}

    off = rows(GuardConfig(query_budget=0, rate_limit=0.0))
    assert off["malformed / abusive queries"].endswith("no rate limit (audit.guard.rate_limit=0)"), off
    assert "no per-client budget (audit.guard.query_budget=0), no rate limit" in off["model extraction"], off
    on = rows(GuardConfig(rate_limit=5.0, burst=8))
    assert on["malformed / abusive queries"].endswith("range), rate limit"), on
    assert "per-client budget, rate limit" in on["model extraction"], on


# ---- aisec-train-registry rollback: never onto the registry's own files ------------------------------------------
@pytest.mark.usefixtures("keyed")
def test_rollback_refuses_a_destination_that_is_the_registry_its_vault_or_a_registered_checkpoint(tmp_path, capsys):
    """`rollback --dest registry.json` replaced the inventory with a checkpoint and exited 0 (the next `list`: 'not
    readable JSON'); onto a vault copy or a run's model.pt (or its .tag) it left that entry TAMPERED."""
    reg = tmp_path / "inventory" / "registry.json"
    run = _registered_run(tmp_path / "a" / "run")
    assert _registry(capsys, reg, "register", run)[0] == 0
    run_id = registry.Registry(reg).entries()[0]["id"]
    assert _registry(capsys, reg, "mark-good", run_id)[0] == 0
    before = {p: p.read_bytes() for p in [reg, *run.iterdir(), *reg.parent.joinpath("known_good").iterdir()]}
    vault_copy = next(reg.parent.joinpath("known_good").iterdir())
    for dest, words in (
        (reg, "would overwrite the registry file itself"),
        (tmp_path / "inventory" / ".." / "inventory" / "registry.json", "would overwrite the registry file itself"),
        (vault_copy, "would write into the known-good vault"),
        (run / "model.pt", f"would overwrite the registered checkpoint of run {run_id}"),
        (run / "model.pt.tag", f"would overwrite the registered checkpoint of run {run_id}"),
        ("", "is a directory, not a file path"),  # the working directory (a traceback once dest was checked)
        (tmp_path, "is a directory, not a file path"),
    ):
        code, out, err = _registry(capsys, reg, "rollback", "--dest", dest)
        assert code == 2 and err.count("\n") == 1 and words in err and not out, (dest, err)
    assert {p: p.read_bytes() for p in before} == before  # nothing written
    code, out, _ = _registry(capsys, reg, "list")
    assert code == 0 and "known-good  run ok" in out and "vault ok" in out
    serving = tmp_path / "serving" / "model.pt"
    assert _registry(capsys, reg, "rollback", "--dest", serving)[0] == 0 and serving.is_file()


# ---- aisec-train-monitor: a batch whose x is no .npy, or declares more than it may -------------------------------
def _monitor(*args: object) -> tuple[int, str, str]:
    import contextlib
    import io

    from aisec_train.audit import monitor

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        monitor.main([str(a) for a in args])
    return int(done.value.code), out.getvalue(), err.getvalue()


def _zip_npz(path: Path, member: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member)
    return path


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize(
    "member, needle",
    [
        (b"not an npy array", "is not a readable .npz of numeric arrays: the magic string is not correct"),
        # 256 TB declared, 64 bytes present: numpy allocated it first (a MemoryError traceback, exit 1 = "alarm")
        (_npy_header((10**9, 8, 8, 1000)) + b"\0" * 64, "declares 256000000000000 bytes"),
    ],
    ids=["not-npy", "huge-header"],
)
def test_the_monitor_refuses_a_batch_whose_x_is_no_npy_or_too_large_in_one_line(tmp_path, member, needle):
    """A zip whose x.npy is not a .npy came back from np.load as bytes: AttributeError traceback and exit 1, which
    this command's contract reads as ALARM."""
    from tests.test_audit_edges import _monitored_run

    run_dir = _monitored_run(tmp_path / "run")
    code, out, err = _monitor(run_dir, _zip_npz(tmp_path / "bad.npz", member))
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert err.startswith("aisec-train-monitor: error: ") and needle in err, err


def test_the_monitor_bounds_the_batch_by_max_bytes(tmp_path):
    batch = tmp_path / "ok.npz"
    np.savez(batch, x=np.zeros((20, 6, 6), dtype=np.float32))  # 2880 bytes
    code, _, err = _monitor(tmp_path / "no-run", batch, "--max-bytes", 100)
    assert code == 2 and "declares 2880 bytes (shape (20, 6, 6), float32), over --max-bytes=100" in err, err
    code, _, err = _monitor(tmp_path / "no-run", batch, "--max-bytes", 0)
    assert code == 2 and err.strip() == "aisec-train-monitor: error: --max-bytes=0 is not allowed: must be >= 1"


@pytest.mark.parametrize("target", ["monitor_baseline.json", "model.pt", "report.json", "batch"])
def test_the_monitor_never_writes_its_verdict_over_the_run_s_files_or_the_batch(tmp_path, target):
    """`--json RUN/monitor_baseline.json` replaced the baseline with the verdict (exit 1, the alarm): every later
    check of that run was refused ('not a monitoring baseline')."""
    from tests.test_audit_edges import _monitored_run

    run_dir = _monitored_run(tmp_path / "run")
    (run_dir / "report.json").write_text("{}")
    batch = run_dir / "noise.npz"
    dest = batch if target == "batch" else run_dir / target
    before = {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, out, err = _monitor(run_dir, batch, "--json", dest)
    assert code == 2 and out == "" and err.count("\n") == 1 and "would overwrite the" in err, (code, err)
    assert {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    code, out, _ = _monitor(run_dir, batch, "--json", tmp_path / "verdict.json")  # elsewhere: written
    assert code == 1 and out.startswith("ALARM") and (tmp_path / "verdict.json").is_file()
