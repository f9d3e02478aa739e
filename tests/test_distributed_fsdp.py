"""train.distributed.strategy=fsdp: FSDP2 through Opacus' wrapper and ghost_fsdp clipping, 2 real processes
(torch's elastic launcher, gloo on the CPU) through the CLI; what Opacus' FSDP2 path cannot run is refused."""

from __future__ import annotations

import csv
import math

import pytest
from opacus.accountants import create_accountant

from aisec_train.errors import ConfigError
from aisec_train.models import build_model
from aisec_train.train import checkpoint
from aisec_train.train.distributed import weights_digest
from tests.conftest import read_report, run_cli

FSDP = ["experiment=smoke", "audit=off", "robustness.evaluate=false", "train.distributed.nproc=2"]
FSDP += ["train.distributed.strategy=fsdp", "privacy.noise_multiplier=1.5", "privacy.target_epsilon=50"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    proc = run_cli(*FSDP, "train.epochs=2", f"hydra.run.dir={run_dir}", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # two processes, each gathering shards every forward pass: ~40 s on 2 idle cores
def test_sharded_dp_run_is_one_mechanism_and_one_model(sharded_run):
    report = read_report(sharded_run)
    train, privacy = report["train"], report["privacy"]
    assert train["world_size"] == 2 and train["distributed"]["strategy"] == "fsdp"
    assert privacy["grad_sample_mode"] == "ghost_fsdp"  # Opacus' sharded ghost clipping ran, not a replica
    full = train["distributed"]["rank_weights_sha256"]
    shards = train["distributed"]["rank_shard_sha256"]
    assert full[0] == full[1] and shards[0] != shards[1]  # each rank held its own slice of one model
    n_train, batch = report["data"]["n_train"], 512
    assert privacy["sample_rate"] == pytest.approx(1 / math.ceil(n_train / batch))  # the global batch
    assert privacy["steps"] == 2 * math.ceil(n_train / batch)
    accountant = create_accountant("prv")
    for _ in range(privacy["steps"]):
        accountant.step(noise_multiplier=privacy["noise_multiplier"], sample_rate=privacy["sample_rate"])
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=privacy["delta"]), rel=1e-9)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    model.load_state_dict(checkpoint.load(sharded_run / "model.pt", report["model"]["sha256"]))
    assert weights_digest(model) == full[0]  # rank 0 wrote the gathered full model
    with (sharded_run / "metrics.csv").open() as stream:
        last = list(csv.DictReader(stream))[-1]
    assert float(last["train_accuracy"]) > 0.2  # the sharded model learned (chance 0.1; the EMA lags 6 steps)


@pytest.mark.slow  # a second sharded job on the same run directory
def test_sharded_resume_continues_from_the_gathered_checkpoint(sharded_run):
    before = read_report(sharded_run)["privacy"]
    proc = run_cli(*FSDP, "train.epochs=3", f"hydra.run.dir={sharded_run}", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(sharded_run)
    assert report["train"]["resumed_from_epoch"] == 2
    assert report["privacy"]["steps"] == before["steps"] + before["steps"] // 2
    digests = report["train"]["distributed"]["rank_weights_sha256"]
    assert digests[0] == digests[1]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["privacy.grad_sample_mode=hooks"], r"^privacy.grad_sample_mode='hooks' is not allowed: .*ghost norms only"),
        (["robustness=trades"], r"^robustness='trades' is not allowed: .*ghost clipping norms each forward"),
        (["train.augmult=2", "privacy.grad_sample_mode=hooks"], r"^privacy.grad_sample_mode='hooks' is not allo"),
        (["train.max_physical_batch_size=64"], r"^train.max_physical_batch_size=64 is not allowed: must be >= "),
        (["train.distributed.nproc=1"], r"^train.distributed.nproc=1 is not allowed: must be >= 2 with"),
        (["train.distributed.strategy=zero3"], r"^train.distributed.strategy='zero3' is not allowed: must be ddp"),
    ],
)
def test_what_opacus_fsdp_cannot_run_is_refused_in_one_line(overrides, expected, monkeypatch):
    from aisec_train import compose

    monkeypatch.delenv("RANK", raising=False)  # not under torchrun
    with pytest.raises(ConfigError, match=expected) as refused:
        compose([*FSDP, *overrides])
    assert "\n" not in str(refused.value)


def test_the_refusal_reaches_the_cli_before_any_work(tmp_path):
    proc = run_cli(*FSDP, "privacy.grad_sample_mode=hooks", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "privacy.grad_sample_mode='hooks' is not allowed" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_plain_ddp_still_composes():
    from aisec_train import compose

    assert compose(["train.distributed.nproc=2"]).train.distributed.strategy == "ddp"
