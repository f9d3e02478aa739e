"""Data-parallel DP training: 2 real processes (torch.distributed, gloo on the CPU) through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import create_accountant

from aisec_train.models import build_model
from aisec_train.train import checkpoint
from aisec_train.train.distributed import weights_digest
from tests.conftest import read_report, run_cli

# An explicit noise multiplier with a loose target, so that the resume below has budget left to spend.
FAST = ["experiment=smoke", "audit=off", "robustness.evaluate=false", "train.distributed.nproc=2"]
FAST += ["privacy.noise_multiplier=1.5", "privacy.target_epsilon=50"]


def opacus_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = create_accountant("prv")
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = run_cli(*FAST, "train.epochs=2", "logger=csv", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_rank_zero_steps_reach_the_tracker(two_process_run):
    """The ranks run under torch's elastic launcher in other processes; rank 0's per-step values come back with
    its outcome and are logged by the job's process, once each."""
    import csv

    report = read_report(two_process_run)
    rows = list(csv.DictReader((two_process_run / "tracking" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r["key"] == "step/loss"]
    assert steps == list(range(1, report["privacy"]["steps"] + 1))
    epsilon_steps = [int(r["step"]) for r in rows if r["key"] == "step/epsilon"]  # each epoch's last step
    assert epsilon_steps == [report["privacy"]["steps"] // 2, report["privacy"]["steps"]]
    assert [int(r["step"]) for r in rows if r["key"] == "epoch/test_accuracy"] == [1, 2]
    assert report["train"]["distributed"]["launcher"] == "elastic_launch"


def test_one_ledger_for_the_whole_job(two_process_run):
    report = read_report(two_process_run)
    privacy = report["privacy"]
    assert report["train"]["world_size"] == 2 and report["train"]["distributed"]["backend"] == "gloo"
    # The sampling rate is the global batch over the whole training split, not a per-rank shard's.
    n_train, batch = report["data"]["n_train"], 512
    assert privacy["sample_rate"] == pytest.approx(1 / math.ceil(n_train / batch))
    assert privacy["steps"] == 2 * math.ceil(n_train / batch)
    expected = opacus_epsilon(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"], privacy["delta"])
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    # how the ranks clipped, as a one-process run reports it (it used to be null: the outcome dropped it)
    assert privacy["private_step"]["mode"] == privacy["grad_sample_mode"] == "ghost"


def test_replicas_agree_and_rank_zero_wrote_the_model(two_process_run):
    report = read_report(two_process_run)
    digests = report["train"]["distributed"]["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    model.load_state_dict(checkpoint.load(two_process_run / "model.pt", report["model"]["sha256"]))
    assert weights_digest(model) == digests[0]


@pytest.mark.slow  # a third 2-process job; the ledger of the first one is checked by default
def test_distributed_resume_continues_the_ledger(two_process_run):
    before = read_report(two_process_run)["privacy"]
    proc = run_cli(*FAST, "train.epochs=3", f"hydra.run.dir={two_process_run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(two_process_run)
    after = report["privacy"]
    assert report["train"]["resumed_from_epoch"] == 2
    assert after["steps"] == before["steps"] + before["steps"] // 2
    assert after["noise_multiplier"] == before["noise_multiplier"]  # the ledger's noise, not a recalibration
    expected = opacus_epsilon(after["noise_multiplier"], after["sample_rate"], after["steps"], after["delta"])
    assert after["epsilon"] == pytest.approx(expected, rel=1e-9) and after["epsilon"] > before["epsilon"]


def test_more_processes_than_gpus_is_refused_before_work(tmp_path):
    proc = run_cli(*FAST, "train.device=cuda", "train.distributed.nproc=64", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # Without CUDA the device itself is refused; with it, 64 processes on too few GPUs.
    expected = "train.distributed.nproc=64" if torch.cuda.is_available() else "train.device='cuda'"
    assert expected in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "r" / "report.json").exists() and not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_a_non_private_global_batch_the_ranks_cannot_split_evenly_is_refused(tmp_path):
    """Without DP each rank takes batch_size // nproc records a step: train.batch_size=5 on 2 ranks trained 4 a
    step (360 steps an epoch on digits, not 288) while the config said 5. Refused in one line before a step."""
    run_dir = tmp_path / "r"
    proc = run_cli("experiment=smoke", "audit=off", "robustness.evaluate=false", "train.distributed.nproc=2",
                   "privacy=none", "train.batch_size=5", "train.epochs=1", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "aisec-train: error: train.batch_size=5 is not allowed with 2 data-parallel ranks and privacy=none: each "
        "rank takes batch_size / 2 records a step, so 4 would train; allowed: a multiple of 2"
    )
    assert not (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "report.json").exists()
