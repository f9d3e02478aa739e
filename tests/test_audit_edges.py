"""Red-team edges of the audit package: verdicts on too few samples, tiny held-out splits, unbounded canaries, and
report lines that must state what a figure was measured on (docs/audits.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import aisec_train
from aisec_train.audit import details, evidence, membership
from aisec_train.audit.stage import check_before_training, stage_audit
from aisec_train.data.stage import stage_data
from aisec_train.errors import ConfigError
from aisec_train.report.report import Report
from aisec_train.report.security_report import security_report, threat_model
from aisec_train.run_state import Run


def _npz(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8), y=np.arange(n) % 2)
    return path


def _run(tmp_path: Path, n_test: int, *overrides: str) -> Run:
    """A run through the data stage only (no training): npz data with ``n_test`` held-out samples."""
    train, test = _npz(tmp_path / "train.npz", 64, 0), _npz(tmp_path / "test.npz", n_test, 1)
    cfg = aisec_train.compose(
        ["privacy=none", "dataset=npz", f"dataset.path={train}", f"dataset.test_path={test}", *overrides]
    )
    run = Run(cfg=cfg, run_dir=tmp_path / "run")
    run.run_dir.mkdir()
    stage_data(run)
    return run


def _items(report: Report) -> dict[str, dict]:
    return {c["item"]: c for c in report.checklist}


def test_a_one_sample_heldout_split_answers_the_audits_not_applicable_instead_of_crashing(tmp_path):
    """It used to train, then stop in the audit stage ('cannot materialise an empty dataset', exit 2) with half of
    the run folder written; a membership verdict on 1 member vs 1 non-member was possible too."""
    run = _run(tmp_path, 1, "audit.extraction.seeds=1", "audit.extraction.surrogate_epochs=1",
               "audit.membership.reference_models=0", "audit.guard.rate_limit=5")  # fmt: skip
    assert run.factory is not None
    run.model = run.factory(seed=0)  # untrained: the audits' refusals do not depend on the weights
    stage_audit(run)
    items = _items(run.report)
    for item in (evidence.MEMBERSHIP, evidence.EXTRACTION, evidence.SANITIZATION):
        assert items[item]["status"] == "not_applicable", items[item]
    assert "1 held-out sample(s)" in items[evidence.MEMBERSHIP]["evidence"]
    assert "at least 10" in items[evidence.MEMBERSHIP]["evidence"]
    assert items[evidence.GUARD]["status"] == "pass", items[evidence.GUARD]  # one input cannot fail the probe
    assert run.report.get("audit.membership.auc") is None
    # The report files still read: the threat model and the details say why, never a figure.
    text = security_report(run.report, [])
    assert "Not applicable: only 1 member" in text and "not applicable (1 held-out sample(s)" in text


def test_membership_below_the_target_floor_is_not_a_verdict(tmp_path):
    """8 held-out samples cap the targets at 8 per side, below audit.membership.targets' own floor of 10."""
    run = _run(tmp_path, 8, "audit.membership.reference_models=0")
    assert run.factory is not None
    from aisec_train.audit.stage import _membership

    _membership(run, run.factory(seed=0))
    item = _items(run.report)[evidence.MEMBERSHIP]
    assert item["status"] == "not_applicable" and "only 8 member and 8 non-member" in item["evidence"], item


def test_noise_canaries_are_capped_before_training(tmp_path):
    """audit.canaries.kind=noise with m in the millions trained the audited model, then never finished."""
    run = _run(tmp_path, 16, "audit.privacy_audit=on", "audit.canaries.kind=noise", "audit.canaries.m=5000000")
    with pytest.raises(ConfigError, match=r"audit\.canaries\.m=5000000 is not allowed: must be <= the 64 training"):
        check_before_training(run)
    (tmp_path / "ok").mkdir()
    ok = _run(tmp_path / "ok", 16, "audit.privacy_audit=on", "audit.canaries.kind=noise", "audit.canaries.m=64")
    check_before_training(ok)  # as many noise canaries as training samples: allowed


def _dp_summary(m: int, eps: float, delta: float = 1e-5) -> dict:
    """A membership summary whose only attack is perfect (every member above every non-member)."""
    labels = np.r_[np.ones(m), np.zeros(m)].astype(int)
    scores = labels + np.linspace(0, 0.5, 2 * m)
    check = membership.dp_bound_check(labels, scores, eps, delta)
    return {
        "auc": 1.0, "auc_ci95": [1.0, 1.0], "tpr_at_fpr_0_001": 1.0, "tpr_at_fpr_0_01": 1.0, "auc_attack": "loss",
        "strongest_attack": "loss", "attacks": {"loss": {}}, "members": m, "nonmembers": m, "reference_models": 0,
        "fpr_resolution": 1 / m, "dp_bound": {"respected": check["respected"], "attacks": {"loss": check}},
    }  # fmt: skip


