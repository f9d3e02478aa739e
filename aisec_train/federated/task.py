"""The federated task without Flower: job file, partitions, one client's local round, update checks.

Flower's app-template split: this module knows PyTorch, the spine's training loop and the CKKS helpers;
``client_app.py`` and ``server_app.py`` only move records between Flower and these functions.

Client state (the DP ledger) lives in client-only files, ``<state_dir>/client_<id>/state.pt``, written
atomically with :mod:`aisec_train.train.checkpoint` after each local round: Flower recreates simulated
clients every round and a resumed job starts a new process, so neither ``context.state`` nor memory
would keep a ledger across an interruption (docs/federated.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from aisec_train.config import Config, to_config
from aisec_train.data.dataset import DataBundle, load_dataset
from aisec_train.data.views import labels_of, subset
from aisec_train.errors import require
from aisec_train.federated import shared
from aisec_train.federated.config import FederatedDP, InjectConfig, dp_level
from aisec_train.federated.partition import Partition, client_partition, partition_labels
from aisec_train.hashing import sha256_bytes
from aisec_train.models.factory import ModelFactory
from aisec_train.privacy.ledger import BudgetExhausted, PrivacyLedger, calibrated_noise
from aisec_train.store.artifacts import is_sha256
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import atomic_write, read_nofollow
from aisec_train.train import checkpoint
from aisec_train.train.config import PrivacyMode
from aisec_train.train.loop import accuracy, resolve_device, sgd, train
from aisec_train.train.objectives import objective_from_config

JOB_FILE = "job.json"
REFUSAL_CODES = {"nan": 1, "norm": 2, "budget": 3}


# ---- the job: one source of truth for both apps ------------------------------------------------------------
def write_job(cfg: Config, path: Path, *, manifest_sha256: str) -> tuple[Path, str]:
    """Freeze the composed config for the apps (no secrets: paths to keys live elsewhere); returns the file and
    the SHA-256 of the bytes written, which both sides' settings carry (``job-sha256``) to pin it."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    data = json.dumps({"config": container, "manifest_sha256": manifest_sha256}, indent=1).encode()
    atomic_write(path, data, root=path.parent)  # a unique temp: two jobs never share one
    return path, sha256_bytes(data)


@lru_cache(maxsize=4)
def load_job(path: str, sha256: str) -> tuple[Config, dict[str, Any]]:
    """The frozen config, once job.json's bytes match the SHA-256 its settings pin: every SuperNode rebuilds its
    privacy mode, defences and model from this file, so an edit (``privacy.mode: none``) is refused, not obeyed."""
    if not is_sha256(sha256):
        raise IntegrityError(f"{path}: no job-sha256 pins it (got {sha256!r}); refusing an unpinned job file")
    data = read_nofollow(path)
    if sha256_bytes(data) != sha256:
        raise IntegrityError(
            f"{path} has SHA-256 {sha256_bytes(data)}, its settings pin {sha256}: refusing an edited job file"
        )
    job = json.loads(data)
    merged = OmegaConf.merge(OmegaConf.structured(Config), job["config"])
    return to_config(merged), job


