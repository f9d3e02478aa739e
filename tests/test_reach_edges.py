"""Red-team edges of the training reach: the Python API's config handling, what ``fit`` cannot do, and an MLflow
store URI that used to fail only once training had begun. Every refusal is one line, before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.tracking import open_tracker
from aisec_train.tracking.base import RunInfo
from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.epochs=abc"], "Error merging override train.epochs=abc: Value 'abc'"),
        (["model=nosuch"], "model=nosuch is not allowed: config group model takes one of cnn, hf, mlp"),
        (["nosuchkey=1"], "Could not override 'nosuchkey'"),
        (["privacy=1"], "privacy=1 is not allowed: config group privacy takes one of dpsgd, none"),
        ("train.epochs=1", "overrides='train.epochs=1' is not allowed: a list of Hydra overrides"),
        ([1], "overrides=[1] is not allowed: a list of Hydra overrides"),
    ],
)
def test_compose_refuses_a_bad_override_with_the_clis_one_line(overrides, expected):
    """Hydra's own exceptions (ConfigCompositionException, a 14-line MissingConfigException), a bare ValueError
    for a group given a number, and a string iterated one character at a time ("Error parsing override 't'")
    used to reach API callers; now the CLI's one-line ConfigError."""
    with pytest.raises(ConfigError) as err:
        aisec_train.compose(overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_run_and_fit_refuse_a_config_that_is_not_a_list_of_overrides(tmp_path):
    net = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.rand(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    for call in (
        lambda: aisec_train.run("train.epochs=1", run_dir=tmp_path / "run"),
        lambda: aisec_train.fit(net, loader, "privacy=none"),
        lambda: aisec_train.run(123, run_dir=tmp_path / "run"),
    ):
        with pytest.raises(ConfigError, match=r"^config=.* is not allowed: a list of Hydra overrides"):
            call()
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.trainable=head", "model.trainable='head' is not allowed with fit"),
        ("model.batchnorm=freeze", "model.batchnorm='freeze' is not allowed with fit"),
        ("train.distributed.nproc=2", "train.distributed.nproc=2 is not allowed with fit"),
        ("federated=fedavg", "federated='fedavg' is not allowed with fit"),
        ("backdoor=badnets", "backdoor.attack='badnets' is not allowed with fit"),
    ],
)
def test_fit_refuses_what_only_run_carries_out(tmp_path, override, expected):
    """fit used to train every parameter under model.trainable=head, in one process under nproc=2, and without
    any poisoning or federation, saying nothing: each is now refused before a step (weights untouched)."""
    net = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))), batch_size=8)
    with pytest.raises(ConfigError) as err:
        aisec_train.fit(net, loader, ["privacy=none", "train.epochs=1", override])
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    result = aisec_train.fit(net, loader, ["privacy=none", "train.epochs=1"])  # the plain call still trains
    assert result.history and result.world_size == 1


