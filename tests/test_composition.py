"""Honest composition (issue 10): every pair of config-group options either runs a smoke-sized job through the
real pipeline, or is refused in one line before any work; and no report claims a control that did not run.

The options are walked pairwise (a greedy all-pairs covering of the groups below); the full walk is marked slow,
and a few rows that exercise the riskiest compositions (federated clients with adversarial training and with
poisoned shards, TRADES under DP, a timm model under DP) run in the default test run.
"""

from __future__ import annotations

import itertools

import pytest

import aisec_train
from aisec_train.cli import refusals

# The widest and costliest groups first: the greedy walk then needs fewer rows (16) and fewer federated ones (9).
GROUPS: dict[str, list[str]] = {
    "federated": ["none", "fedavg", "fedavg_he"],
    "model": ["cnn", "mlp", "resnet18_gn", "timm"],
    "robustness": ["none", "pgd_at", "fgsm_rs", "trades"],
    "dataset": ["digits", "custom"],
    "optimizer": ["sgd", "adam"],
    "scheduler": ["none", "cosine"],
    "privacy": ["dpsgd", "none"],
    "backdoor": ["none", "badnets"],
    "audit": ["default", "off"],
}
SMOKE = [
    "train.epochs=1", "train.batch_size=128", "robustness.eval_samples=16", "robustness.attack.steps=2",
    "robustness.attack.restarts=1", "robustness.steps=2", "audit.membership.reference_models=1",
    "audit.membership.targets=20", "audit.membership.reference_epochs=1", "audit.extraction.seeds=1",
    "audit.extraction.queries=20", "audit.extraction.surrogate_epochs=1", "audit.extraction.eval_samples=16",
    "backdoor.finetune_epochs=1", "federated.clients=2", "federated.rounds=1", "federated.local_epochs=1",
]  # fmt: skip
OPTION_OVERRIDES = {
    ("dataset", "custom"): ["dataset.train._target_=tests.userland.Stripes", "+dataset.train.n=200"],
    # timm's own 0.37M-parameter test ResNet: BatchNorm made DP-trainable like any zoo ResNet, at 1/30 of resnet18's
    # weights (a CKKS row encrypts every one of them); tests/test_models.py builds resnet18 itself with the DP fix.
    ("model", "timm"): ["model.arch=test_resnet"],
    # The same ResNet-18 GroupNorm architecture at width 8: 0.17M weights instead of 11M (what the pairs test is how
    # the preset composes, not what 11M weights learn on 1437 digits).
    ("model", "resnet18_gn"): ["+model.width=8"],
    # train.epochs=3: a federated run trains its rounds, so its report must not plan train.epochs (it did)
    ("federated", "fedavg"): ["federated.batch_size=64", "train.epochs=3"],
    ("federated", "fedavg_he"): ["federated.batch_size=64", "train.epochs=3"],
}


def all_pairs(groups: dict[str, list[str]]) -> list[dict[str, str]]:
    """A small set of rows in which every pair of options of two different groups appears at least once."""
    names = list(groups)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in groups[a] for y in groups[b]}
    rows: list[dict[str, str]] = []
    while uncovered:
        row: dict[str, str] = {}
        for name in names:  # greedy: the option covering most uncovered pairs with what the row holds so far
            row[name] = max(
                groups[name], key=lambda option, name=name, row=row, todo=uncovered: _gain(row, name, option, todo)
            )
        uncovered -= {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}
        rows.append(row)
    return rows


# Relative cost of the options that start Ray, encrypt or audit: between options that cover as many pairs now and
# later, the cheaper one fills the row (6 of the 16 rows audit; cost-blind, the walk audited in 16 of 21 rows).
COST = {
    ("federated", "fedavg"): 3, ("federated", "fedavg_he"): 4, ("audit", "default"): 2, ("backdoor", "badnets"): 1,
    ("model", "resnet18_gn"): 1, ("model", "timm"): 1, ("robustness", "pgd_at"): 0.5, ("robustness", "trades"): 0.5,
}  # fmt: skip


