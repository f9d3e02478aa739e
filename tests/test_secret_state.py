"""What a DP run's files reveal about its secret randomness (docs/privacy.md, "What the randomness protects against").

The adversary knows the code, the config, the seed and every file the run writes; from them it must not recover the
DP noise or the Poisson batch draws, nor any function of them the accountant does not cover. The basics (where the
generators come from, two runs differ) are in tests/test_secret_noise.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aisec_train.config import to_config
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.federated import client_level, report_scale
from aisec_train.federated.settings import ServerSettings
from aisec_train.models import build_model
from aisec_train.privacy.report import write
from aisec_train.report.report import Report
from aisec_train.train.config import Accountant, GradSampleMode, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import train
from tests.test_config import compose_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset(DatasetConfig(name="synthetic", n_samples=200), seed=0).train


def checkpoints(data, *, epochs=1, resume=None, **privacy) -> list[dict]:
    """The payloads a run hands its checkpoint writer (what ``checkpoints/last.pt`` holds), epoch by epoch."""
    privacy = {"noise_multiplier": 1.0, "target_epsilon": None, "accountant": Accountant.rdp,
               "grad_sample_mode": GradSampleMode.hooks, **privacy}  # fmt: skip
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    cfg = TrainConfig(epochs=epochs, batch_size=32, max_physical_batch_size=64, lr=0.5, seed=0, augmult=2)
    saved: list[dict] = []
    train(model, data, train_cfg=cfg, privacy_cfg=PrivacyConfig(**privacy), device=CPU, resume=resume,
          persist=saved.append, progress=False)  # fmt: skip
    return saved


def test_a_dp_checkpoint_holds_no_generator_state_that_counts_the_secret_batches(data):
    # augmult's views (like dataset.augment and dropout) draw from the global generator per record loaded, so its
    # live state after an epoch counted the records the secret Poisson draws had put in batches: stepping MT19937
    # from the seed's public state to the checkpoint's gave their exact sum (1383 and 1433 in two digits runs).
    first, second = checkpoints(data, epochs=2), checkpoints(data, epochs=2)
    weights = [list(run[-1]["model"].values())[0] for run in (first, second)]
    assert not torch.equal(*weights)  # the noise differs
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["rng"], b["rng"])  # the same seed and epoch: the same public state, whatever was drawn
    assert not torch.equal(first[0]["rng"], first[1]["rng"])  # a resume at another epoch continues another stream
    resumed = checkpoints(data, epochs=2, resume=first[0])  # and it resumes from it
    assert [row["epoch"] for row in resumed[-1]["history"]] == [1, 2]


def test_without_dp_the_checkpoint_keeps_the_live_stream(data):
    # nothing secret drew from it, and a plain run's resume replays its augmentation exactly as before
    runs = [checkpoints(data, mode=PrivacyMode.none)[-1] for _ in range(2)]
    assert torch.equal(runs[0]["rng"], runs[1]["rng"])
    assert not torch.equal(runs[0]["rng"], torch.Generator().manual_seed(1).get_state())


# ---- client-level DP: the run folder names every round's Poisson cohort ---------------------------------------
def test_a_client_level_dp_report_says_its_files_name_the_secret_cohorts(tmp_path):
    # DP-FedAvg's epsilon counts on amplification by sampling (nobody knows whether a client was drawn), yet
    # report.json's federated.per_round lists each round's accepted clients (and the server's and clients' state
    # folders keep them): the report listed only the central run's uncovered files, so the epsilon seemed to hold
    # against every reader of the run folder.
    overrides = ["privacy=none", "federated=fedavg", "federated.dp=client", "federated.fraction_train=0.5",
                 "federated.client_dp.noise_multiplier=1.0"]  # fmt: skip
    cfg = to_config(compose_config(*overrides))
    report = Report()
    server = ServerSettings(job="", state_dir=str(tmp_path))
    measured = report_scale._client_measured(SimpleNamespace(cfg=cfg, report=report),
                                             client_level.make_plan(cfg.federated), server, None, None)  # fmt: skip
    write(report, measured)
    uncovered = report.get("privacy.not_covered")
    assert any("cohort" in item and "federated.per_round" in item and "state.pt" in item for item in uncovered)
    assert any("metrics.csv" in item for item in uncovered)  # the central list stays
