"""Non-finite and unbounded settings are refused in one line before any work (exit 2, nothing trained or charged).

A range check such as ``> 0`` lets inf through (and ``<= 0`` lets NaN through): ``backdoor.finetune_lr=inf``
trained, charged the ledger and then failed naming ``train.lr``; ``robustness.eps=inf`` ran to the end and passed
an evasion control. Every float key of the schema is swept through ``aisec_train.compose``; the keys the audit
found, the unbounded counts and the run directory and key file go through the command line in-process.
"""

from __future__ import annotations

import copy
import math
import os
import secrets
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import aisec_train
from aisec_train.cli import CONFIG_DIR
from aisec_train.config import register_configs, to_config
from aisec_train.errors import ConfigError
from tests.fuzzing import BASE, call_cli, numeric_keys

FLOAT_KEYS = sorted(key for key, kind in numeric_keys().items() if kind == "float")
CLIENT_DP = ["privacy=none", "federated=fedavg", "federated.dp=client"]


@pytest.fixture(scope="module")
def composed():
    """The smoke job's composed (untyped) config: each case below sets one key on a copy and converts it, as the
    command line's job does (a Hydra compose per case would cost ten times as much)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=BASE)


@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_a_non_finite_value_by_name(composed, key, value):
    cfg = copy.deepcopy(composed)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        to_config(cfg)
    assert str(info.value).startswith(f"{key}={value!r} is not allowed: "), str(info.value)


def test_the_sweep_covers_the_keys_the_audit_found():
    found = {"backdoor.finetune_lr", "robustness.attack.step_size", "federated.client_dp.server_lr"}
    assert found | {"audit.guard.noise_std", "federated.partition.alpha"} <= set(FLOAT_KEYS)


def refused(run_dir: Path, args: list[str], *needles: str) -> str:
    """One ``aisec-train: error:`` line naming ``needles``, exit 2, no traceback, no training and no charge."""
    code, err, crash = call_cli([*BASE, *args, f"hydra.run.dir={run_dir}"])
    assert not crash and code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err, crash[-2000:])
    assert err.startswith("aisec-train: error: ") and all(n in err for n in needles), err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "report.json").exists()
    store = Path(os.environ["AISEC_TRAIN_LEDGER_STORE"])  # tests/conftest.py: this test's own store
    assert not store.exists() or not any(store.rglob("*.jsonl")), sorted(store.rglob("*"))
    return err


MOST_THREADS = max(8, 4 * (os.cpu_count() or 1))  # preflight.check_resource_limits: 4 per core


@pytest.mark.parametrize(
    "args, needle",
    [
        (["backdoor.finetune_lr=inf"], "backdoor.finetune_lr=inf is not allowed: must be a finite number > 0"),
        (["backdoor.finetune_weight_decay=inf"], "backdoor.finetune_weight_decay=inf is not allowed"),
        (["backdoor.detection_k=inf"], "backdoor.detection_k=inf is not allowed"),
        (["backdoor.warp_strength=inf"], "backdoor.warp_strength=inf is not allowed"),
        (["backdoor.distill_temperature=inf"], "backdoor.distill_temperature=inf is not allowed"),
        (["backdoor.boost=inf"], "backdoor.boost='inf' is not allowed: must be auto or a finite number >= 1"),
        (["robustness.eps=inf"], "robustness.eps=inf is not allowed: must be a finite number > 0, or null"),
        (["robustness.step_size=inf"], "robustness.step_size=inf is not allowed"),
        (["robustness.attack.eps=inf"], "robustness.attack.eps=inf is not allowed"),
        (["robustness.attack.step_size=inf"], "robustness.attack.step_size=inf is not allowed"),
        (["robustness=trades", "robustness.beta=inf"], "robustness.beta=inf is not allowed"),
        (["robustness=trades", "robustness.beta=1e38"], "robustness.beta=1e+38 is not allowed: must be in [0, 1000]"),
        (["audit.guard.noise_std=inf"], "audit.guard.noise_std=inf is not allowed"),
        (["audit.guard.rate_limit=inf"], "audit.guard.rate_limit=inf is not allowed"),
        (["privacy=none", "federated=fedavg", "federated.lr=inf"], "federated.lr=inf is not allowed"),
        (["privacy=none", "federated=fedavg", "federated.max_update_norm=inf"], "federated.max_update_norm=inf"),
        (["privacy=none", "federated=fedavg", "federated.partition.alpha=inf"], "federated.partition.alpha=inf"),
        ([*CLIENT_DP, "federated.client_dp.clip_norm=inf"], "federated.client_dp.clip_norm=inf is not allowed"),
        ([*CLIENT_DP, "federated.client_dp.server_lr=inf"], "federated.client_dp.server_lr=inf is not allowed"),
        ([*CLIENT_DP, "federated.client_dp.target_epsilon=1e30"], "federated.client_dp.target_epsilon=1e+30"),
        ([*CLIENT_DP, "federated.client_dp.target_epsilon=inf"], "federated.client_dp.target_epsilon=inf"),
        ([*CLIENT_DP, "federated.client_dp.noise_multiplier=0"], "federated.client_dp.noise_multiplier=0.0"),
        (["dataset.normalize.mean=[nan]", "dataset.normalize.std=[1.0]"], "dataset.normalize.mean=[nan]"),
        (["dataset.normalize.mean=[inf]", "dataset.normalize.std=[1.0]"], "dataset.normalize.mean=[inf]"),
        (["model.trainable=lora", "model.lora.alpha=nan"], "model.lora.alpha=nan is not allowed: a finite number"),
    ],
)  # fmt: skip
def test_non_finite_settings_are_refused_before_any_work(tmp_path, args, needle):
    refused(tmp_path / "run", args, needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["audit.cpu_threads=100000"], f"audit.cpu_threads=100000 is not allowed: at most {MOST_THREADS}"),
        (["dataset=synthetic", "dataset.image_size=100000"], "dataset.image_size=100000"),
        (["dataset=synthetic", "dataset.num_classes=1000000000"], "dataset.num_classes=1000000000"),
        (["dataset=synthetic", "dataset.n_samples=100000000000"], "dataset.n_samples=100000000000"),
    ],
)
def test_unbounded_counts_are_refused_before_any_work(tmp_path, args, needle):
    err = refused(tmp_path / "run", args, needle)
    assert "dataset.max_bytes" in err or "cpu_threads" in needle


def test_a_synthetic_set_within_max_bytes_is_not_refused():
    from aisec_train.preflight import check_resource_limits

    check_resource_limits(aisec_train.compose([*BASE, "dataset=synthetic", "dataset.image_size=32"]))
    big = aisec_train.compose([*BASE, "dataset=synthetic", "dataset.image_size=32", "dataset.max_bytes=1000"])
    with pytest.raises(ConfigError, match="over dataset.max_bytes=1000"):
        check_resource_limits(big)


@pytest.mark.parametrize("form", ["hydra.run.dir=", 'hydra.run.dir=""', "hydra.run.dir=''", "hydra.run.dir=null"])
def test_an_empty_run_dir_is_refused_and_nothing_is_written_in_the_launch_folder(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    code, err, crash = call_cli([*BASE, form])
    assert not crash and code == 2 and err.count("\n") == 1 and "hydra.run.dir=" in err, (code, err, crash[-2000:])
    assert sorted(os.listdir(tmp_path)) == [], "the refused run wrote into the launch folder"


def test_an_empty_sweep_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err, _ = call_cli(["-m", *BASE, "hydra.sweep.dir="])
    assert code == 2 and "hydra.sweep.dir='' is not allowed" in err and os.listdir(tmp_path) == [], err


def _symlinked_key(folder: Path) -> Path:
    real = folder / "real.key"
    real.write_text(secrets.token_bytes(32).hex())
    real.chmod(0o600)
    link = folder / "hmac.key"
    link.symlink_to(real)
    return link


def test_a_symlinked_key_file_is_named_by_its_setting_not_as_the_registry(tmp_path, monkeypatch):
    link = _symlinked_key(tmp_path)
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(link))
    err = refused(tmp_path / "run", [], f"error: $AISEC_TRAIN_KEY_FILE: key file {link}", "symlink")
    assert "audit.registry_path" not in err


def test_a_symlinked_default_key_file_is_named_by_its_path(tmp_path, monkeypatch):
    (tmp_path / "config" / "aisec-train").mkdir(parents=True)
    link = _symlinked_key(tmp_path / "config" / "aisec-train")
    monkeypatch.delenv("AISEC_TRAIN_KEY_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    err = refused(tmp_path / "run", [], f"error: key file {link}", "symlink")
    assert "audit.registry_path" not in err