def _gain(row: dict[str, str], name: str, option: str, uncovered: set) -> float:
    now = sum(((k, v), (name, option)) in uncovered for k, v in row.items())
    later = sum(1 for pair in uncovered if (name, option) in pair)
    return now + 1e-3 * later - 1e-4 * COST.get((name, option), 0)  # the cost term only breaks ties


ROWS = all_pairs(GROUPS)
FAST = [
    {**ROWS[0], "dataset": "digits", "model": "cnn", "federated": "fedavg", "robustness": "pgd_at", "backdoor": "none",
     "privacy": "dpsgd", "audit": "off"},
    {**ROWS[0], "dataset": "digits", "model": "cnn", "federated": "fedavg", "robustness": "none", "backdoor": "badnets",
     "privacy": "none", "audit": "off"},
]  # fmt: skip
SLOW = [
    {**ROWS[0], "dataset": "custom", "model": "timm", "federated": "none", "robustness": "trades", "backdoor": "none",
     "privacy": "dpsgd", "audit": "off"},
]  # fmt: skip


def overrides_for(row: dict[str, str]) -> list[str]:
    out = [f"{group}={option}" for group, option in row.items()] + SMOKE
    for item in row.items():
        out += OPTION_OVERRIDES.get(item, [])
    if row["backdoor"] == "badnets" and row["federated"] != "none":
        out.append("backdoor.malicious_clients=1")  # the federated red team: one client holds poisoned shards
    return out


def run_row(row: dict[str, str], tmp_path) -> None:
    try:
        cfg = aisec_train.compose(overrides_for(row))
        report = aisec_train.run(cfg, run_dir=tmp_path / "run")
    except refusals() as err:  # refused: one line, before anything was written
        assert "\n" not in str(err).strip() and not (tmp_path / "run" / "report.json").exists(), str(err)
        return
    assert_honest(row, report.to_dict())


def assert_honest(row: dict[str, str], report: dict) -> None:
    """What the report claims must be what ran."""
    checks = {c["item"]: c["status"] for c in report["checklist"]}
    objective = {"none": "standard"}.get(row["robustness"], row["robustness"])
    assert report["train"]["objective"] == objective
    if row["federated"] != "none":
        assert report["train"]["trainer"] == "federated"
        # its history rows are rounds: the plan is the rounds, not train.epochs (it said 40 before)
        assert report["train"]["epochs_planned"] == report["federated"]["rounds_planned"] == 1
        assert report["federated"]["local_objective"] == objective  # every client trained with it
        assert report["federated"]["aggregation"] == ("ckks" if row["federated"] == "fedavg_he" else "plaintext")
    if row["privacy"] == "none":
        assert report["privacy"]["epsilon"] is None
        assert checks["differentially private training (DP-SGD)"] == "fail"
    else:
        assert report["privacy"]["epsilon"] is not None and report["privacy"]["epsilon"] <= 3.0 + 1e-9
    if row["backdoor"] == "badnets":
        assert report["backdoor"]["enabled"] and report["backdoor"]["n_poisoned"] > 0
        assert report["backdoor"]["asr_before"] is not None
    else:
        assert not report["backdoor"]["enabled"]
        assert checks["pruning against poisoning (Fine-Pruning)"] == "not_applicable"
    if row["audit"] == "off":
        assert checks["membership-inference audit"] == "not_applicable" and report["audit"]["membership"] is None
    else:
        assert report["audit"]["membership"]["auc"] is not None
    assert all(c["evidence"] for c in report["checklist"])


@pytest.mark.parametrize(
    "row",
    [*FAST, *(pytest.param(r, marks=pytest.mark.slow) for r in SLOW)],
    ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if k != "audit"),
)
def test_risky_compositions_run_as_reported(row, tmp_path):
    run_row(row, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(r.values()))
def test_every_pair_of_group_options_runs_or_is_refused(row, tmp_path):
    run_row(row, tmp_path)


def test_the_walk_covers_every_pair():
    for (a, xs), (b, ys) in itertools.combinations(GROUPS.items(), 2):
        for x, y in itertools.product(xs, ys):
            assert any(r[a] == x and r[b] == y for r in ROWS), (a, x, b, y)
    assert len(ROWS) <= 24  # a covering array, not the 2*4*2*2*2*4*2*3*2 product
