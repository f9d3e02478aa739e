"""Issue 12's figure scripts: the pieces that decide their numbers, on tiny real inputs (seconds in all).

- privacy_eval's score capture reports exactly what the one-run audit reports and hands over the scores behind
  the bound; opake-auditing's estimate on those scores (the independent check) agrees with ours where the two
  estimators coincide (perfect separation, every canary guessed, delta 0);
- robust_eval's cost breakdown reads a report's suite the way the suite runs;
- benchmarks/autoattack.py's ``compare`` (ours vs torchattacks on one model) imports from the figure scripts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aisec_train.audit import privacy_audit
from aisec_train.audit.privacy_audit import epsilon_lower_bound
from aisec_train.data.views import Sample
from aisec_train.models import build_model

FIGURES = Path(__file__).resolve().parents[1] / "scripts" / "figures"


def _load(name: str):
    """A figure script as a module; its ``common`` is scripts/figures/common.py (benchmarks/ has another)."""
    saved = sys.modules.pop("common", None)
    sys.path.insert(0, str(FIGURES))
    try:
        spec = importlib.util.spec_from_file_location(f"figure_{name}", FIGURES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FIGURES))
        sys.modules.pop("common", None)
        if saved is not None:
            sys.modules["common"] = saved
    return module


@pytest.fixture(scope="module")
def privacy_eval():
    return _load("privacy_eval")


@pytest.fixture(scope="module")
def robust_eval():
    return _load("robust_eval")


def _digits_like(n: int = 120) -> Sample:
    g = torch.Generator().manual_seed(0)
    return Sample(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _memorise(dataset) -> nn.Module:
    """A linear model fitted hard to whatever it is given: included canaries score high."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_score_capture_reports_what_the_audit_reports(privacy_eval):
    data, original = _digits_like(), privacy_audit.run_privacy_audit
    with privacy_eval.ScoreCapture() as capture:
        captured = privacy_audit.run_privacy_audit(_memorise, data, m=40, seed=3, delta=1e-5)
    assert privacy_audit.run_privacy_audit is original  # put back
    plain = privacy_audit.run_privacy_audit(_memorise, data, m=40, seed=3, delta=1e-5)
    timing = {"train_seconds", "score_seconds", "seconds"}
    assert "scores" not in captured and {k: v for k, v in captured.items() if k not in timing} == {
        k: v for k, v in plain.items() if k not in timing
    }
    assert len(capture.scores) == len(capture.included) == 40
    again = epsilon_lower_bound(capture.scores, capture.included, delta=1e-5)
    assert again["epsilon_lower_bound"] == captured["epsilon_lower_bound"] > 0


@pytest.mark.parametrize("m", [100, 400])
def test_opake_agrees_where_the_estimators_coincide(privacy_eval, m):
    rng = np.random.default_rng(m)
    included = rng.random(m) < 0.5
    scores = np.where(included, 5.0, -5.0) + rng.normal(0, 0.1, m)  # perfect separation
    k_pos = int(included.sum())
    ours = epsilon_lower_bound(scores, included, delta=0.0, k_pos=k_pos, k_neg=m - k_pos)["epsilon_lower_bound"]
    theirs = privacy_eval.opake_bound(scores.tolist(), included.tolist(), delta=0.0)
    assert theirs == pytest.approx(ours, abs=2e-3)
    # The coins matter: shuffled coins carry no signal for either estimator.
    shuffled = rng.permutation(included)
    assert privacy_eval.opake_bound(scores.tolist(), shuffled.tolist(), delta=0.0) < 0.5 * theirs


def test_drill_recipe_is_the_tests_and_later_overrides_win(privacy_eval):
    recipe = privacy_eval.drill_recipe()
    assert "audit.privacy_audit=on" in recipe and "privacy.target_epsilon=1" in recipe
    merged = privacy_eval.merge(recipe, ["train.epochs=30"])
    assert "train.epochs=30" in merged and "train.epochs=100" not in merged and len(merged) == len(recipe)