def test_a_dp_membership_pass_needs_targets_that_could_refute_the_claim():
    """12 + 12 targets cannot refute epsilon 3 even with a perfect attack: that used to be a 'pass'."""
    few = _dp_summary(12, 3.0)
    assert few["dp_bound"]["respected"] and not few["dp_bound"]["attacks"]["loss"]["can_refute"]
    status, text = evidence.membership(few, 3.0, 1e-5, 0.6)
    assert status == "fail" and evidence.untestable(few), text  # the report's "fail": nothing was verified
    assert "NOT TESTED: too few targets to test epsilon 3.00" in text and "12 members vs 12 non-members" in text
    # Enough targets: the same perfect attack is a significant violation, an ordinary fail.
    many = _dp_summary(360, 3.0)
    assert many["dp_bound"]["attacks"]["loss"]["can_refute"] and not evidence.untestable(many)
    status, text = evidence.membership(many, 3.0, 1e-5, 0.6)
    assert status == "fail" and "VIOLATE" in text and "NOT TESTED" not in text
    # The largest refutable epsilon is the perfect attack's own Clopper-Pearson reading at the family-wise level
    # (Bonferroni over 3 attacks x 10 thresholds, half of 0.05 / 30 a side): level^(1/m) vs 1 - that.
    x = (0.05 / 30 / 2) ** (1 / 360)
    got = many["dp_bound"]["attacks"]["loss"]["max_refutable_epsilon"]
    assert got == pytest.approx(np.log((x - 1e-5) / (1 - x)), rel=1e-6)


