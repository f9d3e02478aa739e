"""The privacy package's single pieces: one step-count search, one writer of the report's privacy section, and the
Opacus behaviour the package relies on where it still reaches past Opacus' public API (so an upgrade fails here,
loudly, instead of silently changing what a run does).
"""

from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aisec_train.privacy import budget
from aisec_train.privacy.accounting import epsilon
from aisec_train.privacy.ledger import PrivacyLedger
from aisec_train.privacy.report import ITEM, Measured, write
from aisec_train.report.report import Report

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _trees() -> dict[str, ast.Module]:
    """Every module of the package, parsed once for the source checks below."""
    return {p.relative_to(REPO).as_posix(): ast.parse(p.read_text()) for p in (REPO / "aisec_train").rglob("*.py")}


NOISE, RATE, DELTA = 1.1, 0.02, 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_run_ledger_finds_the_exact_step_count_with_the_one_search(accountant):
    ledger = PrivacyLedger(accountant, delta=DELTA)
    ledger.noise_multiplier, ledger.sample_rate = NOISE, RATE
    ledger.accountant.history = [(NOISE, RATE, 40)]  # already spent: a resumed run
    target = epsilon(accountant, [(NOISE, RATE, 317)], DELTA) + 1e-12
    total = ledger.steps_within(target, limit=5_000)
    assert total == 317  # the exact maximum, spent steps included
    assert epsilon(accountant, [(NOISE, RATE, total + 1)], DELTA) > target
    assert ledger.steps_within(target, limit=200) == 200  # every step up to the limit fits
    assert ledger.steps_within(epsilon(accountant, [(NOISE, RATE, 10)], DELTA), limit=500) == 40  # already past


def test_the_dataset_look_ahead_is_the_same_search_at_most_a_thousandth_below_exact():
    kwargs = dict(noise_multiplier=NOISE, sample_rate=RATE, delta=DELTA, accountant="rdp", limit=200_000)
    target = epsilon("rdp", [(NOISE, RATE, 123_457)], DELTA) + 1e-12
    exact = budget.search_steps([], target_epsilon=target, **kwargs)
    approx = budget.steps_within([], target_epsilon=target, **kwargs)
    assert exact == 123_457
    assert exact * 0.999 <= approx <= exact


def test_one_history_alias():
    defined = [
        path
        for path, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "History" for t in node.targets)
    ]
    assert defined == ["aisec_train/privacy/accounting.py"]


# --- the one writer ---------------------------------------------------------------------------------------------


def _measured(epsilon_: float, target: float | None, gaps: list[str] | None = None) -> Measured:
    figures = dict(epsilon=epsilon_, delta=DELTA, noise_multiplier=NOISE, sample_rate=RATE, steps=9, accountant="prv")
    return Measured(figures, "dpsgd", target, "the figures", details={"level": "record"}, gaps=gaps or [])


def _item(report: Report) -> dict:
    return next(c for c in report.checklist if c["item"] == ITEM[1])


def _report() -> Report:
    report = Report()
    report.stage = "train"
    return report


def test_no_dp_writes_every_figure_as_null_and_fails_the_item():
    report = _report()
    write(report, None)
    assert report.sections["privacy"] == {**dict.fromkeys(["epsilon", "delta", "noise_multiplier", "sample_rate",
                                                           "steps", "accountant"]), "mode": "none"}  # fmt: skip
    assert _item(report)["status"] == "fail"


@pytest.mark.parametrize(("eps", "gaps", "status"), [(0.9, [], "pass"), (1.5, [], "fail"), (0.9, ["seeded"], "fail")])
def test_the_item_passes_only_within_the_target_with_no_gap(eps, gaps, status):
    report = _report()
    write(report, _measured(eps, 1.0, gaps))
    assert _item(report)["status"] == status
    privacy = report.sections["privacy"]
    assert privacy["epsilon"] == eps and privacy["mode"] == "dpsgd" and privacy["level"] == "record"
    assert privacy["guarantee"] == {"holds": not gaps, "gaps": gaps}
    assert ("NO DP guarantee holds" in _item(report)["evidence"]) == bool(gaps)


def test_a_dp_report_names_what_it_releases_without_noise_and_a_non_dp_report_does_not():
    """The training curves, data counts and audit figures come from the training records without noise; the
    epsilon must not seem to cover them (report.json ``privacy.not_covered``, and the model card's limitations)."""
    from aisec_train.report.outputs import model_card

    report = _report()
    write(report, _measured(0.9, 1.0, []))
    not_covered = report.sections["privacy"]["not_covered"]
    assert any("metrics.csv" in item for item in not_covered) and any("membership" in item for item in not_covered)
    assert "privacy.not_covered" in model_card(report)
    plain = _report()
    write(plain, None)
    assert "not_covered" not in plain.sections["privacy"] and "privacy.not_covered" not in model_card(plain)


