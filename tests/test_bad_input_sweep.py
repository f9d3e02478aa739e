"""Bad input found by an adversarial sweep of the CLI (2026-12-07, session 21): each is one line and exit 2 before any
work, and loses nothing.

A relative ledger store, key file or anchor folder followed the working directory: the same user on the same data met
a fresh, empty budget (or a fresh key) after a `cd`. A checkpoint torch refuses as weights only printed torch's pickle
protocol warning (three stderr lines), and the refusal, cut at 200 characters, advised re-running with
``weights_only=False`` without saying what was refused (``GLOBAL posix.system``).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings

import pytest
import torch

from aisec_train.errors import ConfigError
from aisec_train.models.finetune import read_weights
from tests.fuzzing import BASE, call_cli, refusal_problems

FAST = [*BASE, "train.epochs=1"]


# ---- relative state paths: one per working directory -------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("AISEC_TRAIN_LEDGER_STORE", "ledgers"),
        ("AISEC_TRAIN_KEY_FILE", "keys/hmac.key"),
        ("AISEC_TRAIN_ANCHOR_DIR", "anchors"),
        ("privacy.ledger_store", "ledgers"),
    ],
)
def test_a_relative_state_path_is_refused_not_one_per_working_directory(tmp_path, monkeypatch, setting, where):
    """A DP run from folder A with AISEC_TRAIN_LEDGER_STORE=ledgers spent the budget; a second was refused; the same
    job from folder B trained on a fresh budget in B/ledgers. A relative key file made a fresh key in each folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("AISEC_TRAIN_REGISTRY")  # its default, outputs/registry.json, is in the working directory
    overrides = [*FAST, f"hydra.run.dir={tmp_path / 'run'}"]
    if setting.startswith("AISEC_TRAIN_"):
        monkeypatch.setenv(setting, where)
    else:
        overrides.append(f"{setting}={where}")
    code, err, crash = call_cli(overrides)
    assert refusal_problems(tmp_path / "run", code, err, crash) == [], (code, err, crash)
    shown = f"${setting}" if setting.startswith("AISEC_TRAIN_") else setting
    assert f"{shown}={where!r} is not allowed: an absolute" in err, err
    assert "follows the working directory" in err, err
    assert list(cwd.iterdir()) == []  # no store, key, anchor or registry folder made in the working directory


def test_a_home_relative_ledger_store_is_still_allowed(tmp_path, monkeypatch):
    from aisec_train.privacy.ledger_store import choose_store

    monkeypatch.setenv("HOME", str(tmp_path))
    assert choose_store("~/ledgers").path == tmp_path / "ledgers"


# ---- checkpoints torch refuses as weights only --------------------------------------------------------------------
def test_a_plain_pickle_checkpoint_is_one_line_without_torchs_protocol_warning(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="cannot be loaded as weights only") as refused:
            read_weights(str(path))
    assert [str(w.message) for w in shown] == []  # it printed "UserWarning: Detected pickle protocol 4" (2 lines)
    assert "never a pickle that could run code" in str(refused.value)


