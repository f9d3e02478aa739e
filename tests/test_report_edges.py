"""Edge cases of what the report claims: a checklist item passes only on evidence from checks that ran on the
samples the report names (robust/stage.py), and the sweep summary refuses a report.json it cannot read."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from aisec_train.config import to_config
from aisec_train.data.dataset import DataBundle
from aisec_train.robust.stage import stage_robustness
from aisec_train.run_state import Run


def _robustness_items(tmp_path, model, x, y, **robustness) -> dict[str, dict]:
    """The two checklist items of the real robustness stage, on ``(x, y)`` as the whole test split."""
    cfg = to_config({"robustness": {"eval_samples": "all", **robustness}})
    data = DataBundle("digits", TensorDataset(x, y), TensorDataset(x, y), 10, (1, 8, 8), {})
    run = Run(cfg=cfg, run_dir=tmp_path, data=data, model=model)
    run.report.add("metrics", clean_accuracy=0.5)  # the whole split's figure, which the evidence must not quote
    run.report.stage = "robustness"
    stage_robustness(run)
    return {c["item"].split()[0]: c for c in run.report.checklist} | {"_report": run.report}


def test_masking_item_never_claims_a_square_check_the_pgd_suite_did_not_run(digits_cnn, tmp_path):
    """`robustness.eval=pgd` runs no Square: the masking item used to pass with "black-box Square found no
    example the white-box attacks missed". It now fails, names the missing check and the override that runs it."""
    model, x, y = digits_cnn
    items = _robustness_items(tmp_path, model, x[:40], y[:40], eval="pgd", attack={"steps": 4, "restarts": 1})
    masking = items["robust"]
    assert masking["status"] == "fail", masking
    assert "Square found" not in masking["evidence"] and "no black-box Square check ran" in masking["evidence"]
    assert "robustness.eval=apgd" in masking["fix"]
    assert "pgd on" in masking["evidence"] and "at 2 steps" in masking["evidence"]  # what did run is named


def test_masking_item_with_one_step_names_the_missing_comparison(digits_cnn, tmp_path):
    """PGD-1 has no fewer-step run to compare with: "more steps did not raise robust accuracy" is not measured."""
    model, x, y = digits_cnn
    items = _robustness_items(tmp_path, model, x[:40], y[:40], eval="pgd", attack={"steps": 1, "restarts": 1})
    masking = items["robust"]
    assert masking["status"] == "fail" and "no more-steps comparison ran" in masking["evidence"]
    assert "robustness.attack.steps >= 2" in masking["fix"]


def test_masking_pass_quotes_each_check_it_measured(digits_cnn, tmp_path):
    model, x, y = digits_cnn
    items = _robustness_items(tmp_path, model, x[:60], y[:60])  # the default apgd suite
    masking, evasion = items["robust"], items["tested"]
    rob = items["_report"].get("robustness.eval")
    square = rob["gradient_masking"]["checks"]["square"]
    if masking["status"] == "pass":
        assert (
            f"Square ({square['queries']} queries)" in masking["evidence"]
            or "no white-box survivor" in (masking["evidence"])
        )
        assert "apgd-ce on" in masking["evidence"] and "all-zero input gradient" in masking["evidence"]
    # the clean figure beside the robust one is the attacked samples', not the whole split's (0.5 above)
    assert f"vs clean {rob['clean_accuracy']:.3f} on the same samples" in evasion["evidence"]
    assert "vs clean 0.500" not in evasion["evidence"]


def test_no_correctly_classified_sample_passes_neither_item(digits_cnn, tmp_path):
    """A sample with no correctly classified input (robustness.eval_samples=1 picked a misclassified digit) ran
    no attack and no check: both items used to pass on attacks and checks over zero inputs."""
    model, x, y = digits_cnn
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().squeeze(1)[:3]
    assert len(wrong) >= 1
    items = _robustness_items(tmp_path, model, x[wrong], y[wrong])
    for key in ("tested", "robust"):
        assert items[key]["status"] == "fail", items[key]
        assert "robustness.eval_samples=all" in items[key]["fix"]
    assert "(0 attacked)" in items["tested"]["evidence"]


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '"text"',
        '{"robustness": []}',
        '{"run": {"timings": {"train": "1s"}}}',
        '{"metrics": {"clean_accuracy": "x"}}',
    ],
)
def test_sweep_refuses_a_report_it_cannot_read_in_one_line(tmp_path, capsys, content):
    """A report.json that is not an aisec-train report (a list, a section that is a list, a timing "1s") was a
    traceback (AttributeError, TypeError) from aisec-train-sweep, or a figure "x" in the table and the plot; now one
    line naming the file and the value, exit 2."""
    from aisec_train.sweep import main

    (tmp_path / "multirun.yaml").write_text("{}\n")
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "report.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report.json" in err and "aisec-train-sweep: error:" in err, err
    assert not (tmp_path / "sweep_summary.md").exists()