def test_an_honest_looking_dp_result_on_few_targets_is_not_a_pass():
    """Chance-level scores on 12 + 12 targets at epsilon 8 'respected' the bound: that was a pass; 360 + 360 at
    epsilon 3 can test the claim, so chance-level scores there still pass."""
    rng = np.random.default_rng(0)
    for m, eps, expected in ((12, 8.0, "fail"), (360, 8.0, "fail"), (360, 3.0, "pass")):
        labels = np.r_[np.ones(m), np.zeros(m)].astype(int)
        check = membership.dp_bound_check(labels, rng.random(2 * m), eps, 1e-5)
        summary = {**_dp_summary(m, eps), "dp_bound": {"respected": check["respected"], "attacks": {"loss": check}}}
        status, text = evidence.membership(summary, eps, 1e-5, 0.6)
        assert status == expected and (("NOT TESTED" in text) == (expected == "fail")), (m, eps, text)
    assert "held-out split" in evidence.TOO_FEW_TARGETS_FIX


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0, 3.88, 8.0])
def test_not_tested_says_how_many_targets_would_test_the_claim(eps):
    """The count named is the smallest whose perfect attack refutes epsilon (one fewer cannot)."""
    n = evidence.targets_to_refute(eps, 1e-5)
    assert _dp_summary(n, eps)["dp_bound"]["attacks"]["loss"]["can_refute"]
    assert not _dp_summary(n - 1, eps)["dp_bound"]["attacks"]["loss"]["can_refute"]
    few = _dp_summary(max(2, n // 2), eps)
    _, text = evidence.membership(few, eps, 1e-5, 0.6)
    assert f"needs about {n} members and as many non-members" in text


def _membership_report(reference_models: int) -> Report:
    report = Report()
    attacks = {"loss": {"auc": 0.52, "auc_ci95": [0.47, 0.57], "tpr_at_fpr_0_001": 0.0, "tpr_at_fpr_0_01": 0.01}}
    report.add(
        "audit",
        membership={**attacks["loss"], "attacks": attacks, "strongest_attack": "loss", "auc_attack": "loss",
                    "members": 180, "nonmembers": 180, "fpr_resolution": 1 / 180,
                    "reference_models": reference_models, "reference_epochs": 3, "reference_train_size": 90,
                    "reference_batch_size": 32},
    )  # fmt: skip
    return report


def test_the_membership_auc_is_never_stated_without_its_targets():
    report = _membership_report(0)
    row = next(r for r in threat_model(report) if r["threat"] == "membership inference")
    assert "180 members vs 180 non-members" in row["status"] and "loss" in row["status"], row
    glance = next(line for line in security_report(report, []).splitlines() if line.startswith("| membership AUC"))
    assert "180 members vs 180 non-members" in glance and "0.470-0.570" in glance, glance


def test_membership_details_describe_only_the_attacks_that_ran():
    """With audit.membership.reference_models=0 only the loss attack runs; the details claimed offline LiRA."""
    text = " ".join(details.membership(_membership_report(0).get("audit.membership")))
    assert "compares each target's logit-scaled confidence" not in text
    assert "neither offline LiRA nor RMIA ran" in text
    text = " ".join(details.membership(_membership_report(2).get("audit.membership")))
    assert "offline LiRA compares" in text and "RMIA" in text


def test_the_guard_probe_is_not_failed_by_a_one_input_batch():
    """With one held-out input the rate-limit probe asked the refilled guard for x[:2] (one row) and counted 2: it
    reported 'a query after the refill was NOT answered', a guard defect that does not exist."""
    import torch

    from aisec_train.audit.config import GuardConfig
    from aisec_train.audit.probes import guard_probes

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    result = guard_probes(model, torch.rand(1, 1, 8, 8), GuardConfig())  # no rate limit: the mechanism probed
    assert result["rate_limit_refused_burst"] and result["rate_limit_recovered"], result
    result = guard_probes(model, torch.rand(1, 1, 8, 8), GuardConfig(rate_limit=10.0))  # the guard's own limit
    assert result["rate_limit_refused_burst"] and result["rate_limit_recovered"], result
    assert evidence.guard(result, None)[0] == "pass"


def _monitored_run(run_dir: Path, record_hash: bool = True) -> Path:
    """A run folder as the pipeline leaves it: the baseline, then model.pt whose keyed tag records its hash."""
    import torch

    from aisec_train.audit import monitor
    from aisec_train.config import MonitorConfig
    from aisec_train.hashing import sha256_file
    from aisec_train.models import ModelFactory
    from aisec_train.report.outputs import write_json
    from aisec_train.train import checkpoint

    factory = ModelFactory({"_target_": "tests.userland.TinyResNet", "width": 4}, input_shape=(3, 6, 6), num_classes=3)
    model = factory(seed=0)
    x = (0.5 + 0.05 * torch.randn(40, 3, 6, 6, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    meta = {"target": factory.target, "input_shape": [3, 6, 6], "num_classes": 3}
    write_json(monitor.build_baseline(model, x[:20], x[20:], model_meta=meta, cfg=MonitorConfig()),
               run_dir / monitor.BASELINE)  # fmt: skip
    tag_meta = {"model": monitor.recipe(factory)}
    if record_hash:
        tag_meta["monitor_baseline_sha256"] = sha256_file(run_dir / monitor.BASELINE)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.save(state, run_dir / "model.pt", root=run_dir, meta=tag_meta)
    np.savez(run_dir / "noise.npz", x=np.random.default_rng(0).random((30, 3, 6, 6)).astype(np.float32))
    return run_dir


def _monitor(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from aisec_train.audit import monitor

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        monitor.main(list(args))
    return int(done.value.code), out.getvalue(), err.getvalue()


def test_an_edited_monitoring_baseline_is_refused_not_trusted(tmp_path):
    """Thresholds raised to 1e9 in monitor_baseline.json turned a noise batch's ALARM (exit 1) into OK (exit 0)."""
    import json

    from aisec_train.audit import monitor

    run_dir = _monitored_run(tmp_path)
    code, out, _ = _monitor(str(run_dir), str(run_dir / "noise.npz"))
    assert code == 1 and out.startswith("ALARM"), out
    baseline = json.loads((run_dir / monitor.BASELINE).read_text())
    baseline["thresholds"] = {"drift": 1e9, "feature": 1e9, "confidence": 1e9}
    (run_dir / monitor.BASELINE).write_text(json.dumps(baseline))
    code, out, err = _monitor(str(run_dir), str(run_dir / "noise.npz"))
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and "refusing an edited monitoring baseline" in err, err


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda b: b.pop("thresholds"), "thresholds None are not finite numbers > 0"),
        (lambda b: b.update(feature_mean=b["feature_mean"][:5]), "feature_mean is not 216 finite numbers"),
        (lambda b: b["confidence"].update(std="x"), "confidence has no finite mean and std"),
        (lambda b: b["thresholds"].update(drift=-1), "are not finite numbers > 0"),
    ],
    ids=["no-thresholds", "short-statistics", "bad-confidence", "negative-threshold"],
)
def test_a_malformed_untagged_baseline_is_one_line_not_a_traceback(tmp_path, edit, needle):
    """A baseline the tag does not vouch for (hand-made, older run) used to end in KeyError / RuntimeError."""
    import json

    from aisec_train.audit import monitor

    run_dir = _monitored_run(tmp_path, record_hash=False)
    baseline = json.loads((run_dir / monitor.BASELINE).read_text())
    edit(baseline)
    (run_dir / monitor.BASELINE).write_text(json.dumps(baseline))
    code, out, err = _monitor(str(run_dir), str(run_dir / "noise.npz"))
    assert code == 2 and out == "" and "Traceback" not in err, (code, err)
    assert err.count("\n") == 1 and "is not a usable monitoring baseline" in err and needle in err, err


def test_one_extraction_seed_is_never_called_resolved():
    """With audit.extraction.seeds=1 the spread is 0, so 'mean > spread' held for any drop, however small."""
    one = {"lowered_in": 1, "seeds": 1, "mean": 1e-4, "std": 0.0}
    assert "resolved" not in evidence._seeds(one) and "spread not measured" in evidence._seeds(one)
    assert evidence._seeds({"lowered_in": 3, "seeds": 3, "mean": 0.05, "std": 0.01}).endswith("resolved")
    assert evidence._seeds({"lowered_in": 3, "seeds": 3, "mean": 0.01, "std": 0.05}).endswith("within seed noise")


def test_extraction_queries_beyond_memory_are_refused_before_training(tmp_path):
    """audit.extraction.queries=10**12 was accepted; after training the attacker's plan grew without end."""
    run = _run(tmp_path, 16, "audit.extraction.queries=1000000000000")
    with pytest.raises(ConfigError, match=r"audit\.extraction\.queries=1000000000000 is not allowed: at most 33554432"):
        check_before_training(run)
    (tmp_path / "ok").mkdir()
    check_before_training(_run(tmp_path / "ok", 16, "audit.extraction.queries=33554432"))  # exactly the bound
    (tmp_path / "off").mkdir()
    check_before_training(_run(tmp_path / "off", 16, "audit=off", "audit.extraction.queries=1000000000000"))


@pytest.mark.slow
def test_the_pipeline_records_the_baseline_hash_and_refuses_noise_canaries_before_training(tmp_path):
    """End to end: model.pt's keyed tag vouches for monitor_baseline.json, so editing it is refused (exit 2); and
    millions of noise canaries are refused in one line before any step (they used to hang after training)."""
    import json
    import subprocess
    import sys

    from tests.conftest import run_cli

    small = ["experiment=smoke", "privacy=none", "train.epochs=1", "robustness.evaluate=false", "dataset=synthetic"]
    refused = tmp_path / "refused"
    proc = run_cli(*small, "audit=off", "audit.privacy_audit=on", "audit.canaries.kind=noise",
                   "audit.canaries.m=5000000", f"hydra.run.dir={refused}")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("aisec-train: error: audit.canaries.m=5000000")
    assert not (refused / "checkpoints").exists() or not list((refused / "checkpoints").iterdir())
    assert not (refused / "model.pt").exists() and not (refused / "report.json").exists()

    run_dir = tmp_path / "run"
    proc = run_cli(*small, "audit.membership.reference_models=0", "audit.extraction.seeds=1",
                   "audit.extraction.surrogate_epochs=1", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.savez(tmp_path / "noise.npz", x=np.random.default_rng(0).random((60, 8, 8)).astype(np.float32))
    monitor = [sys.executable, "-m", "aisec_train.audit.monitor", str(run_dir), str(tmp_path / "noise.npz")]
    assert subprocess.run(monitor, capture_output=True, text=True).returncode == 1  # noise: an alarm
    baseline = json.loads((run_dir / "monitor_baseline.json").read_text())
    baseline["thresholds"]["drift"] = 1e9
    baseline["thresholds"]["feature"] = 1e9
    (run_dir / "monitor_baseline.json").write_text(json.dumps(baseline))
    done = subprocess.run(monitor, capture_output=True, text=True)
    assert done.returncode == 2 and "refusing an edited monitoring baseline" in done.stderr, done.stderr


def test_a_top_k_policy_that_withholds_nothing_is_refused_before_training(tmp_path):
    """audit.guard.output=top_k with top_k >= the classes released full probabilities under the name 'top_k'."""
    run = _run(tmp_path, 16, "audit.guard.output=top_k", "audit.guard.top_k=2")  # the npz data has 2 classes
    with pytest.raises(ConfigError, match=r"audit\.guard\.top_k=2 is not allowed: must be < the 2 classes"):
        check_before_training(run)
    (tmp_path / "ok").mkdir()
    check_before_training(_run(tmp_path / "ok", 16, "audit.guard.output=top_k", "audit.guard.top_k=1"))
    (tmp_path / "label").mkdir()  # top_k is only read by the top_k policy
    check_before_training(_run(tmp_path / "label", 16, "audit.guard.output=label", "audit.guard.top_k=1000"))
