"""Bad backdoor settings that only the data can judge are refused by the poison stage, before any training: a rate
that poisons no row (the run used to train and report detection recall 0.000 against 0 poisoned rows), a WaNet grid
finer than the image (silently shrunk to the image side), a target that leaves no test row to trigger (the run
trained, then failed in the defence with "cannot materialise an empty dataset")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from aisec_train import pipeline
from aisec_train.backdoor import record
from aisec_train.backdoor.config import BackdoorConfig
from aisec_train.backdoor.metrics import BackdoorMetrics, errors_to_target
from aisec_train.config import register_configs, to_config
from aisec_train.errors import ConfigError
from tests.conftest import run_cli

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poison_stage(tmp_path: Path, *overrides: str) -> pipeline.Run:
    """The pipeline's real ``data`` and ``backdoor_poison`` stages (no training)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["experiment=backdoor", "privacy=none", *overrides]))
    run = pipeline.Run(cfg=cfg, run_dir=tmp_path)
    with run.resources:
        for name, stage in pipeline.STAGES[:2]:
            run.report.stage = name
            stage(run)
    return run


def test_a_rate_that_poisons_no_row_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"backdoor.rate=0.0001 is not allowed for this data: it poisons 0 of"):
        poison_stage(tmp_path, "backdoor.rate=0.0001")
    run = poison_stage(tmp_path / "ok", "backdoor.rate=0.001")  # round(0.001 x 1149) = 1 row: a (tiny) attack
    assert len(run.backdoor.poisoned.indices) == 1


def test_a_wanet_grid_finer_than_the_image_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"backdoor.warp_grid=9 is not allowed: must be <= the image side 8"):
        poison_stage(tmp_path, "backdoor.attack=wanet", "backdoor.warp_grid=9")
    run = poison_stage(tmp_path / "ok", "backdoor.attack=wanet", "backdoor.warp_grid=8")
    assert run.backdoor.trigger.grid == 8


def test_a_target_that_leaves_no_test_row_to_trigger_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.random((120, 8, 8)).astype("float32"), y=np.arange(120) % 4)
    np.savez(tmp_path / "test.npz", x=rng.random((20, 8, 8)).astype("float32"), y=np.zeros(20, dtype=np.int64))
    data = ["dataset=npz", f"dataset.path={tmp_path / 'train.npz'}", f"dataset.test_path={tmp_path / 'test.npz'}"]
    with pytest.raises(ConfigError, match=r"backdoor.target=0 is not allowed for this data: every test row is class 0"):
        poison_stage(tmp_path / "run", *data)
    assert poison_stage(tmp_path / "ok", *data, "backdoor.target=1").backdoor is not None


@pytest.mark.slow
def test_the_cli_refuses_a_rate_that_poisons_no_row_before_training(tmp_path):
    proc = run_cli("experiment=backdoor", "privacy=none", "backdoor.rate=0.0001", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "aisec-train: error: backdoor.rate=0.0001 is not allowed for this data" in proc.stderr
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "model.pt").exists()
    assert not any((tmp_path / "checkpoints").glob("*")) if (tmp_path / "checkpoints").exists() else True


def _repair_check(tmp_path: Path, before: BackdoorMetrics, after: BackdoorMetrics) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["experiment=backdoor", "privacy=none"]))
    run = pipeline.Run(cfg=cfg, run_dir=tmp_path)
    repair = {"feature_layer": "features_out", "bake": None, "relearn": None}
    record._check_repair(run, before, after, repair, errors_to_target(after, 10))
    return next(c for c in run.report.checklist if c["item"] == "pruning against poisoning (Fine-Pruning)")


@pytest.mark.parametrize(
    ("asr_before", "acc_after", "status"),
    [
        (0.0, 0.25, "not_applicable"),  # the attack never took: nothing to repair (this used to be a "pass")
        (0.04, 0.20, "fail"),  # ... and a repair that cost 5 points of clean accuracy for nothing still fails
        (0.98, 0.25, "pass"),  # a learned backdoor removed at no cost: the only pass
    ],
)
def test_the_repair_passes_only_when_there_was_a_backdoor_to_remove(tmp_path, asr_before, acc_after, status):
    before = BackdoorMetrics(clean_accuracy=0.25, asr=asr_before, robust_accuracy=0.3, n_triggered=300)
    after = BackdoorMetrics(clean_accuracy=acc_after, asr=0.003, robust_accuracy=0.3, n_triggered=300)
    check = _repair_check(tmp_path, before, after)
    assert check["status"] == status
    assert ("did not learn the backdoor" in check["evidence"]) is (asr_before <= 0.05)


@pytest.mark.parametrize("boost", ["5", "auto"])
def test_a_boost_without_malicious_clients_is_refused(boost):
    with pytest.raises(ConfigError, match=f"backdoor.boost='{boost}' is not allowed: must be 1 unless"):
        BackdoorConfig(boost=boost)  # central: no client would ever scale its update
    assert BackdoorConfig(boost=boost, malicious_clients=1).boost == boost
    assert BackdoorConfig(boost="1.0").boost == "1.0"


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_trigger_seed_outside_the_seed_range_is_refused(seed):
    with pytest.raises(ConfigError, match=rf"backdoor.trigger_seed={seed} is not allowed: must be in \[0, 2\*\*32\)"):
        BackdoorConfig(attack="blended", trigger_seed=seed)  # 2**64 failed in the poison stage with a traceback
    assert BackdoorConfig(trigger_seed=2**32 - 1).trigger_seed == 2**32 - 1