def test_sweep_still_summarises_a_report_with_null_figures(tmp_path):
    """A text run's report holds null robust figures and no privacy epsilon: that is a report, and it is summarised."""
    from aisec_train.sweep import summarize

    (tmp_path / "0").mkdir()
    report = {"metrics": {"clean_accuracy": 0.9}, "robustness": {"robust_accuracy": None}, "privacy": None}
    (tmp_path / "0" / "report.json").write_text(json.dumps(report))
    rows = summarize(tmp_path)
    assert rows[0]["clean_accuracy"] == 0.9 and rows[0]["robust_accuracy"] is None


def test_privacy_audit_with_more_canaries_than_training_samples_is_refused_before_training(tmp_path):
    """synthetic (480 training samples) with the default 500 mislabel canaries: the audit stage refused
    `m=500` (not naming the key) after the DP model had trained and charged its epsilon to the data's ledger, and
    after the membership audit had written its figure. Now one line naming audit.canaries.m, exit 2, before a step
    is trained: no ledger, no checkpoint, no report."""
    from tests.conftest import run_cli

    ledgers, run_dir = tmp_path / "ledgers", tmp_path / "run"
    env = {"AISEC_TRAIN_LEDGER_STORE": str(ledgers)}
    args = ("train.epochs=1", "dataset=synthetic", "audit.privacy_audit=on", f"hydra.run.dir={run_dir}")
    proc = run_cli(*args, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("aisec-train: error: audit.canaries.m=500 is not allowed") and "480" in err, err
    assert "Traceback" not in proc.stderr
    assert "stage train" not in proc.stderr and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "report.json").exists() and not (run_dir / "membership_roc.png").exists()
    assert not ledgers.exists() or not any(p.is_file() for p in ledgers.rglob("*.json")), list(ledgers.rglob("*"))


def test_triton_backend_on_a_cpu_run_is_refused_before_training(monkeypatch):
    """`aisec-train robustness.backend=triton` on a CPU machine (no TRITON_INTERPRET) trained, then raised a
    ValueError traceback (exit 1) at the first attack: in training under robustness=pgd_at, else in the robustness
    stage after training and its DP charge. The run's preflight now refuses it in one line."""
    from aisec_train.api import compose
    from aisec_train.errors import ConfigError
    from aisec_train.pipeline import preflight
    from aisec_train.run_state import UserObjects

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = compose(["robustness.backend=triton", "train.device=cpu", "privacy.ledger_store=scratch"])
    with pytest.raises(ConfigError, match=r"robustness.backend='triton' is not allowed: runs Triton kernels on CUDA"):
        preflight(cfg, UserObjects())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter runs the kernels: allowed
    preflight(cfg, UserObjects())
    preflight(compose(["robustness.backend=torch", "train.device=cpu", "privacy.ledger_store=scratch"]), UserObjects())


def test_fit_refuses_the_triton_backend_on_cpu_before_a_step(monkeypatch, digits_cnn):
    """fit (the Python API's one loop) with robustness=pgd_at robustness.backend=triton on the CPU raised a
    ValueError at its first adversarial batch; it now refuses in one line, as run's preflight does."""
    from torch.utils.data import DataLoader

    from aisec_train.api import compose, fit
    from aisec_train.errors import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, x, y = digits_cnn
    cfg = compose(["privacy=none", "robustness=pgd_at", "robustness.backend=triton", "train.device=cpu"])
    with pytest.raises(ConfigError, match=r"robustness.backend='triton' is not allowed"):
        fit(model, DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16), cfg)


def test_model_card_and_security_report_say_what_the_robust_figure_was_measured_on(digits_cnn, tmp_path):
    """The model card and the security report quoted the robust accuracy of a 200-sample evaluation with no sample
    count or interval, and set it against the whole split's clean accuracy; they now carry both, and the clean
    figure of the same samples."""
    from aisec_train.report.outputs import model_card
    from aisec_train.report.security_report import security_report

    model, x, y = digits_cnn
    cfg = to_config({"robustness": {"eval_samples": 30, "attack": {"steps": 4, "restarts": 1}, "eval": "pgd"}})
    data = DataBundle("digits", TensorDataset(x, y), TensorDataset(x[:60], y[:60]), 10, (1, 8, 8), {})
    run = Run(cfg=cfg, run_dir=tmp_path, data=data, model=model)
    run.report.add("metrics", clean_accuracy=0.5)
    run.report.stage = "robustness"
    stage_robustness(run)
    rob = run.report.get("robustness")
    lo, hi = rob["robust_accuracy_ci"]
    words = f"on 30 of 60 test samples (95% CI {lo:.3f}-{hi:.3f})"
    card = model_card(run.report)
    assert words in card, card
    text = security_report(run.report, [])
    assert words in text and f"vs clean {rob['eval']['clean_accuracy']:.3f} on the same samples" in text, text


