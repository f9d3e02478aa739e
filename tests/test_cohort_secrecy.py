"""Client-level DP must not publish its cohorts (docs/federated.md, "What a client-level DP run releases").

DP-FedAvg's epsilon counts on amplification by sampling: nobody but the server may know which clients a round's
Poisson cohort drew. Before, the run released it: report.json's ``federated.per_round`` listed each round's accepted
client ids with per-client upload sizes, training times, example counts and norms, ``refused_updates`` and the
checklist named the clients, the server's log named a refused client, and ``federated/server/state.pt`` (handed to
data owners to decrypt the last aggregate) kept all of it. Now every released file carries counts only; the server
keeps the ids in memory for the round. Without client-level DP the per-client detail stays.

Fast: the strategy's saved rows and the report section on real Flower messages. Slow: two real CLI runs (Flower's
simulation engine), client-level DP and no DP, whose released files are scanned.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from aisec_train.config import to_config
from aisec_train.federated import report as fed_report
from aisec_train.federated.client_app import _plain_record
from aisec_train.federated.client_level import contribution, make_plan
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.federated.strategy import SecureFedAvg, load_state
from aisec_train.federated.task import REFUSAL_CODES, faulty_clients, flatten
from aisec_train.report.report import Report
from tests.conftest import NodeGrid, read_report, run_cli
from tests.test_config import compose_config

TEMPLATE = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
P = 16

# Keys that hold one entry per client (or name one), and text that names a client: none may appear in what a
# client-level DP run releases.
PER_CLIENT = {"clients", "client", "partition_id", "errors", "upload_bytes_per_client", "train_s_per_client",
              "examples_per_client", "update_norms", "upload_bytes_per_client_per_round"}  # fmt: skip
NAMED = re.compile(r"\bclient \d|client\(s\) \[|\(round, client\)")


def id_leaks(node, path: str = "") -> list[str]:
    """Where ``node`` (a report section, saved history rows) names a client or carries a per-client figure."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            federation_size = key == "clients" and isinstance(value, int)  # federated.clients, not a list of them
            if key in PER_CLIENT and value not in (None, [], {}) and not federation_size:
                found.append(f"{path}.{key}")
            elif key in ("accepted", "refused") and isinstance(value, list):
                found.append(f"{path}.{key}={value}")
            found += id_leaks(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += id_leaks(value, f"{path}[{i}]")
    elif isinstance(node, str) and NAMED.search(node):
        found.append(f"{path}: {node[:120]}")
    return found


def _fed(dp: bool):
    overrides = ["federated=fedavg", "privacy=none", "federated.clients=4", "federated.fraction_train=1.0",
                 "federated.min_clients=1", "federated.inject.scale=[0]"]  # fmt: skip
    overrides += ["federated.dp=client"] if dp else []
    return to_config(compose_config(*overrides))


def _round(tmp_path: Path, dp: bool, on_round=None) -> SecureFedAvg:
    """One plaintext round of four clients: 0 and 3 honest, 1 sends NaN (the server refuses it), 2 refuses its own
    update; the x1e4 drill names client 0 (the replies here are honest, so its update is accepted: the checklist's
    tally of drilled updates that got through)."""
    cfg = _fed(dp)
    plan = make_plan(cfg.federated) if dp else None
    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path,
                     fraction_train=1.0, dp=plan, on_round=on_round,
                     faulty=lambda rnd: faulty_clients(cfg.federated.inject, rnd))  # fmt: skip
    msgs = list(s.configure_train(1, ArrayRecord(TEMPLATE), ConfigRecord({}), NodeGrid(4, first=100)))
    base = flatten(TEMPLATE)
    replies = []
    for pid, msg in enumerate(msgs):
        delta = np.full(P, 0.01)
        if plan is not None:
            vector = contribution(delta, base, plan, cohort=len(msgs), clip_norm=plan.clip_norm,
                                  rng=np.random.default_rng(pid))[0]  # fmt: skip
        else:
            vector = base + delta
        vector[0] = np.nan if pid == 1 else vector[0]  # a client that skips its own check
        n = 1 if dp else 10
        metrics = {"partition-id": pid, "num-examples": n, "refused": 0, "upload-bytes": 1, "train-s": 0.5 + pid}
        arrays = _plain_record(vector, TEMPLATE)
        if pid == 2:
            metrics["refused"], arrays = REFUSAL_CODES["norm"], ArrayRecord()
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg))
    s.aggregate_train(1, replies)
    s.aggregate_evaluate(1, [])
    return s


@pytest.mark.usefixtures("server_identity")
def test_under_client_level_dp_the_saved_round_holds_counts_and_the_server_keeps_the_ids_in_memory(tmp_path, caplog):
    seen = []
    with caplog.at_level(logging.WARNING, logger="aisec_train.federated"):
        s = _round(tmp_path, dp=True, on_round=lambda row, eps, sec: seen.append(row))
    assert s.history[-1]["accepted"] == [0, 3]  # the server's own memory: what it screens and tallies with
    (saved,) = load_state(tmp_path)["history"]
    assert id_leaks(saved) == [], saved
    assert saved["sampled"] == 4 and saved["accepted"] == 2 and saved["refused"] == 2 and saved["dropped"] == 0
    assert saved["refused_reasons"] == {"nan (by server)": 1, "norm (by client)": 1}
    assert saved["faulty_accepted"] == 1 and saved["uploads"] == 3
    assert id_leaks(seen) == []  # the trackers' per-round hook gets the same counts
    assert "refused an update (nan)" in caplog.text and not NAMED.search(caplog.text)


