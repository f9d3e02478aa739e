"""The one training loop: central training, every federated client and adversarial training use it.

A run reads top to bottom: set up (optionally private), resume, then epochs of
``(adversary) -> forward -> backward -> DP step``, stopping before the privacy budget is passed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from aisec_train.config import ConfigError, OptimizerName, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.data.dataset import Split
from aisec_train.train.averaging import WeightAverage
from aisec_train.train.ledger import PrivacyLedger, budget_limit
from aisec_train.train.privacy import make_private, unwrap

Adversary = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    model: nn.Module  # the plain (unwrapped) model
    ledger: PrivacyLedger | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    stopped_by_budget: bool = False
    grad_sample_mode: str | None = None
    world_size: int = 1  # processes that trained this model together (torch.distributed)
    distributed: dict[str, Any] | None = None  # backend and per-rank weight digests (train/distributed.py)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; a CUDA device this machine lacks is refused (ConfigError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={name!r} is not allowed: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer is OptimizerName.adam:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1024) -> float:
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device)
        correct += int((model(x).argmax(1).cpu() == split.y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(split))


def train(
    model: nn.Module,
    data: Split,
    *,
    train_cfg: TrainConfig,
    privacy_cfg: PrivacyConfig,
    device: torch.device,
    adversary: Adversary | None = None,
    resume: dict[str, Any] | None = None,
    eval_split: Split | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data``; ``resume`` is a checkpoint payload from :func:`checkpoint_payload`.

    ``on_epoch_end`` receives the checkpoint payload after each epoch (the caller persists it).
    """
    torch.manual_seed(train_cfg.seed)
    plain = model.to(device)
    optimizer = build_optimizer(plain, train_cfg)
    start_epoch, history = _restore(plain, optimizer, resume)
    average = _weight_average(plain, train_cfg.ema_decay, resume)

    private = privacy_cfg.mode is PrivacyMode.dpsgd
    rank, world = rank_and_world()
    loader = _loader(data, train_cfg, private, start_epoch, rank, world)
    if world > 1:  # Opacus' DPDDP leaves clipping and noise to its distributed optimizer; DDP all-reduces
        model = DPDDP(plain) if private else DDP(plain)
    criterion: nn.Module = nn.CrossEntropyLoss()
    ledger, max_steps, mode = None, math.inf, None
    if private:
        ledger = PrivacyLedger(privacy_cfg.accountant.value, privacy_cfg.delta)
        if resume is not None and resume.get("ledger"):
            ledger.load_state_dict(resume["ledger"])
        dp = make_private(model, optimizer, loader, privacy_cfg, ledger=ledger, epochs=train_cfg.epochs)
        model, optimizer, criterion, loader, mode = dp.model, dp.optimizer, dp.criterion, dp.loader, dp.grad_sample_mode
        max_steps = _step_limit(ledger, privacy_cfg, train_cfg.epochs - start_epoch, len(loader))

    result = TrainResult(plain, ledger, history, grad_sample_mode=mode, world_size=world)
    # The attack needs Opacus' wrapper (to switch its hooks off) but must not run through DDP's reducer.
    attacked = model if private else plain
    step = _Step(model, plain, attacked, optimizer, criterion, device, adversary, ledger, max_steps, average)
    epochs = tqdm(range(start_epoch, train_cfg.epochs), desc="train", disable=not progress, leave=False)
    for epoch in epochs:
        started = time.perf_counter()
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        with physical_batches(loader, optimizer, private, train_cfg.max_physical_batch_size) as batches:
            loss, acc, stopped = _run_epoch(step, batches)
        row = {
            "epoch": epoch + 1,
            "loss": loss,
            "train_accuracy": acc,
            "seconds": time.perf_counter() - started,
        }
        if ledger is not None:
            row.update(epsilon=ledger.epsilon(), steps=ledger.steps)
        if eval_split is not None:
            with average.applied(plain) if average else nullcontext():
                row["test_accuracy"] = accuracy(plain, eval_split, device)
        history.append(row)
        epochs.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "train_accuracy", "epsilon") if k in row})
        result.stopped_by_budget = stopped
        if on_epoch_end is not None:
            complete = stopped or epoch + 1 == train_cfg.epochs
            payload = checkpoint_payload(plain, optimizer, ledger, history, epoch + 1, complete, stopped)
            payload["ema"] = average.state_dict() if average else None
            on_epoch_end(payload)
        if stopped:
            break
    if private:
        model.cleanup()  # remove Opacus' hooks so evaluation and attacks see a plain model
    if average is not None:
        average.copy_to(plain)  # the averaged weights are the run's model
    return result


