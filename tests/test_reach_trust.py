"""Data-parallel launches a user or an adversary gets wrong: torchrun's env:// variables torch cannot use, ranks
started with different configs (rank 0 alone charges and reports its own), train.distributed.nproc under torchrun,
bf16 under torchrun's ranks, fp16 under DP through fit, NCCL on the CPU, and a rendezvous port that is taken. Each
is one line, exit 2, before a step or a charge (docs/cluster.md)."""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import pytest
import torch

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.train.distributed import _check_port
from aisec_train.train.launch import check_agreement, check_same_job, cli_overrides, job_view, under_torchrun
from tests.conftest import run_cli

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SMALL = ["dataset=digits", "model=mlp", "train.epochs=1", "audit=off", "robustness.evaluate=false"]


@pytest.fixture
def torchrun_env(monkeypatch):
    for name, value in {**TORCHRUN_ENV, "TORCHELASTIC_RUN_ID": "job1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RANK", "abc", r"^RANK='abc' is not allowed: a whole number"),  # was int()'s traceback after the data
        ("RANK", "2", r"^RANK=2 is not allowed: 0 to 1 with WORLD_SIZE=2"),  # was a hang at the rendezvous
        ("WORLD_SIZE", "0", r"^WORLD_SIZE=0 is not allowed: at least 1"),  # was a silent one-process run
        ("MASTER_PORT", "abc", r"^MASTER_PORT='abc' is not allowed: a whole number"),
        ("MASTER_PORT", "70000", r"^MASTER_PORT=70000 is not allowed: 1 to 65535"),
        ("LOCAL_RANK", "-1", r"^LOCAL_RANK=-1 is not allowed: 0 to 1"),
    ],
)
def test_env_variables_torch_cannot_use_are_refused(torchrun_env, name, value, expected):
    torchrun_env.setenv(name, value)
    with pytest.raises(ConfigError, match=expected):
        cli_overrides(["train.epochs=1"])  # the command line's first step, before Hydra writes anything


def test_valid_env_variables_still_make_a_torchrun_rank(torchrun_env):
    torchrun_env.setenv("LOCAL_RANK", "1")
    torchrun_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert under_torchrun()


def test_a_rank_out_of_range_is_refused_by_the_cli_before_the_run_dir_exists(tmp_path):
    run_dir = tmp_path / "run"
    env = {**TORCHRUN_ENV, "RANK": "2", "TORCHELASTIC_RUN_ID": "job1"}
    proc = run_cli(*SMALL, "privacy.ledger_store=scratch", f"hydra.run.dir={run_dir}", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "aisec-train: error: RANK=2 is not allowed: 0 to 1 with WORLD_SIZE=2 (an outer launcher or the shell set "
        "torchrun's env:// variables; unset RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to train in one process)"
    ]
    assert not run_dir.exists()


def test_nproc_under_torchrun_is_refused_not_ignored(torchrun_env):
    with pytest.raises(ConfigError, match=r"^train.distributed.nproc=4 is not allowed under torchrun \(WORLD_SIZE=2\)"):
        aisec_train.compose([*SMALL, "train.distributed.nproc=4"])
    aisec_train.compose(SMALL)  # nproc=1: the launcher's ranks


def test_bf16_under_torchrun_ranks_is_refused_with_the_config(torchrun_env):
    # torchrun's ranks clip bk's steps with Opacus' distributed ghost optimizer, as train.distributed.nproc's do;
    # the config check only counted nproc, so the loop refused it only after every rank had loaded the data.
    with pytest.raises(ConfigError, match=r"^train.precision='bf16' is not allowed with Opacus' ghost clipping \(2 "):
        aisec_train.compose([*SMALL, "train.precision=bf16"])
    aisec_train.compose([*SMALL, "train.precision=bf16", "privacy.grad_sample_mode=hooks"])  # hooks clips fp32


def test_job_view_holds_what_ranks_train_and_not_where_a_node_keeps_its_data():
    base = aisec_train.compose(SMALL)
    view = job_view(base, "abc")
    assert view["privacy.max_grad_norm"] == "0.5" and view["data.manifest_sha256"] == "abc"
    assert view["privacy.accountant"] == "prv"  # an Enum by its config spelling
    assert not any(key.startswith(("audit.", "logger.")) for key in view)  # rank 0's stages only
    assert "dataset.path" not in view and "dataset.workers" not in view  # node-local; the manifest says what
    other = job_view(aisec_train.compose([*SMALL, "privacy.max_grad_norm=100"]), "abc")
    assert {k for k in view if view[k] != other[k]} == {"privacy.max_grad_norm"}
    moved = job_view(aisec_train.compose([*SMALL, "dataset.workers=1"]), "abc")
    assert moved == view


def test_ranks_that_train_different_configs_are_refused_as_each_rank_words_it():
    # A rank clipping at 100 while rank 0 charged and reported the noise for 0.5: epsilon 3 in the report, no
    # guarantee for the records on rank 1's shard (seen with two torchrun nodes given different overrides).
    same = {"privacy.max_grad_norm": "0.5", "data.manifest_sha256": "abc"}
    gathered = [("/run", same), ("/run", {**same, "privacy.max_grad_norm": "100.0"})]
    for rank, value in enumerate(["0.5", "100.0"]):
        expected = rf"^privacy.max_grad_norm={value} is not allowed: the ranks of this torchrun job disagree \(rank 0: "
        with pytest.raises(ConfigError, match=expected + r"0.5; rank 1: 100.0\)"):
            check_agreement(gathered, rank)
    other_data = [("/run", same), ("/run", {**same, "data.manifest_sha256": "def"})]
    with pytest.raises(ConfigError, match=r"^data.manifest_sha256=abc is not allowed: .*\(rank 0: abc; rank 1: def\)"):
        check_agreement(other_data, 0)
    with pytest.raises(ConfigError, match=r"^hydra.run.dir='/b' is not allowed: the ranks of this torchrun job"):
        check_agreement([("/a", same), ("/b", same)], 1)
    check_agreement([("/run", same), ("/run", dict(same))], 0)  # agreeing ranks pass


