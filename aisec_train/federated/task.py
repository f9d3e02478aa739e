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
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from aisec_train.config import Config, InjectConfig, PartitionKind, PrivacyMode, to_config
from aisec_train.data.dataset import Split, load_dataset
from aisec_train.models import build_model
from aisec_train.train import checkpoint
from aisec_train.train.ledger import BudgetExhausted
from aisec_train.train.loop import accuracy, build_optimizer, resolve_device, train

JOB_FILE = "job.json"
REFUSAL_CODES = {"nan": 1, "norm": 2, "budget": 3}


# ---- the job: one source of truth for both apps ------------------------------------------------------------
def write_job(cfg: Config, path: Path, *, model_meta: dict[str, Any], manifest_sha256: str) -> Path:
    """Freeze the composed config and the model's shape for the apps (no secrets: paths to keys live elsewhere)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    job = {"config": container, "model": model_meta, "manifest_sha256": manifest_sha256}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(job, indent=1))
    tmp.replace(path)
    return path


@lru_cache(maxsize=4)
def load_job(path: str) -> tuple[Config, dict[str, Any]]:
    job = json.loads(Path(path).read_text())
    merged = OmegaConf.merge(OmegaConf.structured(Config), job["config"])
    return to_config(merged), job


def initial_model(job: dict[str, Any], seed: int) -> nn.Module:
    """The seeded initial global model: the same weights central training would start from."""
    torch.manual_seed(seed)
    return build_model(
        job["model"]["name"], **{k: job["model"][k] for k in ("in_channels", "num_classes", "image_size")}
    )


# ---- partitions ----------------------------------------------------------------------------------------------
def partition_indices(
    labels: np.ndarray, num_clients: int, *, kind: PartitionKind, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Disjoint index sets covering ``labels``: IID (a seeded shuffle) or Dirichlet(alpha) label skew per class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if num_clients * min_size > n:
        raise ValueError(f"{n} examples cannot give {num_clients} clients >= {min_size} each")
    if kind is PartitionKind.iid:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    for _ in range(100):  # redraw until every client has min_size examples (Hsu et al. 2019 recipe)
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"Dirichlet alpha={alpha} left a client under {min_size} examples in 100 draws; raise alpha")


@lru_cache(maxsize=2)
def client_data(job_path: str, partition_id: int) -> tuple[Split, Split]:
    """This client's training partition and its shard of the test split (shards are IID, so their
    example-weighted mean accuracy is the global model's accuracy on the whole test split)."""
    cfg, _ = load_job(job_path)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed)
    fed, seed = cfg.federated, cfg.train.seed
    train_parts = partition_indices(
        data.train.y.numpy(),
        fed.clients,
        kind=fed.partition.kind,
        alpha=fed.partition.alpha,
        seed=seed,
        min_size=fed.partition.min_size,
    )
    test_parts = partition_indices(data.test.y.numpy(), fed.clients, kind=PartitionKind.iid, alpha=1.0, seed=seed + 1)
    take = lambda split, idx: Split(split.x[torch.as_tensor(idx)], split.y[torch.as_tensor(idx)])  # noqa: E731
    return take(data.train, train_parts[partition_id]), take(data.test, test_parts[partition_id])


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
    noise = priv.noise_multiplier or get_noise_multiplier(
        target_epsilon=priv.target_epsilon,
        target_delta=priv.delta,
        sample_rate=sample_rate,
        epochs=fed.rounds * fed.local_epochs,
        accountant=priv.accountant.value,
    )
    return {
        "accountant": priv.accountant.value,
        "delta": priv.delta,
        "history": [],
        "noise_multiplier": noise,
        "sample_rate": sample_rate,
    }


def local_round(
    job_path: str,
    partition_id: int,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    state_dir: Path,
    threads: int = 1,
) -> LocalResult:
    """Train the global model on this client's partition with the spine's loop (DP-SGD, the client's ledger)."""
    torch.set_num_threads(max(1, threads))
    cfg, job = load_job(job_path)
    fed = cfg.federated
    train_split, _ = client_data(job_path, partition_id)
    state = load_client_state(state_dir, partition_id)
    private = cfg.privacy.mode is PrivacyMode.dpsgd
    ledger = state["ledger"] or (_calibrated_ledger(cfg, len(train_split)) if private else None)

    model = initial_model(job, cfg.train.seed)
    model.load_state_dict(global_state)
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
    torch.manual_seed(seed)
    resume = {
        "model": global_state,
        "optimizer": build_optimizer(model, train_cfg).state_dict(),
        "ledger": ledger,
        "history": [],
        "epoch": 0,
        "rng": torch.get_rng_state(),
    }
    started = time.perf_counter()
    try:
        result = train(
            model,
            train_split,
            train_cfg=train_cfg,
            privacy_cfg=cfg.privacy,
            device=resolve_device(cfg.train.device),
            resume=resume,
            progress=False,
        )
    except BudgetExhausted:
        flat = flatten(global_state)
        return LocalResult(flat, np.zeros_like(flat), len(train_split), {"epsilon": _eps(ledger)}, refused="budget")
    new_state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
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


def _eps(ledger_state: dict[str, Any] | None) -> float:
    if not ledger_state:
        return 0.0
    from aisec_train.train.ledger import PrivacyLedger

    ledger = PrivacyLedger(ledger_state["accountant"], ledger_state["delta"])
    ledger.load_state_dict(ledger_state)
    return ledger.epsilon()


def client_epsilons(state_dir: Path, clients: int) -> dict[int, dict[str, Any]]:
    """Each client's ledger summary, read from its state file (absent for a client that never trained)."""
    from aisec_train.train.ledger import PrivacyLedger

    out = {}
    for pid in range(clients):
        state = load_client_state(state_dir, pid)
        if state["ledger"]:
            ledger = PrivacyLedger(state["ledger"]["accountant"], state["ledger"]["delta"])
            ledger.load_state_dict(state["ledger"])
            out[pid] = {**ledger.summary(), "rounds": state["rounds"]}
    return out


def evaluate_local(job_path: str, partition_id: int, global_state: dict[str, torch.Tensor]) -> tuple[float, int]:
    cfg, job = load_job(job_path)
    _, test = client_data(job_path, partition_id)
    model = initial_model(job, cfg.train.seed)
    model.load_state_dict(global_state)
    return accuracy(model, test, resolve_device(cfg.train.device)), len(test)