def _weight_average(model: nn.Module, decay: float, resume: dict[str, Any] | None) -> WeightAverage | None:
    if decay <= 0:
        return None
    average = WeightAverage(model, decay)
    if resume is not None and resume.get("ema"):
        average.load_state_dict(resume["ema"])
    return average


def _step_limit(ledger: PrivacyLedger, cfg: PrivacyConfig, epochs_left: int, steps_per_epoch: int) -> float:
    """The ledger step count training must stop at; refuses (BudgetExhausted) when no step fits."""
    if cfg.target_epsilon is None or epochs_left <= 0:
        return math.inf
    return budget_limit(ledger, cfg.target_epsilon, ledger.steps + epochs_left * steps_per_epoch)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loader(data: Split, cfg: TrainConfig, private: bool, start_epoch: int, rank: int, world: int) -> DataLoader:
    """The logical-batch loader. Opacus turns it into Poisson sampling (sharded across ranks when distributed).

    Each rank gets its own seed so that, under DP, every sample's inclusion is an independent coin flip.
    """
    dataset = TensorDataset(data.x, data.y)
    if world > 1 and not private:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        return DataLoader(dataset, batch_size=max(1, cfg.batch_size // world), sampler=sampler)
    generator = torch.Generator().manual_seed(cfg.seed + start_epoch + 7919 * rank)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator)


def _restore(model: nn.Module, optimizer, resume: dict[str, Any] | None) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint payload into the plain model and optimizer; return (start epoch, history)."""
    if resume is None:
        return 0, []
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    torch.set_rng_state(resume["rng"])
    return resume["epoch"], list(resume["history"])


def physical_batches(loader: DataLoader, optimizer, private: bool, max_physical_batch_size: int):
    """Split logical batches into memory-sized ones (Opacus BatchMemoryManager); a no-op without DP."""
    if not private:
        return nullcontext(loader)
    return BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer)


@dataclass
class _Step:
    """What one optimisation step needs, bundled so the epoch loop stays readable."""

    model: nn.Module  # what is trained: the plain model, or its Opacus / DDP wrapper
    plain: nn.Module  # the bare model (weight averaging reads it)
    attacked: nn.Module  # what the adversary differentiates through
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device
    adversary: Adversary | None
    ledger: PrivacyLedger | None
    max_steps: float
    average: WeightAverage | None


def _run_epoch(step: _Step, batches) -> tuple[float, float, bool]:
    """One pass over ``batches``; returns (mean loss, accuracy, stopped because the budget is spent)."""
    model, optimizer, ledger = step.model, step.optimizer, step.ledger
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches:
        if ledger is not None and ledger.steps >= step.max_steps:
            optimizer.zero_grad(set_to_none=True)  # drop a half-accumulated logical batch: nothing released
            return total_loss / max(1, seen), correct / max(1, seen), True
        steps_before = ledger.steps if ledger is not None else 0
        if len(y) == 0:  # Poisson sampling can draw an empty batch; Opacus still takes its noisy step
            optimizer.step()
        else:
            x, y = x.to(step.device), y.to(step.device)
            if step.adversary is not None:
                x = step.adversary(step.attacked, x, y)
                model.train()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = step.criterion(logits, y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        # With BatchMemoryManager only the last physical batch of a logical batch really steps.
        if step.average is not None and (ledger is None or ledger.steps > steps_before):
            step.average.update(step.plain)
    stopped = ledger is not None and ledger.steps >= step.max_steps
    return total_loss / max(1, seen), correct / max(1, seen), stopped


def checkpoint_payload(model, optimizer, ledger, history, epoch, complete, budget_stopped) -> dict[str, Any]:
    """Everything a resume needs, in types ``torch.load(weights_only=True)`` accepts."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    return {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": inner.state_dict(),
        "ledger": ledger.state_dict() if ledger is not None else None,
        "history": history,
        "epoch": epoch,
        "complete": complete,
        "stopped_by_budget": budget_stopped,
        "rng": torch.get_rng_state(),
    }