@pytest.mark.usefixtures("server_identity")
def test_without_client_level_dp_the_saved_round_keeps_every_clients_detail(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aisec_train.federated"):
        _round(tmp_path, dp=False)
    (saved,) = load_state(tmp_path)["history"]
    assert saved["accepted"] == [0, 3] and {(x["client"], x["reason"]) for x in saved["refused"]} == {
        (1, "nan"),
        (2, "norm"),
    }
    assert set(saved["update_norms"]) == {"0", "1", "3"} and "client 1's update" in caplog.text


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("dp", [True, False])
def test_the_report_section_and_checklist_name_no_client_under_client_level_dp(tmp_path, dp):
    """The report is built from the saved rows; under client-level DP it also turns rows saved with ids (a state
    written before this fix, resumed) into counts."""
    s = _round(tmp_path / "state", dp=dp)
    cfg = _fed(dp)
    report = Report()
    run = fed_report.ReportInputs(cfg, report, tmp_path, torch.nn.Linear(4, 3), "standard", None)
    state = {"round": 1, "history": s.history}  # the in-memory rows: ids included, as a pre-fix state.pt held them
    fed_report.add(run, state, {}, resumed_from=0, seconds=1.0, private=False, server=ServerSettings("", ""),
                   client=ClientSettings("", ""), transport="in-process", client_level=dp)  # fmt: skip
    leaks = id_leaks(report.sections["federated"]) + id_leaks(report.checklist)
    if dp:
        assert leaks == []
        row = report.sections["federated"]["per_round"][0]
        assert (row["sampled"], row["accepted"], row["refused"], row["faulty_accepted"]) == (4, 2, 2, 1)
        checks = {c["item"]: c for c in report.checklist}
        corrupt = checks["poisoned or corrupt client updates refused (NaN/inf, norm bound)"]
        assert corrupt["status"] == "fail" and "(round, updates): [(1, 1)]" in corrupt["evidence"]
    else:
        assert any("per_round[0].accepted=[0, 3]" in x for x in leaks)
        assert any("(round, client): [(1, 0)]" in x for x in leaks)


# ---- the real command line: every released file scanned --------------------------------------------------------
RUN = (
    "federated=fedavg", "privacy=none", "dataset=synthetic", "dataset.n_samples=400", "audit=off",
    "robustness.evaluate=false", "federated.clients=4", "federated.fraction_train=1.0", "federated.min_clients=1",
    "federated.rounds=2", "federated.local_epochs=1", "federated.ray_num_cpus=2", "logger=[csv]",
    # round 1: client 1's update goes NaN (it refuses it), client 2's x1e4 (refused without DP; clipped under
    # dp=client and accepted: the checklist's tally); everyone is sampled (q = 1), so each run has the same rounds
    "federated.inject.nan=[1]", "federated.inject.scale=[2]", "federated.inject.round=1",
)  # fmt: skip
RELEASED = ("report.json", "model_card.md", "security_report.md", "metrics.csv", "cli.log", "tracking/metrics.csv",
            "tracking/params.json")  # fmt: skip


def _run(tmp_path_factory, *extra: str) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("cohort") / "run"
    proc = run_cli(*RUN, *extra, f"hydra.run.dir={run_dir}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, read_report(run_dir)


@pytest.fixture(scope="module")
def client_level(tmp_path_factory):
    return _run(tmp_path_factory, "federated.dp=client")


@pytest.fixture(scope="module")
def no_dp(tmp_path_factory):
    return _run(tmp_path_factory, "federated.dp=none")


def _released_leaks(run_dir: Path, report: dict) -> list[str]:
    leaks = id_leaks(report["federated"], "federated") + id_leaks(report["checklist"], "checklist")
    for name in RELEASED:
        for line in (run_dir / name).read_text().splitlines():
            if NAMED.search(line):
                leaks.append(f"{name}: {line[:160]}")
    registry = json.loads(Path(os.environ["AISEC_TRAIN_REGISTRY"]).read_text())
    entry = next(r for r in registry["runs"] if r["run_dir"] == str(run_dir))
    leaks += id_leaks(entry, "registry")
    leaks += id_leaks(load_state(run_dir / "federated" / "server")["history"], "state.pt")
    return leaks


@pytest.mark.slow  # a real Flower simulation, 4 clients, 2 rounds: ~45 s
def test_a_client_level_dp_run_releases_cohort_counts_and_no_client_ids(client_level):
    run_dir, report = client_level
    assert report["privacy"]["level"] == "client"
    assert _released_leaks(run_dir, report) == []
    first = report["federated"]["per_round"][0]
    assert (first["sampled"], first["accepted"], first["refused"], first["dropped"]) == (4, 3, 1, 0)
    assert first["refused_reasons"] == {"nan (by client)": 1} and first["faulty_accepted"] == 1
    assert report["federated"]["sampling"]["cohort_per_round"] == [4, 4]
    checks = {c["item"]: c for c in report["checklist"]}
    assert (
        "(round, updates): [(1, 1)]"
        in checks["poisoned or corrupt client updates refused (NaN/inf, norm bound)"]["evidence"]
    )
    # what is still not covered is said, and the run's own report no longer claims the cohorts are in per_round
    (entry,) = [x for x in report["privacy"]["not_covered"] if "cohort" in x]
    assert "counts only" in entry and "client_state/client_<id>/state.pt" in entry


@pytest.mark.slow  # a real Flower simulation, 4 clients, 2 rounds: ~45 s
def test_a_run_without_dp_keeps_each_clients_detail(no_dp):
    run_dir, report = no_dp
    leaks = _released_leaks(run_dir, report)
    assert any(x.startswith("federated.per_round[0].accepted=[") for x in leaks), leaks
    assert any("update_norms" in x for x in leaks) and any("refused_updates[0].client" in x for x in leaks)
    assert any(x.startswith("checklist") for x in leaks) and any(x.startswith("state.pt") for x in leaks)
