"""The report across combinations of stages: every claim is of what ran in this run (a combination either works as
reported or is refused). Resumes of a finished run with other settings, a budget stop at an epoch's end, figures an
earlier run left in the run directory, and the threat model's mitigations of a run without DP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import aisec_train
from aisec_train.api import compose
from aisec_train.backdoor.stage import stage_poison
from aisec_train.data.stage import stage_data
from aisec_train.report.budget_text import trained_words
from aisec_train.report.report import Report
from aisec_train.report.security_report import security_report, threat_model
from aisec_train.run_state import Run
from aisec_train.train.checkpoint import CheckpointError
from aisec_train.train.resume import CheckpointSlot, identity, load_resume
from aisec_train.train.stage import trained_rows

QUICK = ["privacy=none", "train.epochs=1", "audit=off", "robustness.evaluate=false"]


def _glance(md: str, row: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {row} |"))


def _before_training(overrides: list[str], run_dir: Path) -> Run:
    """A run through the stages before training (data, the red team), as the train stage's resume check sees it."""
    run = Run(cfg=compose(overrides), run_dir=run_dir)
    run_dir.mkdir(exist_ok=True)
    stage_data(run)
    stage_poison(run)
    return run


def _checkpoint(run: Run, meta: dict | None = None) -> None:
    """The checkpoint the train stage writes after epoch 1 (its identity, or ``meta`` instead)."""
    assert run.factory is not None
    slot = CheckpointSlot(run.checkpoint_path, identity(run) if meta is None else meta, run.run_dir)
    slot({"model": run.factory(seed=0).state_dict(), "epoch": 1, "history": [], "complete": True})


@pytest.mark.parametrize(
    ("then", "now", "words"),
    [
        (["backdoor=badnets"], ["backdoor=none"], "the split as loaded (no transform) (backdoor.*, dataset.augment)"),
        (["backdoor=none"], ["backdoor=badnets"], "was trained on the split as loaded (no transform) (step 1: none"),
        (["backdoor=badnets"], ["backdoor=badnets", "backdoor.rate=0.2"], "rate 0.1 then, 0.2 now"),
        (["robustness=none"], ["robustness=pgd_at"], "robustness=pgd_at (attack {'norm': 'linf'"),
        (["robustness=pgd_at"], ["robustness=pgd_at", "robustness.steps=3"], "'steps': 3}) is not allowed"),
    ],
)
def test_a_resume_that_changes_the_training_recipe_is_refused(tmp_path, then, now, words):
    """A finished run resumed trains nothing more, and its report describes the resuming config: with
    backdoor=none a red team's unrepaired model (ASR 0.95) was released as "no poisoning red team in this run";
    with robustness=pgd_at a standard model was reported as adversarially trained."""
    _checkpoint(_before_training([*QUICK, *then], tmp_path / "run"))
    with pytest.raises(CheckpointError) as err:
        load_resume(_before_training([*QUICK, *now], tmp_path / "run"))
    line = str(err.value)
    assert "is not allowed on resume" in line and words in line and "\n" not in line, line
    assert load_resume(_before_training([*QUICK, *then], tmp_path / "run"))["epoch"] == 1  # the same recipe resumes


def test_what_evaluates_the_model_may_change_on_resume(tmp_path):
    _checkpoint(_before_training(QUICK, tmp_path / "run"))
    now = [*QUICK, "robustness.evaluate=true", "robustness.eval=pgd", "audit=default", "train.epochs=3"]
    assert load_resume(_before_training(now, tmp_path / "run"))["epoch"] == 1


def test_a_checkpoint_from_before_the_recipe_was_recorded_still_resumes(tmp_path):
    run = _before_training(QUICK, tmp_path / "run")
    _checkpoint(run, meta={k: v for k, v in identity(run).items() if k != "training"})
    assert load_resume(_before_training([*QUICK, "backdoor=badnets"], tmp_path / "run"))["epoch"] == 1


@pytest.mark.slow
def test_resuming_a_red_team_run_without_its_backdoor_releases_nothing(tmp_path):
    """End to end: the refused resume leaves the released (repaired) model.pt and its report as they were."""
    run_dir = tmp_path / "run"
    aisec_train.run([*QUICK, "backdoor=badnets", "backdoor.repair=none"], run_dir=run_dir)
    released, report = (run_dir / "model.pt").read_bytes(), (run_dir / "report.json").read_bytes()
    with pytest.raises(CheckpointError, match="step 1: reserve_trusted_clean then, none now"):
        aisec_train.run([*QUICK, "backdoor=none"], run_dir=run_dir)
    assert (run_dir / "model.pt").read_bytes() == released and (run_dir / "report.json").read_bytes() == report