@dataclass
class FederatedTask:
    """What every client needs: the config, the model factory, the data and each client's share of it.

    In simulation the job builds it once and the apps receive it by closure (Ray ships it to the few actors it
    runs, ``ray_num_cpus / client_cpus`` of them, not one per client); a SuperNode in deployment rebuilds it
    from job.json (:meth:`from_job`). Clients keep index arrays only: a client's data is a ``Subset`` view of
    the shared lazy dataset, built when that client trains and dropped after.
    """

    cfg: Config
    factory: ModelFactory
    data: DataBundle
    partition: Partition  # the training split's client partition (kind, indices, label histograms)
    test_parts: tuple[np.ndarray, ...]  # an IID partition of the test split (seed + 1)

    @classmethod
    def build(cls, cfg: Config, factory: ModelFactory, data: DataBundle, backdoor=None) -> FederatedTask:
        """``backdoor``: the poison stage's BackdoorState; its clients keep exactly the shards it poisoned."""
        fed, seed = cfg.federated, cfg.train.seed
        labels = labels_of(data.train)
        if backdoor is not None and backdoor.client_indices is not None:
            params = {"seed": seed, "source": "the partition the backdoor red team poisoned (client_partition)"}
            partition = Partition.from_indices(labels, backdoor.client_indices, fed.partition.kind.value, params)
        else:
            partition = client_partition(labels, fed, seed)
        n_test = len(data.test)
        ok = fed.clients <= n_test
        require(ok, "federated.clients", fed.clients, f"must be <= the {n_test} test examples (one shard each)")
        test = partition_labels(labels_of(data.test), fed.clients, "iid", seed=seed + 1)
        return cls(cfg, factory, data, partition, test.indices)

    @classmethod
    def from_job(cls, job_path: str, job_sha256: str) -> FederatedTask:
        """A SuperNode's view: data and model rebuilt from the frozen config (no Python objects cross machines),
        once job.json matches its pinned SHA-256; the backdoor red team's poison is deterministic in the config,
        so it is replayed here too."""
        cfg, _ = load_job(job_path, job_sha256)
        data = load_dataset(cfg.dataset, seed=cfg.train.seed)
        normalize = cfg.dataset.normalize
        factory = ModelFactory(
            cfg.model, data.input_shape, data.num_classes, private=cfg.privacy.mode is PrivacyMode.dpsgd,
            normalize=(normalize.mean, normalize.std) if normalize.mean is not None else None,
        )  # fmt: skip
        backdoor = None
        if cfg.backdoor.malicious_clients:
            from aisec_train.backdoor.stage import poison_data

            backdoor = poison_data(cfg, data, factory)
        return cls.build(cfg, factory, data, backdoor)

    @property
    def train_parts(self) -> tuple[np.ndarray, ...]:
        return self.partition.indices

    def initial_model(self) -> nn.Module:
        """The seeded initial global model: the same weights central training would start from."""
        return self.factory(seed=self.cfg.train.seed)

    @property
    def keys(self) -> list[str] | None:
        """The state-dict keys that travel (``model.trainable`` freezes the rest; None: all; shared.py)."""
        if not hasattr(self, "_keys"):
            self._keys = shared.shared_keys(self.initial_model())
        return self._keys

    def global_state(self) -> dict[str, torch.Tensor]:
        """The initial global state: the travelling tensors of the initial model."""
        return shared.restrict(self.initial_model().state_dict(), self.keys)

    def global_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The full model: the global (travelling) tensors merged into the frozen initial base."""
        return shared.merge(self.initial_model(), state, self.keys)

    def client_train(self, partition_id: int) -> Dataset:
        return self.data.training_view(subset(self.data.train, self.train_parts[partition_id]))

    def client_test(self, partition_id: int) -> Dataset:
        """This client's IID shard of the test split: their example-weighted mean is the whole split's accuracy."""
        return subset(self.data.test, self.test_parts[partition_id])


# ---- flat vectors ------------------------------------------------------------------------------------------
def flatten(state: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([v.detach().cpu().double().numpy().ravel() for v in state.values()])


def unflatten(vector: np.ndarray, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, ref in template.items():
        out[key] = torch.as_tensor(vector[offset : offset + ref.numel()], dtype=ref.dtype).reshape(ref.shape)
        offset += ref.numel()
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, the model {offset}")
    return out


def apply_drill(inject: InjectConfig, partition_id: int, server_round: int, delta: np.ndarray) -> np.ndarray:
    """Fault drills from ``federated.inject``: a crash, a NaN update or an over-norm (x1e4) update."""
    if inject.round not in (0, server_round):
        return delta
    if partition_id in inject.crash:
        raise RuntimeError(f"client {partition_id}: injected crash (federated.inject.crash) in round {server_round}")
    if partition_id in inject.nan:
        return np.where(np.arange(delta.size) == 0, np.nan, delta)
    if partition_id in inject.scale:
        return delta * 1e4
    return delta


def faulty_clients(inject: InjectConfig, server_round: int) -> frozenset[int]:
    """The clients whose update ``apply_drill`` corrupts (NaN or x1e4) in ``server_round``: the checklist asks that
    none of them was accepted in it."""
    if inject.round not in (0, server_round):
        return frozenset()
    return frozenset(inject.nan) | frozenset(inject.scale)


def check_update(delta: np.ndarray, max_norm: float) -> str | None:
    """Why an update must be refused (``nan`` or ``norm``), or None. Runs before encryption and on the server."""
    if not np.isfinite(delta).all():
        return "nan"
    if float(np.linalg.norm(delta)) > max_norm:
        return "norm"
    return None


# ---- one client's round ----------------------------------------------------------------------------------
@dataclass
class LocalResult:
    weights: np.ndarray  # the client's new model, flat (float64)
    delta: np.ndarray  # weights - global
    num_examples: int
    metrics: dict[str, float]
    refused: str | None = None


def _state_path(state_dir: Path, partition_id: int) -> Path:
    return Path(state_dir) / f"client_{partition_id}" / "state.pt"


def load_client_state(state_dir: Path, partition_id: int) -> dict[str, Any]:
    path = _state_path(state_dir, partition_id)
    return checkpoint.load(path) if path.exists() else {"ledger": None, "rounds": []}


def _calibrated_ledger(cfg: Config, n: int) -> dict[str, Any]:
    """A fresh ledger whose noise spreads the client's target epsilon over all its rounds x local epochs."""
    fed, priv = cfg.federated, cfg.privacy
    sample_rate = 1.0 / math.ceil(n / fed.batch_size)
    noise = priv.noise_multiplier or calibrated_noise(
        priv.target_epsilon, priv.delta, sample_rate, fed.rounds * fed.local_epochs, priv.accountant.value
    )
    return {
        "accountant": priv.accountant.value,
        "delta": priv.delta,
        "history": [],
        "noise_multiplier": noise,
        "sample_rate": sample_rate,
    }