def _rank(rank: int, store: str, run_dir: str, view: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_same_job(run_dir, view)
        Path(out).write_text("ok")
    except ConfigError as err:
        Path(out).write_text(str(err))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes: 10-15 s on 2 loaded cores
def test_check_same_job_refuses_on_every_rank_of_a_real_process_group(tmp_path):
    same = {"privacy.max_grad_norm": "0.5", "data.manifest_sha256": "abc"}
    views = [same, {**same, "privacy.max_grad_norm": "100.0"}]
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"rank{r}.txt") for r in range(2)]
    args = [(r, str(tmp_path / "store"), str(tmp_path / "run"), views[r], outs[r]) for r in range(2)]
    procs = [ctx.Process(target=_rank, args=a) for a in args]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    answers = [Path(out).read_text() for out in outs]
    assert answers[0].startswith("privacy.max_grad_norm=0.5 is not allowed: the ranks of this torchrun job disagree")
    assert answers[1].startswith("privacy.max_grad_norm=100.0 is not allowed: the ranks of this torchrun job disagree")


def test_a_taken_rendezvous_port_is_refused_in_one_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^train.distributed.port={port} is not allowed: 127.0.0.1:{port} "):
            _check_port(port)
    _check_port(0)  # a free one, picked per attempt


@pytest.mark.slow  # two torchrun agents, refused once the process group is up: ~40 s on 2 cores
def test_torchrun_nodes_with_different_overrides_are_refused_before_any_charge(tmp_path):
    from tests.test_torchrun import torchrun_nodes

    run_dir = tmp_path / "run"
    common = [*SMALL, f"hydra.run.dir={run_dir}", f"audit.registry_path={tmp_path / 'registry.json'}"]
    nodes = torchrun_nodes(tmp_path, [common, [*common, "privacy.max_grad_norm=100"]], "reach1")
    for rc, _, err in nodes:
        assert rc != 0 and "privacy.max_grad_norm=" in err and "the ranks of this torchrun job disagree" in err
    assert not (run_dir / "report.json").exists() and not (run_dir / "checkpoints" / "last.pt").exists()
    ledgers = tmp_path / "privacy_ledgers"  # this test's store (conftest): opened by rank 0, never charged
    texts = [p.read_text(errors="replace") for p in ledgers.rglob("*.json")]
    assert not any('"kind": "run"' in text or '"kind": "charge"' in text for text in texts)


def test_fp16_under_dp_is_refused_through_fit_before_any_charge(tmp_path):
    # aisec_train.fit trained fp16 under DP and reported epsilon: only the pipeline's preflight refused it.
    from torch.utils.data import DataLoader

    from tests.test_loop import blobs

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    with pytest.raises(ConfigError, match=r"^train.precision='fp16' is not allowed with privacy=dpsgd: its loss "):
        aisec_train.fit(model, DataLoader(blobs(), batch_size=16), ["train.precision=fp16", "train.epochs=1"])
    texts = [p.read_text(errors="replace") for p in (tmp_path / "privacy_ledgers").rglob("*.json")]
    assert not any('"kind": "run"' in text or '"kind": "charge"' in text for text in texts)


def test_the_loop_itself_refuses_fp16_under_dp():
    # Whatever path reaches the loop (a data-parallel rank, a federated client, a caller of train()).
    from aisec_train.models import build_model
    from aisec_train.train.config import PrivacyConfig, TrainConfig
    from aisec_train.train.loop import train
    from tests.test_loop import blobs

    model = build_model("cnn", in_channels=1, num_classes=3, image_size=6)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.2, ema_decay=0.0, precision="fp16")
    privacy = PrivacyConfig(target_epsilon=5.0, delta=1e-3)
    with pytest.raises(ConfigError, match=r"^train.precision='fp16' is not allowed with privacy=dpsgd"):
        train(model, blobs(), train_cfg=cfg, privacy_cfg=privacy, device=torch.device("cpu"), progress=False)


def test_nccl_on_the_cpu_is_refused_before_any_rank_starts():
    # Every rank raised ProcessGroupNCCL's "no GPUs found", and the job ended in an elastic traceback, exit 1.
    from aisec_train.train.distributed import _backend

    with pytest.raises(ConfigError, match=r"^train.distributed.backend='nccl' is not allowed on cpu: NCCL reduces"):
        _backend("nccl", torch.device("cpu"))
    assert _backend("auto", torch.device("cpu")) == "gloo" and _backend("gloo", torch.device("cpu")) == "gloo"


def test_a_taken_master_port_is_one_line_not_a_traceback(torchrun_env):
    # An env:// launch without torchrun's agent store (srun exporting the variables): rank 0 binds MASTER_PORT.
    from aisec_train.train.distributed import _join

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        torchrun_env.setenv("MASTER_PORT", str(port))
        torchrun_env.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        expected = (
            rf"^MASTER_PORT={port} is not allowed: rank 0 could not open the rendezvous store at 127.0.0.1:{port} "
        )
        with pytest.raises(ConfigError, match=expected):
            _join("gloo", torch.device("cpu"))