@pytest.mark.slow
def test_a_budget_stop_at_an_epoch_s_end_reports_the_epochs_it_trained(tmp_path):
    """At noise 1.309 digits' 3 steps an epoch spend epsilon 2.995 of 3: the stop falls before epoch 2's first step.
    The loop still records epoch 2 (loss 0, accuracy 0 over no batch): report.json said epochs_completed 2, the
    security report "2 epochs", metrics.csv had the empty row; resumed, the stop was forgotten altogether (no
    stopped line, stopped_by_budget false, "2 epochs")."""
    run_dir = tmp_path / "run"
    overrides = ["train.epochs=2", "privacy.noise_multiplier=1.30859375", "audit=off", "robustness.evaluate=false"]
    for resumed in (False, True):
        report = aisec_train.run(overrides, run_dir=run_dir)
        assert report.get("train.stopped_by_budget") is True and report.get("privacy.steps") == 3, resumed
        assert report.get("train.epochs_completed") == 1, resumed
        md = (run_dir / "security_report.md").read_text()
        assert "| training | 1 complete epoch(s) of 2 planned (stopped by the privacy budget after 3 step(s))" in md
        assert "**Stopped by the budget:**" in md
        rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
        assert len(rows) == 2 and rows[1].startswith("1,"), rows
        on_disk = json.loads((run_dir / "report.json").read_text())
        assert on_disk["train"]["stopped_by_budget"] is True and on_disk["train"]["epochs_completed"] == 1


def test_trained_rows_drop_only_a_last_epoch_without_a_step():
    one, empty = {"epoch": 1, "steps": 3, "loss": 2.2}, {"epoch": 2, "steps": 3, "loss": 0.0}
    assert trained_rows([one, empty]) == [one]
    assert trained_rows([one, {"epoch": 2, "steps": 5}]) == [one, {"epoch": 2, "steps": 5}]
    assert trained_rows([one]) == [one] and trained_rows([]) == []
    assert trained_rows([{"epoch": 1}, {"epoch": 2}]) == [{"epoch": 1}, {"epoch": 2}]  # no DP: no steps, no stop


def _stopped(steps: int, completed: int, planned: int = 5, rate: float = 1 / 3) -> Report:
    report = Report()
    report.add("train", stopped_by_budget=True, epochs_completed=completed, epochs_planned=planned)
    report.add("privacy", steps=steps, sample_rate=rate)
    return report


def test_the_at_a_glance_line_says_the_epochs_a_stopped_run_trained():
    assert trained_words(_stopped(6, 3)) == (
        "2 complete epoch(s) of 5 planned (stopped by the privacy budget after 6 step(s))"
    )
    assert trained_words(_stopped(7, 3)) == (
        "2 complete epoch(s) and 1 step(s) of epoch 3 of 5 planned (stopped by the privacy budget after 7 step(s))"
    )
    assert trained_words(_stopped(7, 3, rate=0.3)) == (  # no whole number of batches an epoch: the loop's epoch
        "stopped by the privacy budget in epoch 3 of 5 planned, after 7 step(s)"
    )
    report = Report()
    report.add("train", stopped_by_budget=False, epochs_completed=4, epochs_planned=4)
    assert trained_words(report) == "4 epoch(s)"


def test_a_federated_run_s_training_is_its_rounds():
    """ "1 epochs" was said of 3 rounds of 5 local epochs: train.epochs_completed is the last round."""
    report = Report()
    report.add("train", trainer="federated", epochs_completed=3, epochs_planned=40)
    report.add("federated", rounds=3, rounds_planned=3, local_epochs=5, clients=4)
    line = _glance(security_report(report, []), "training")
    assert "3 of 3 planned federated round(s) of 5 local epoch(s) on 4 clients" in line, line