def test_fit_inside_a_torchrun_job_is_refused_before_a_step(monkeypatch):
    """fit trains in one process and charges its own run: under torchrun every rank opened the dataset ledger as
    its own run (a LockError on one rank, a gloo error on the others)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        monkeypatch.setenv(name, value)
    net = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))), batch_size=8)
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE=2 is not allowed with fit: "):
        aisec_train.fit(net, loader, ["privacy=none", "train.epochs=1"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_an_mlflow_uri_without_a_store_is_refused_before_the_tracking_child_starts(tmp_path):
    """The tracking child used to fail on `bogus://x` only after training had started (the dataset ledger opened,
    `train: 0%` on the console); now the tracker refuses it before any child or step, naming the schemes."""
    cfg = aisec_train.compose(["logger=mlflow", "logger.mlflow.tracking_uri=bogus://host/x"])
    with pytest.raises(ConfigError) as err:
        open_tracker(cfg, RunInfo(tmp_path, "r", "quickstart"))
    line = str(err.value)
    assert line.startswith("logger.mlflow.tracking_uri='bogus://host/x' is not allowed: MLflow has no store")
    assert "http://" in line and "sqlite://" in line and "\n" not in line
    assert not (tmp_path / "tracking").exists()  # no child was started
    for fine in ("http://mlflow.example:5000", "postgresql+psycopg2://u@h/db", f"sqlite:///{tmp_path}/m.db"):
        from aisec_train.tracking.mlflow_logger import MlflowBackend

        MlflowBackend.check(aisec_train.compose(["logger=mlflow", f"logger.mlflow.tracking_uri={fine}"]).logger.mlflow,
                            RunInfo(tmp_path, "r", "quickstart"))  # fmt: skip


def test_an_mlflow_file_store_is_refused_before_any_step_unless_mlflow_is_told_to_allow_it(tmp_path, monkeypatch):
    """`logger.mlflow.tracking_uri=file://...` (or a path) used to train, charge the dataset's budget and write the
    model, then end in `logger=mlflow failed: ... The filesystem tracking backend ... is in maintenance mode`, exit
    2: MLflow 3.13 made that store opt-in (MLFLOW_ALLOW_FILE_STORE=true), and only the tracking child found out."""
    import importlib.metadata

    from aisec_train.tracking.mlflow_logger import MlflowBackend, file_store_refused

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for version, refusing in (("3.12.4", None), ("3.13.0", "3.13.0"), ("4.0.1", "4.0.1")):  # what the check reads
        with monkeypatch.context() as patched:
            patched.setattr(importlib.metadata, "version", lambda dist, v=version: v)
            assert file_store_refused() == refusing
    info = RunInfo(tmp_path, "r", "quickstart")

    def check(uri: str) -> None:
        MlflowBackend.check(
            aisec_train.compose(["logger=mlflow", f"logger.mlflow.tracking_uri={uri}"]).logger.mlflow, info
        )

    if file_store_refused() is None:  # an MLflow before 3.13 (not the locked 3.18) opens file stores itself
        check(str(tmp_path / "mlruns"))
        return
    store, run = tmp_path / "ledgers", tmp_path / "run"
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store))
    uri = f"file://{tmp_path}/mlruns"
    proc = run_cli("experiment=smoke", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith(f"aisec-train: error: logger.mlflow.tracking_uri='{uri}' is not allowed: MLflow 3.")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line and "sqlite:///" in line
    assert not any(store.glob("*.json")) and not (run / "checkpoints").exists()  # nothing charged or trained
    assert not (tmp_path / "mlruns").exists()
    with pytest.raises(ConfigError, match="is not allowed: MLflow 3.*MLFLOW_ALLOW_FILE_STORE=true"):
        check(str(tmp_path / "mlruns"))  # a path is a file store too
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in: then it opens them
    check(uri)
    check(str(tmp_path / "mlruns"))


def test_an_mlflow_uri_without_a_store_is_refused_by_run_before_the_ledger_opens(tmp_path, monkeypatch):
    store = tmp_path / "ledgers"
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store))
    with pytest.raises(ConfigError, match="logger.mlflow.tracking_uri='bogus://x' is not allowed"):
        aisec_train.run(["logger=mlflow", "logger.mlflow.tracking_uri=bogus://x", "train.epochs=1", "audit=off"],
                        run_dir=tmp_path / "run")  # fmt: skip
    assert not any(store.glob("*.json"))  # no dataset ledger was opened, nothing charged
    assert not (tmp_path / "run" / "checkpoints").exists()


class Widened(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Linear(64, width), nn.Linear(width, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.flatten(1))))


def test_resuming_with_another_width_of_the_same_model_class_is_one_line(tmp_path):
    """A model object is identified by its class alone: resuming a run directory with another width of the same
    class used to pass the identity check and crash in load_state_dict (a multi-line RuntimeError) inside the
    train stage. Now a one-line CheckpointError naming the first tensor that does not fit."""
    from aisec_train.train.checkpoint import CheckpointError

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(1, 8, 8, generator=g), i % 3) for i in range(48)]
    overrides = ["privacy=none", "train.epochs=1", "train.batch_size=16", "audit=off", "robustness.evaluate=false"]
    aisec_train.run(overrides, model=Widened(8), train_dataset=data, run_dir=tmp_path / "run")
    with pytest.raises(CheckpointError) as err:
        aisec_train.run(overrides + ["train.epochs=2"], model=Widened(16), train_dataset=data, run_dir=tmp_path / "run")
    line = str(err.value)
    assert "holds a run of another" in line and "a.bias is (8,) in its checkpoint, (16,) in this model" in line
    assert "\n" not in line
    report = aisec_train.run(overrides + ["train.epochs=2"], model=Widened(8), train_dataset=data,
                             run_dir=tmp_path / "run")  # fmt: skip
    assert report.get("train.resumed_from_epoch") == 1 and report.get("train.epochs_completed") == 2


def test_default_lora_targets_leave_out_depthwise_convolutions():
    """model.lora.target_modules=null took every Conv2d, depthwise ones included, and peft adapts a grouped conv
    only when the rank divides its groups: `model=timm model.arch=<any ConvNeXt / EfficientNet / MobileNet>
    model.trainable=lora` was refused for a list the user never wrote. The default now skips grouped convs."""
    pytest.importorskip("timm")
    pytest.importorskip("peft")
    from aisec_train.models import ModelFactory
    from aisec_train.models.finetune import adapters

    spec = {"_target_": "aisec_train.models.timm_model", "arch": "test_convnext", "trainable": "lora", "lora": {"r": 4}}
    model = ModelFactory(spec, (3, 32, 32), 10, private=True)(seed=0)
    adapted = {name.split(".lora_B")[0] for name in adapters(model)}
    grouped = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert adapted and grouped and not adapted & {g.rsplit(".base_layer", 1)[0] for g in grouped}
    assert any(".mlp.fc1" in name for name in adapted)  # the Linear layers of every block still adapt


def test_a_resumed_run_continues_the_trackers_step_axis(tmp_path):
    """The loop's step counter restarted at 0 on resume, so a resumed run logged its steps as 1, 2, ... again: the
    CSV (appended on resume) held two losses (and, under DP, two epsilons) for the same step. It goes on now."""
    import csv

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(1, 8, 8, generator=g), i % 3) for i in range(48)]
    overrides = ["privacy=none", "train.batch_size=16", "audit=off", "robustness.evaluate=false", "logger=csv"]
    for epochs in (1, 2):
        aisec_train.run(overrides + [f"train.epochs={epochs}"], model=Widened(8), train_dataset=data,
                        test_dataset=data[:6], run_dir=tmp_path / "run")  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "run" / "tracking" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r["key"] == "step/loss"]
    assert steps == list(range(1, 7))  # 3 steps an epoch (48 records, batch 16), epoch 2 resumed at step 4


def test_wandb_settings_it_would_refuse_after_training_are_refused_before_any_step(tmp_path, monkeypatch):
    """`logger.wandb.mode=online` without credentials and `logger.wandb.project=a/b` used to train, write the model,
    then end in `logger=wandb failed: wandb.errors.errors.UsageError: ...`, exit 2. Now wandb's own validator and
    auth lookup (no prompt, no network) refuse them in one line before the tracking child or any step."""
    from aisec_train.tracking.wandb_logger import WandbBackend

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    run = tmp_path / "run"
    proc = run_cli(
        "experiment=smoke", "privacy=none", "logger=wandb", "logger.wandb.mode=online", f"hydra.run.dir={run}"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("aisec-train: error: logger.wandb.mode='online' is not allowed here: no W&B credentials")
    assert not (run / "checkpoints").exists() and not (run / "wandb").exists()
    info = RunInfo(run, "r", "quickstart")

    def check(*overrides: str) -> None:
        WandbBackend.check(aisec_train.compose(["logger=wandb", *overrides]).logger.wandb, info)

    with pytest.raises(ConfigError, match=r"^logger.wandb.project='a/b' is not allowed: at most 128 characters"):
        check("logger.wandb.project=a/b")
    check("logger.wandb.project=fine-name")  # offline needs no credentials
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    check("logger.wandb.mode=online")  # credentials configured: wandb itself checks them against its server later


def test_a_wandb_check_that_hangs_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """The wandb pre-check runs in a child process with a time limit; a child past it (a hung credential helper)
    raised subprocess.TimeoutExpired, a traceback. Now it is the tracking refusal's one line."""
    from aisec_train.tracking import wandb_logger
    from aisec_train.tracking.sidecar import TrackingError

    monkeypatch.setattr(wandb_logger, "CHECK_TIMEOUT_S", 0.05)  # a real child; importing wandb alone takes longer
    cfg = aisec_train.compose(["logger=wandb"]).logger.wandb
    with pytest.raises(TrackingError, match=r"^logger=wandb failed: its settings and credential check took over 0.05"):
        wandb_logger.WandbBackend.check(cfg, RunInfo(tmp_path / "run", "r", "quickstart"))