def test_cost_breakdown_follows_the_suite(robust_eval):
    checks = {"square": {"queries": 100, "seconds": 0.5}, "steps": {"steps": [25, 50], "seconds": 1.0}}
    ev = {
        "suite": "apgd", "n_samples": 100, "clean_accuracy": 0.9, "robust_accuracy": 0.4, "seconds": 6.0,
        "gradient_masking": {"checks": {**checks, "zero_gradients": {"samples": 0}}},
        "apgd-ce": {"robust_accuracy": 0.5, "steps": 50, "restarts": 1, "seconds": 1.5},
        "apgd-t": {"robust_accuracy": 0.4, "steps": 50, "n_target_classes": 3, "seconds": 2.5},
    }  # fmt: skip
    costs = robust_eval.stage_costs({"robustness": {"eval": ev}, "run": {"timings": {"robustness": 6.2}}})
    assert costs["attacks"] == {"apgd-ce": 1.5, "apgd-t": 2.5}
    assert costs["masking_checks"] == {"square": 0.5, "steps": 1.0}
    assert costs["other"] == pytest.approx(0.5)
    passes = costs["nominal_gradients_per_sample"]
    assert passes["apgd-ce"] == pytest.approx(45)  # 50 steps on the 90% clean-correct
    assert passes["apgd-t"] == pytest.approx(75)  # 3 targets x 50 steps on the 50% APGD-CE left
    assert passes["steps_check"] == pytest.approx(22.5) and passes["square_check_forwards"] == pytest.approx(40)


def test_autoattack_comparison_runs_on_any_model(robust_eval):
    bench = robust_eval._bench()
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8).eval()
    x = torch.rand(12, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct, so every attack has work
    rows = bench.compare(model, x, y, 0.05, budgets=[("tiny", 2, 10, False)], name="tiny", reference_suites=False)
    assert [r["impl"] for r in rows] == ["torchattacks", "ours"]
    assert all(r["clean_accuracy"] == 1.0 and 0 <= r["robust_accuracy"] <= 1 for r in rows)
    assert {"after_apgd-ce", "after_apgd-t", "after_fab-t", "after_square"} <= set(rows[1])


def test_long_figures_resume_only_pieces_measured_in_the_same_context(tmp_path, robust_eval):
    """robust_eval's progress file: a re-run keeps what was measured with the same settings and nothing else."""
    progress_type = robust_eval.Progress
    out = tmp_path / "robust_eval.json"
    first = progress_type(out, quick=False, samples=0)
    assert first.get("model pgd_at 0") is None
    first.add("model pgd_at 0", {"row": {"clean_accuracy": 0.9}, "versus": []})
    first.add("job-apgd-0", {"seconds": 70.0})
    again = progress_type(out, quick=False, samples=0)
    assert again.get("model pgd_at 0") == {"row": {"clean_accuracy": 0.9}, "versus": []}
    assert again.get("job-apgd-0") == {"seconds": 70.0}
    assert progress_type(out, quick=True, samples=0).get("model pgd_at 0") is None  # other settings: re-measured
    assert progress_type(out, quick=False, samples=60).get("job-apgd-0") is None


def test_default_job_verdict_gives_the_paired_accuracy_interval():
    """The default-job figure (issues 10 and 13) judges accuracy on seed means and brackets the paired change."""
    verdict = _load("open_model").default_job_verdict
    rows = [
        {"impl": impl, "seed": seed, "seconds": 10.0, "clean_accuracy": acc}
        for seed, (base, now) in enumerate([(0.90, 0.91), (0.92, 0.90), (0.91, 0.91), (0.93, 0.92)])
        for impl, acc in (("baseline", base), ("now", now))
    ]
    result = verdict(rows)
    low, high = result["accuracy_change_ci95"]
    assert result["ratios"]["accuracy_change"] == pytest.approx(-0.005)
    assert low < -0.005 < high
    assert high - low == pytest.approx(2 * 3.182446 * 0.006455, abs=2e-4)  # 2 t(0.975, df 3) sem, rounded
    assert verdict(rows[:2])["accuracy_change_ci95"] is None  # one seed: no interval