def test_a_code_carrying_checkpoint_names_what_was_refused_and_never_advises_weights_only_false(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(2), "hook": os.system}, path)
    code, err, crash = call_cli([*FAST, "privacy=none", f"model.checkpoint_path={path}",
                                 f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert refusal_problems(tmp_path / "run", code, err, crash) == [], (code, err, crash)
    assert "GLOBAL posix.system" in err, err  # what was refused: cut off before
    assert "weights_only` set to `False" not in err, err  # torch's advice, which was all the line said


# ---- one clear line: a typo'd key names what is allowed, a quoted cause is said once --------------------------------
@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("privacy.targt_epsilon=3", "not a key of privacy (accountant, "),
        ("train.distributed.nprocs=2", "not a key of train.distributed (backend, "),
        ("dataset.augment.flip=true", "not a key of dataset.augment (horizontal_flip, random_crop_padding)"),
    ],
)
def test_a_misspelt_key_names_the_keys_allowed_not_a_plus_that_is_refused_next(tmp_path, override, allowed):
    """Hydra answered 'To append to your config use +privacy.targt_epsilon=3', and that was refused in turn."""
    code, err, crash = call_cli([*FAST, override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert refusal_problems(tmp_path / "run", code, err, crash, config_only=True) == [], (code, err, crash)
    assert f"{override.split('=')[0]} is not allowed: {allowed}" in err, err
    assert "To append" not in err, err


def test_the_python_api_names_the_keys_allowed_too():
    """``aisec_train.compose`` shares the CLI's check (cli.check_known_keys): it gave Hydra's '+' advice."""
    import aisec_train
    from aisec_train.errors import ConfigError

    allowed = r"^privacy\.targt_epsilon is not allowed: not a key of privacy \(accountant, "
    with pytest.raises(ConfigError, match=allowed):
        aisec_train.compose(["privacy.targt_epsilon=3"])
    assert aisec_train.compose(["privacy.target_epsilon=4"]).privacy.target_epsilon == 4


def test_a_refusal_quoting_its_cause_says_it_once(tmp_path):
    """'federated.ckks: coeff_mod_bit_sizes=[] is not allowed; use ...: coeff_mod_bit_sizes=[] is not allowed; use
    ...' (the CLI appended the cause the message already quoted; so did bad .npz and ImageFolder refusals)."""
    code, err, crash = call_cli([*BASE, "experiment=federated_he", "federated.ckks.coeff_mod_bit_sizes=[]",
                                 f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert refusal_problems(tmp_path / "run", code, err, crash, config_only=True) == [], (code, err, crash)
    assert err.count("is not allowed") == 1, err


# ---- a whole logger section set while that logger is off -----------------------------------------------------------
@pytest.mark.parametrize("override", ["logger.csv={every_n_steps:5}", "logger.wandb={a:1}"])
def test_a_logger_section_set_while_the_logger_is_off_is_one_line(tmp_path, override):
    """OmegaConf merged the dict into the off logger's null node: AttributeError, a traceback (keys under it,
    logger.csv.path=x, were already refused)."""
    code, err, crash = call_cli([*FAST, "privacy=none", override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert refusal_problems(tmp_path / "run", code, err, crash, config_only=True) == [], (code, err, crash)
    name = override.split(".")[1].split("=")[0]
    assert f"{override} is not allowed: logger {name} is not on in this run" in err, err


# ---- override grammar: the line names the override ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("logger=csv logger.every_n_steps=0", "mismatched input '='"),  # two overrides quoted as one argument
        ("train.lr=[1,", "no viable alternative at input '[1,'"),
        ("train.lr=(", "extraneous input '('"),
    ],
)
def test_an_override_hydra_cannot_parse_is_named_in_the_line(tmp_path, override, said):
    """Hydra's grammar errors often did not say which override they meant (`mismatched input '=' expecting <EOF>`
    for a quoted pair); the line now quotes it, says what Hydra said once, and what is allowed."""
    run = tmp_path / "run"
    code, err, crash = call_cli([*FAST, override, f"hydra.run.dir={run}"])
    assert refusal_problems(run, code, err, crash, config_only=True) == [], (code, err, crash)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"aisec-train: error: override {override!r} is not allowed: {said}"), line
    assert "allowed: one KEY=VALUE per argument" in line and line.count("Error parsing override") == 0
    import aisec_train

    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))} is not allowed: "):
        aisec_train.compose([override])  # the Python API says the same


# ---- a key below a single value ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("dataset.resize.a=1", "dataset.resize is one value (list[int] | None)"),  # was an AssertionError, exit 1
        ("train.lr.x=1", "train.lr is one value (float)"),  # was OmegaConf's "Value '{}' of type 'dict' ..."
        ("robustness.eval.samples=0", "robustness.eval is one value (str)"),
        ("privacy.mode.x=1", "privacy.mode is one value (PrivacyMode)"),
    ],
)
def test_a_key_below_a_single_value_is_refused_naming_it(tmp_path, override, value):
    run = tmp_path / "run"
    code, err, crash = call_cli([*FAST, override, f"hydra.run.dir={run}"])
    assert refusal_problems(run, code, err, crash, config_only=True) == [], (code, err, crash)
    key = override.split("=")[0]
    assert f"aisec-train: error: {key} is not allowed: {value}, not a section with keys" in err, err


def test_the_ledger_tool_names_its_own_flag_for_a_relative_store(tmp_path):
    """`aisec-train-ledger --store relative list` was refused as `privacy.ledger_store='relative'`, a key that
    command line does not have."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "aisec_train.privacy.ledger_cli", "--store", "relative", "list"],
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "" and list(tmp_path.iterdir()) == []
    assert proc.stderr.startswith("aisec-train-ledger: error: --store='relative' is not allowed: an absolute folder")
    assert proc.stderr.count("\n") == 1


# ---- aisec_train.fit: what failed part-way through the first epoch --------------------------------------------------
def test_fit_refuses_labels_past_the_models_outputs_and_a_loader_that_is_not_one(tmp_path, monkeypatch):
    """A label of 7 for a 3-logit model was cross-entropy's `IndexError: Target 7 is out of bounds` after training
    began (and under DP after the dataset ledger opened); a list for the loader was `AttributeError: 'list' object
    has no attribute 'dataset'`. Both are one ConfigError before any step, and the model's weights are untouched."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import aisec_train

    store = tmp_path / "ledgers"
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    labels = torch.randint(0, 3, (32,))
    labels[5] = 7
    loader = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), labels), batch_size=8)
    with pytest.raises(ConfigError, match=r"^the data holds label 7, but the model returns 3 logits per image: "):
        aisec_train.fit(net, loader, ["train.epochs=1"])  # DP: the default privacy
    with pytest.raises(ConfigError, match=r"^loader=list is not allowed: a torch.utils.data.DataLoader"):
        aisec_train.fit(net, [1, 2, 3], ["train.epochs=1"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and net.training
    assert not any(store.glob("*.json"))  # no dataset ledger opened, nothing charged