def test_the_records_spend_across_runs_is_stated_whenever_a_dataset_ledger_was_charged():
    report = _report()
    report.add("privacy", budget={"dataset_epsilon": 2.5, "dataset_runs": 3, "dataset_target_epsilon": 8.0})
    write(report, _measured(0.9, 1.0))
    assert (
        "the records' composed spend across 3 run(s): epsilon 2.500 of the dataset's target 8.0"
        in _item(report)["evidence"]
    )


def test_only_the_privacy_package_writes_the_privacy_figures_or_answers_the_dp_item():
    """The central, data-parallel and federated trainers hand what they measured to privacy/report.py."""
    writers = set()
    for path, tree in _trees().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            name = getattr(node.func, "attr", None)
            adds = name == "add" and isinstance(first, ast.Constant) and first.value == "privacy"
            if adds and {k.arg for k in node.keywords} & {"epsilon", "mode", "guarantee", "randomness"}:
                writers.add(path)
            if name == "check" and any(isinstance(a, ast.Constant) and a.value == ITEM[1] for a in node.args):
                writers.add(path)
    assert writers <= {"aisec_train/privacy/report.py"}, writers


# --- the Opacus behaviour the package relies on -----------------------------------------------------------------


def test_make_private_builds_model_and_optimizer_through_the_two_methods_the_bk_engine_overrides():
    """train/bk_engine.py overrides PrivacyEngine._prepare_model and _prepare_optimizer (private: Opacus has no
    public hook for a new grad_sample_mode). Pinned: make_private calls each once, passes grad_sample_mode and the
    clipping settings by keyword, and returns what they return."""
    calls = {}

    class Spy(PrivacyEngine):
        def _prepare_model(self, module, **kwargs):
            calls["model"] = kwargs
            calls["model_out"] = super()._prepare_model(module, **kwargs)
            return calls["model_out"]

        def _prepare_optimizer(self, **kwargs):
            calls["optimizer"] = kwargs
            calls["optimizer_out"] = super()._prepare_optimizer(**kwargs)
            return calls["optimizer_out"]

    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)), batch_size=4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, optimizer, _ = Spy(accountant="prv").make_private(
        module=model, optimizer=sgd, data_loader=loader, noise_multiplier=1.0, max_grad_norm=0.5
    )
    assert wrapped is calls["model_out"] and optimizer is calls["optimizer_out"]
    assert {"grad_sample_mode", "max_grad_norm", "batch_first", "loss_reduction"} <= set(calls["model"])
    assert calls["model"]["max_grad_norm"] == 0.5
    assert {"grad_sample_mode", "optimizer", "noise_multiplier", "max_grad_norm"} <= set(calls["optimizer"])
    for method, names in ((PrivacyEngine._prepare_model, {"module", "grad_sample_mode", "max_grad_norm"}),
                          (PrivacyEngine._prepare_optimizer, {"optimizer", "grad_sample_mode"})):  # fmt: skip
        assert names <= set(inspect.signature(method).parameters)


def test_secure_mode_noise_is_opacus_sum_of_four_draws_from_our_generator():
    """privacy/engine.py sets ``optimizer.secure_mode = True`` (the floating-point attack fix) and relies on
    Opacus drawing, from the optimizer's generator, one discarded value and then four Gaussians summed and halved."""
    param = nn.Parameter(torch.zeros(5))
    optimizer = DPOptimizer(
        torch.optim.SGD([param], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=1,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    optimizer.secure_mode = True
    param.summed_grad = torch.zeros(5)
    optimizer.add_noise()
    g = torch.Generator().manual_seed(7)
    std = 2.0 * 0.5
    torch.normal(0.0, std, size=(1, 1), generator=g)
    expected = sum(torch.normal(0.0, std, size=(5,), generator=g) for _ in range(4)) / 2
    assert torch.equal(param.grad, expected)


def test_the_wrapped_module_is_at_the_attribute_unwrap_reads():
    """privacy/engine.unwrap reads GradSampleModule._module (Opacus' to_standard_module() would remove the hooks)."""
    from aisec_train.privacy.engine import unwrap

    inner = nn.Linear(2, 2)
    wrapped = GradSampleModule(inner)
    assert wrapped._module is inner and unwrap(wrapped) is inner