def test_targeted_attacks_report_the_targets_that_ran():
    """AutoAttack's standard budget names 9 target classes; a 5-class model has 4 runner-ups, and APGD-T and FAB-T
    attacked those 4, yet robustness.eval.<attack>.n_target_classes said 9: a stronger attack than ran."""
    from torch import nn

    from aisec_train.robust.evaluation import evaluate_robustness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    x = torch.rand(12, 1, 8, 8)
    y = model(x).argmax(1)
    out = evaluate_robustness(model, x, y, suite="autoattack", eps=0.05, steps=3, square_queries=10)
    assert out["attacks"]["apgd-t"]["n_target_classes"] == 4 and out["attacks"]["fab-t"]["n_target_classes"] == 4
    out = evaluate_robustness(model, x, y, suite="apgd", eps=0.05, steps=3)
    assert out["attacks"]["apgd-t"]["n_target_classes"] == 3  # the apgd suite's 3 of the 4


def test_the_summary_line_says_the_robust_figure_is_a_samples_and_its_clean_accuracy():
    """The end-of-run line put the whole split's clean accuracy beside the robust accuracy of a 200-sample
    evaluation, as if measured on the same inputs; it now says which sample and that sample's clean accuracy."""
    from aisec_train.report.report import Report
    from aisec_train.report.summary import _accuracy

    report = Report()
    report.add("metrics", clean_accuracy=0.911)
    attack = {"name": "apgd", "norm": "linf", "eps": 0.1}
    evaluation = {"clean_accuracy": 0.905}
    report.add("robustness", robust_accuracy=0.275, attack=attack, eval=evaluation, eval_samples=200, eval_of=360)
    line = _accuracy(report)
    assert line == (
        "accuracy   clean 0.911, robust 0.275 (apgd, linf eps 0.1) on a sample of 200 of 360 test samples, "
        "clean 0.905 on them"
    )
    whole = Report()
    whole.add("metrics", clean_accuracy=0.911)
    whole.add("robustness", robust_accuracy=0.275, attack=attack, eval=evaluation, eval_samples=360, eval_of=360)
    assert _accuracy(whole) == "accuracy   clean 0.911, robust 0.275 (apgd, linf eps 0.1)"  # the whole split


def test_the_report_states_the_training_attack_that_ran_fgsm_rs_one_step():
    """``robustness=fgsm_rs robustness.steps=5`` trains one FGSM step (with a random start) and the report said only
    the mode; ``train.adversarial_attack`` now states the attack that ran, its steps as run."""
    from aisec_train import compose
    from aisec_train.robust.config import training_attack

    fast = compose(["robustness=fgsm_rs", "robustness.steps=5", "privacy=none"]).robustness
    fast.resolve("digits")
    assert training_attack(fast) == {
        "norm": "linf", "eps": fast.eps, "step_size": 1.25 * fast.eps, "steps": 1, "random_start": True,
    }  # fmt: skip
    pgd = compose(["robustness=pgd_at", "robustness.steps=5", "privacy=none"]).robustness
    pgd.resolve("digits")
    assert training_attack(pgd)["steps"] == 5
    assert training_attack(compose(["privacy=none"]).robustness) is None


def test_the_threat_model_names_this_run_s_robustness_and_backdoor_controls():
    """It said 'PGD / FGSM-RS adversarial training; PGD evaluation' and 'BadNets' whatever the run did."""
    from aisec_train.report.report import Report
    from aisec_train.report.security_report import threat_model

    report = Report()
    report.add("robustness", robust_accuracy=0.5, training="trades", eval={"suite": "autoattack"})
    report.add("backdoor", attack="wanet")
    rows = {r["threat"]: r["mitigation"] for r in threat_model(report)}
    assert rows["evasion (adversarial examples)"] == "adversarial training: trades; evaluation: autoattack suite"
    assert "poisoning / backdoor (wanet)" in rows
    plain = {r["threat"]: r["mitigation"] for r in threat_model(Report())}
    assert plain["evasion (adversarial examples)"] == "adversarial training: none; evaluation: none"
    assert "poisoning / backdoor (none run)" in plain
