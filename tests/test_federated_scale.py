"""Federated training at scale through the real command line on Flower's simulation engine (Ray).

Run A (default suite): 100 clients on tiny data, Dirichlet(0.5), 10% Poisson-sampled per round, CKKS with a
fresh key every round, client-level DP with adaptive clipping, and PGD adversarial training on every client.
Run B (slow): the plaintext path against the backdoor red team with Krum, on the partition it poisoned.
"""

from __future__ import annotations

import stat

import numpy as np
import pytest

from aisec_train.federated.client_dp import poisson_sample
from aisec_train.federated.partition import load_client_indices
from tests.conftest import read_report, run_cli

SCALE = (
    "experiment=federated_scale",
    "dataset=synthetic",
    "dataset.n_samples=1500",
    "audit=off",
    "robustness=pgd_at",
    "robustness.evaluate=false",
    "privacy=none",
    "federated.dp=client",
    "federated.rounds=2",
    "federated.local_epochs=1",
    "federated.ray_num_cpus=2",
    "federated.ckks.rotate_every=1",
    "federated.client_dp.adaptive=true",
)


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fedscale") / "run"
    proc = run_cli(*SCALE, f"hydra.run.dir={run_dir}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, read_report(run_dir)


def test_hundred_clients_sampled_per_round_with_their_partition_recorded(scale_run):
    run_dir, report = scale_run
    fed = report["federated"]
    assert fed["clients"] == 100 and fed["rounds"] == 2 and fed["aggregation"] == "ckks"
    part = fed["partition"]
    assert part["kind"] == "dirichlet" and part["alpha"] == 0.5 and len(part["label_histograms"]) == 100
    assert [sum(h) for h in part["label_histograms"]] == part["sizes"] and min(part["sizes"]) >= 2
    assert len(set(part["classes_per_client"])) > 1  # label skew: clients see different numbers of classes
    saved = load_client_indices(run_dir / "federated" / "partition.npz", 42)
    assert len(saved) == part["sizes"][42]
    # Poisson sampling at 0.1: a handful of clients per round, only they uploaded, each <= 40 bytes/param.
    cohorts = fed["sampling"]["cohort_per_round"]
    assert fed["sampling"]["sampler"].startswith("poisson") and all(1 <= c <= 25 for c in cohorts)
    assert fed["sampling"]["sampler"] == "poisson (each client independently, OS entropy)"
    for row, cohort in zip(fed["per_round"], cohorts, strict=True):
        # client-level DP: the report counts the cohort, never names it (tests/test_cohort_secrecy.py)
        assert row["uploads"] == row["accepted"] <= cohort
        assert not row["uploads"] or row["upload_bytes"] / row["uploads"] / fed["num_params"] <= 40
        assert row["evaluated_clients"] == 10  # fraction_evaluate 0.1
    assert fed["bytes_per_param"] <= 40 and fed["local_objective"] == "pgd_at"
    # Under client-level DP the cohorts come from OS entropy: the seed does not replay them (issue 20). Only the
    # clients' own state folders say who trained (drawn over partition ids, not Flower's random node ids).
    trained = {int(p.name.removeprefix("client_")) for p in (run_dir / "client_state").iterdir()}
    seeded = set().union(*(poisson_sample(range(100), 0.1, np.random.default_rng([0, r])) for r in (1, 2)))
    assert trained <= set(range(100)) and trained != seeded


def test_client_level_privacy_is_accounted_by_the_sampler_and_stated_in_plain_words(scale_run):
    run_dir, report = scale_run
    privacy = report["privacy"]
    assert privacy["level"] == "client" and privacy["mode"] == "dp-fedavg"
    assert privacy["steps"] == 2 and privacy["rounds_charged"] == [1, 2] and privacy["sample_rate"] == 0.1
    assert 0 < privacy["epsilon"] <= 3.0 + 1e-9 and privacy["accountant"] == "rdp"
    assert privacy["adaptive_clipping"] and privacy["clip_norm_final"] != pytest.approx(privacy["clip_norm"])
    assert privacy["randomness"]["noise"] == privacy["randomness"]["sampling"] == "os_entropy"
    assert privacy["guarantee"] == {"holds": True, "gaps": []}
    card = (run_dir / "model_card.md").read_text()
    assert "adding or removing all the data of any one client" in card
    # No client's figures reach the report (the server enforces counts of 1: tests/test_federated_server_trust.py).
    for row in report["federated"]["per_round"]:
        assert isinstance(row["accepted"], int) and "examples_per_client" not in row
    checks = {c["item"]: c for c in report["checklist"]}
    assert checks["differentially private training (DP-SGD)"]["status"] == "pass"
    assert "client-level" in checks["differentially private training (DP-SGD)"]["evidence"]


def test_keys_rotate_every_round_and_the_report_states_single_key_custody(scale_run):
    run_dir, report = scale_run
    custody = report["federated"]["key_custody"]
    assert custody["rotate_every"] == 1 and custody["epochs"] == 2 and custody["retired_epochs"] == [0]
    assert "colluding with the server can decrypt every client's individual update" in custody["threat"]
    client_root, server_root = run_dir / "client_keys", run_dir / "federated" / "server" / "keys"
    assert not (client_root / "epoch_00000" / "ckks_secret.ctx").exists()  # retired after the run
    secret = client_root / "epoch_00001" / "ckks_secret.ctx"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    ids = {(server_root / f"epoch_0000{e}" / "key_id").read_text() for e in (0, 1)}
    assert len(ids) == 2  # two epochs, two keys
    assert not list(server_root.rglob("*secret*"))
    # Under CKKS, the defences that read single updates are listed as impossible, not implied.
    table = report["federated"]["defences_on_ciphertexts"]
    assert {k for k, v in table.items() if not v["runs_on_ciphertexts"]} == {
        "median",
        "trimmed_mean",
        "krum",
        "norm_bound",
    }
    checks = {c["item"]: c for c in report["checklist"]}
    assert checks["no single key holder can decrypt individual updates (key custody)"]["status"] == "fail"
    assert checks["robust aggregation against malicious clients"]["status"] == "fail"
    assert np.isfinite(report["metrics"]["clean_accuracy"])


@pytest.mark.slow
def test_plaintext_krum_against_malicious_clients_on_the_partition_they_poisoned(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "federated=fedavg", "dataset=synthetic", "dataset.n_samples=800", "backdoor=badnets",
        "backdoor.malicious_clients=2", "robustness=pgd_at", "robustness.evaluate=false", "audit=off",
        # Krum holds f=2 malicious clients only with n >= 2f + 3 = 7 updates (the checklist's criterion)
        "federated.defence.name=krum", "federated.defence.num_malicious=2", "federated.clients=7",
        "federated.rounds=1", "federated.local_epochs=1",
        "federated.ray_num_cpus=2", f"hydra.run.dir={run_dir}", timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    fed = report["federated"]
    assert fed["defence"]["name"] == "krum" and fed["defence"]["verifiable_by_server"]
    assert "poisoned" in fed["partition"]["source"] and fed["local_objective"] == "pgd_at"
    row = fed["per_round"][0]
    assert row["accepted"] == list(range(7)) and set(row["update_norms"]) == {str(i) for i in range(7)}
    assert report["privacy"]["level"] == "record"
    checks = {c["item"]: c["status"] for c in report["checklist"]}
    assert checks["robust aggregation against malicious clients"] == "pass"