def test_the_membership_mitigation_names_this_run_s_privacy():
    def mitigation(report: Report) -> str:
        return next(r["mitigation"] for r in threat_model(report) if r["threat"] == "membership inference")

    none = Report()
    none.add("privacy", epsilon=None, mode="none")
    assert mitigation(none).startswith("no DP (privacy=none); ") and "DP-SGD" not in mitigation(none)
    dp = Report()
    dp.add("privacy", epsilon=2.9, delta=1e-5, mode="dpsgd", guarantee={"holds": True, "gaps": []})
    assert mitigation(dp).startswith("DP-SGD; ")
    dp.add("privacy", guarantee={"holds": False, "gaps": ["privacy.reproducible_noise=true: ..."]})
    assert mitigation(dp).startswith("DP-SGD, NO DP guarantee; ")
    client = Report()
    client.add("privacy", epsilon=2.0, delta=1e-5, mode="dp-fedavg", level="client")
    assert mitigation(client).startswith("client-level DP-FedAvg; ")
    client.add("audit", membership={"attacks": ["loss"], "auc": 0.5, "tpr_at_fpr_0_001": 0.0,
                                     "strongest_attack": "loss", "members": 20, "nonmembers": 20})  # fmt: skip
    assert mitigation(client).endswith("membership-inference audit (loss)")


def test_figures_an_earlier_run_left_are_not_this_run_s(tmp_path):
    """A resume with the backdoor or the audit off showed the earlier run's fine_pruning.png and membership ROC
    beside "no poisoning red team in this run"."""
    from aisec_train.report import security_report as sr

    for name in sr.FIGURES:
        (tmp_path / name).write_bytes(b"\x89PNG earlier run")
    report = Report()
    report.add("train", epochs_completed=1)
    assert sr.drawn_figures(report, tmp_path) == ["training_curve.png"]
    md = sr.write(report, tmp_path).read_text()
    assert "![training_curve.png]" in md and "![fine_pruning.png]" not in md and "![membership_roc.png]" not in md
    report.add("audit", membership={"roc_png": "membership_roc.png"})
    report.add("backdoor", fine_pruning={"plot": "fine_pruning.png"})
    report.add("federated", accuracy_plot="federated_accuracy.png")
    assert sr.drawn_figures(report, tmp_path) == list(sr.FIGURES)
    (tmp_path / "fine_pruning.png").unlink()  # named but not there: not shown
    assert "fine_pruning.png" not in sr.drawn_figures(report, tmp_path)


def test_the_poisoning_mitigation_names_the_defences_that_ran():
    """backdoor.repair=none still listed Fine-Pruning as this run's mitigation."""

    def mitigation(report: Report) -> str:
        return next(r["mitigation"] for r in threat_model(report) if r["threat"].startswith("poisoning / backdoor"))

    report = Report()
    report.add("backdoor", attack="badnets", asr_before=0.9, asr_after=0.9, stages={"trained": {}})
    report.add("backdoor", detections={"spectral": {}, "activation_clustering": {}})
    assert (
        mitigation(report) == "spectral-signature / activation-clustering detection, no repair (backdoor.repair=none)"
    )
    report.add("backdoor", stages={"trained": {}, "filtered": {}, "fine_pruned": {}}, detections={"spectral": {}})
    assert mitigation(report) == "spectral-signature detection, filter and retrain, Fine-Pruning"
    assert "Fine-Pruning" in mitigation(Report())  # no red team: the pipeline's defences, its status says untested


def test_the_guard_mitigations_are_the_configured_ones_when_the_audit_is_off():
    """audit=off audit.guard.rate_limit=0 audit.guard.query_budget=0 still named "per-client budget, rate limit"."""

    def mitigations(report: Report) -> dict[str, str]:
        return {r["threat"]: r["mitigation"] for r in threat_model(report)}

    report = Report()
    report.add("audit", membership=None, extraction=None, guard_configured={"rate_limit": 0.0, "query_budget": 0})
    rows = mitigations(report)
    assert rows["model extraction"].endswith(
        "no per-client budget (audit.guard.query_budget=0), no rate limit (audit.guard.rate_limit=0)"
    )
    assert rows["malformed / abusive queries"].endswith("no rate limit (audit.guard.rate_limit=0)")
    report.add("audit", guard_configured={"rate_limit": 100.0, "query_budget": 150})
    assert mitigations(report)["model extraction"].endswith("per-client budget, rate limit")


def test_the_audit_stage_records_the_guard_it_did_not_exercise(tmp_path):
    from aisec_train.audit.stage import stage_audit

    run = _before_training([*QUICK, "audit.guard.rate_limit=0"], tmp_path / "run")
    run.model = run.factory(seed=0)
    stage_audit(run)
    assert run.report.get("audit.guard_configured.rate_limit") == 0 and run.report.get("audit.extraction") is None
    md = security_report(run.report, [])
    assert "guard validation (shape, dtype, finite, range), no rate limit (audit.guard.rate_limit=0)" in md