def local_round(
    task: FederatedTask,
    partition_id: int,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    state_dir: Path,
    threads: int = 1,
) -> LocalResult:
    """Train the global model on this client's partition with the spine's loop (DP-SGD, the client's ledger)."""
    torch.set_num_threads(max(1, threads))
    cfg = task.cfg
    fed = cfg.federated
    train_split = task.client_train(partition_id)
    state = load_client_state(state_dir, partition_id)
    # Record-level DP-SGD with the client's own ledger; dp=client trains plainly and privatizes the update after.
    level = dp_level(fed, cfg.privacy.mode is PrivacyMode.dpsgd)
    private = level is FederatedDP.record
    ledger = state["ledger"] or (_calibrated_ledger(cfg, len(train_split)) if private else None)
    if level is not FederatedDP.none and len(state["rounds"]) >= fed.rounds:
        # Under DP a client trains at most the run's rounds, whatever the server asks: a replayed or extra round
        # spends budget the run's admission never planned (without a target epsilon nothing else stops it). A
        # round a resumed run trains again counts too, as the ledger does (the honest account).
        flat = flatten(global_state)
        return LocalResult(flat, np.zeros_like(flat), len(train_split), {"epsilon": _eps(ledger)}, refused="budget")

    model = task.global_model(global_state)
    seed = cfg.train.seed + 1000 * (partition_id + 1) + server_round  # distinct noise per client and round
    # A local round is a handful of steps: the central run's weight average would drag it back to the global model.
    train_cfg = dataclasses.replace(
        cfg.train,
        epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        lr=fed.lr or cfg.train.lr,
        seed=seed,
        ema_decay=fed.ema_decay,
    )
    started = time.perf_counter()
    try:
        # The client's account continues across its rounds: the loop charges this ledger (a changed delta or
        # accountant is refused here, as for any resumed ledger). Its optimizer starts fresh every round.
        account = _open_ledger(cfg, ledger) if ledger else None
        result = train(
            model,
            train_split,
            train_cfg=train_cfg,
            privacy_cfg=cfg.privacy,
            device=resolve_device(cfg.train.device),
            objective=objective_from_config(cfg.robustness),  # adversarial training runs on every client
            optimizer=_client_optimizer(cfg, train_cfg),
            ledger=account,
            progress=False,
        )
    except BudgetExhausted:
        flat = flatten(global_state)
        return LocalResult(flat, np.zeros_like(flat), len(train_split), {"epsilon": _eps(ledger)}, refused="budget")
    trained = result.model.state_dict()
    new_state = {k: trained[k].detach().cpu() for k in global_state}  # what travels, in the global order
    weights, base = flatten(new_state), flatten(global_state)
    last = result.history[-1] if result.history else {}
    metrics = {
        "train-s": time.perf_counter() - started,
        "train-loss": float(last.get("loss", math.nan)),
        "train-accuracy": float(last.get("train_accuracy", math.nan)),
        "epsilon": result.ledger.epsilon() if result.ledger else 0.0,
        "steps": result.ledger.steps if result.ledger else 0,
    }
    # The ledger is saved whatever happens to the update: the privacy was spent by training.
    state["ledger"] = result.ledger.state_dict() if result.ledger else None
    state["rounds"] = [*state["rounds"], server_round]
    checkpoint.save(state, _state_path(state_dir, partition_id))
    return LocalResult(weights, weights - base, len(train_split), metrics)


def _open_ledger(cfg: Config, state: dict[str, Any]) -> PrivacyLedger:
    """The client's saved (or freshly calibrated) ledger state as a ledger of the run's accountant and delta."""
    ledger = PrivacyLedger(cfg.privacy.accountant.value, cfg.privacy.delta)
    ledger.load_state_dict(state)  # BudgetExhausted on a changed delta or accountant
    return ledger


def _eps(ledger_state: dict[str, Any] | None) -> float:
    if not ledger_state:
        return 0.0
    ledger = PrivacyLedger(ledger_state["accountant"], ledger_state["delta"])
    ledger.load_state_dict(ledger_state)
    return ledger.epsilon()


def client_epsilons(state_dir: Path, clients: int) -> dict[int, dict[str, Any]]:
    """Each client's ledger summary, read from its state file (absent for a client that never trained)."""
    out = {}
    for pid in range(clients):
        state = load_client_state(state_dir, pid)
        if state["ledger"]:
            ledger = PrivacyLedger(state["ledger"]["accountant"], state["ledger"]["delta"])
            ledger.load_state_dict(state["ledger"])
            out[pid] = {**ledger.summary(), "rounds": state["rounds"]}
    return out


def evaluate_local(task: FederatedTask, partition_id: int, global_state: dict[str, torch.Tensor]) -> tuple[float, int]:
    test = task.client_test(partition_id)
    model = task.global_model(global_state)
    return accuracy(model, test, resolve_device(task.cfg.train.device)), len(test)


def _client_optimizer(cfg: Config, train_cfg) -> dict[str, Any]:
    """The run's optimizer config with the client's learning rate (federated.lr, else train.lr)."""
    node = dict(cfg.optimizer or sgd(train_cfg))
    if "lr" in node:
        node["lr"] = train_cfg.lr
    return node
