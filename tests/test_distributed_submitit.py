"""Multi-node SLURM through Hydra's submitit launcher reaches torchrun's env:// path: each task of a several-task
job is one rank, its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT derived from submitit's
JobEnvironment (train/launch.py). Real submitit: its SLURM environment parser, and its local executor running
two tasks of one job that join a gloo process group and train."""

from __future__ import annotations

import os

import pytest

from aisec_train.train.launch import ENV, adopt_submitit, rendezvous_port, under_torchrun
from tests.conftest import read_report, run_cli

SLURM_TASK = {  # task 3 of a 2-node x 2-task job, as SLURM sets it on the second node
    "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "81234", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
}  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*ENV, "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(name, "-")  # recorded, so what adopt_submitit sets is removed after the test
        monkeypatch.delenv(name)
    return monkeypatch


def test_a_slurm_task_becomes_one_rank_of_the_job(clean_env):
    for name, value in SLURM_TASK.items():
        clean_env.setenv(name, value)
    assert under_torchrun()
    got = {name: os.environ[name] for name in (*ENV, "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert got == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",  # the job's first node, from SLURM's compressed node list
        "MASTER_PORT": str(rendezvous_port("81234")),
    }  # fmt: skip
    assert 29500 <= rendezvous_port("81234") < 49500 and rendezvous_port("81234") != rendezvous_port("81235")


def test_explicit_variables_win_and_one_task_is_a_plain_job(clean_env):
    for name, value in {**SLURM_TASK, "MASTER_PORT": "12345"}.items():
        clean_env.setenv(name, value)
    adopt_submitit()
    assert os.environ["MASTER_PORT"] == "12345" and os.environ["RANK"] == "3"
    for name in (*ENV, "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        clean_env.delenv(name, raising=False)
    clean_env.setenv("SLURM_NTASKS", "1")
    assert not under_torchrun() and "RANK" not in os.environ


def test_no_variable_outlives_these_tests():
    assert "SUBMITIT_EXECUTOR" not in os.environ and "RANK" not in os.environ


@pytest.mark.slow  # a submitit job of two local tasks, each a rank that loads the data and trains: ~1 min
def test_two_submitit_tasks_train_as_one_data_parallel_job(tmp_path):
    proc = run_cli(
        "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "experiment=smoke", "train.epochs=2",
        "audit=off", "robustness.evaluate=false", "privacy.noise_multiplier=1.5", "privacy.target_epsilon=50",
        f"audit.registry_path={tmp_path / 'registry.json'}", f"hydra.sweep.dir={tmp_path}",
        env={"OMP_NUM_THREADS": "1"}, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / ".submitit").is_dir()  # the tasks really ran under submitit
    report = read_report(tmp_path / "0")
    train = report["train"]
    assert train["world_size"] == 2 and train["distributed"]["launcher"] == "submitit"
    assert train["distributed"]["backend"] == "gloo"
    digests = train["distributed"]["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
