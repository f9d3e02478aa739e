"""Hydra composition and the typed schema: bad values end with one clear line and exit status 2."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import ValidationError

from aisec_train.cli import CONFIG_DIR
from aisec_train.config import register_configs, to_config
from aisec_train.errors import ConfigError
from aisec_train.train.config import Accountant
from tests.conftest import run_cli


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_compose_to_typed_config():
    cfg = to_config(compose_config())
    assert cfg.dataset.name == "digits"
    assert cfg.model["_target_"] == "aisec_train.models.SmallCNN"
    # the fine-tuning keys every model preset carries (configs/model/_finetune.yaml), so none needs a '+'
    assert cfg.model["checkpoint_path"] is None and cfg.model["trainable"] == "all" and cfg.model["lora"]["r"] == 8
    assert cfg.optimizer == {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9, "weight_decay": 0.0}
    assert cfg.privacy.mode.value == "dpsgd" and cfg.privacy.accountant is Accountant.prv
    assert cfg.privacy.target_epsilon == 3.0 and cfg.privacy.delta == 1e-5
    assert cfg.train.device == "auto"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-1", "train.lr=-1.0 is not allowed: must be a finite number > 0"),
        ("train.lr=nan", "train.lr=nan is not allowed: must be a finite number > 0"),
        ("privacy.target_epsilon=inf", "privacy.target_epsilon=inf is not allowed: must be a finite number > 0"),
        ("+train.typo=1", "train.typo is not allowed: not a key of train"),
        ("dataset.n_samples=50", "dataset.n_samples=50 is not allowed with dataset=digits"),
        ("privacy.delta=2", "privacy.delta=2.0 is not allowed"),
        ("train.device=tpu", "train.device='tpu' is not allowed"),
        ("dataset.sha256=abc", "dataset.sha256='abc' is not allowed"),
        ("dataset.test_fraction=1.5", "dataset.test_fraction=1.5 is not allowed"),
    ],
)
def test_range_errors_name_key_value_and_rule(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        to_config(compose_config(override))


def test_type_errors_are_caught_by_the_schema():
    with pytest.raises(Exception) as info:
        compose_config("train.epochs=abc")
    assert isinstance(info.value.__cause__, ValidationError)
    with pytest.raises(Exception) as info:
        compose_config("privacy.accountant=nope")
    assert "prv, rdp, gdp" in str(info.value.__cause__)
    with pytest.raises(Exception) as info:
        compose_config("train.nonsense=1")
    assert "nonsense" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federated=fedavg", "train.distributed.nproc=2"], "train.distributed.nproc=2 is not allowed"),
        (["backdoor=badnets", "backdoor.malicious_clients=1"], "backdoor.malicious_clients=1 is not allowed"),
        (["federated=fedavg", "backdoor=badnets"], "backdoor.malicious_clients=0 is not allowed: must be in [1,"),
        (["federated=fedavg", "backdoor=badnets", "backdoor.filter=true", "backdoor.malicious_clients=1"],
         "backdoor.filter=True is not allowed"),
        (["robustness=trades", "privacy.grad_sample_mode=ghost"], "privacy.grad_sample_mode='ghost' is not allowed"),
    ],
)  # fmt: skip
def test_combinations_that_could_not_run_honestly_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        to_config(compose_config(*overrides))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train.epochs=abc"], "train.epochs=abc"),
        (["privacy.accountant=nope"], "expected one of [prv, rdp, gdp]"),
        (["privacy=bogus"], "privacy=bogus is not allowed: config group privacy takes one of dpsgd, none"),
        (["train.batch_size=0"], "train.batch_size=0 is not allowed: must be >= 1"),
        (
            ["dataset=npz", "dataset.path=/no/such/file.npz"],
            "dataset.path='/no/such/file.npz' does not exist",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_no_traceback(args, expected, tmp_path):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aisec-train: error:") and expected in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()
