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
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from aisec_train.config import OptimizerName, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.data.dataset import Split
from aisec_train.train.averaging import WeightAverage
from aisec_train.train.privacy import PrivacyLedger, budget_limit, make_private, unwrap

Adversary = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    model: nn.Module  # the plain (unwrapped) model
    ledger: PrivacyLedger | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    stopped_by_budget: bool = False
    grad_sample_mode: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    model.to(device)
    optimizer = build_optimizer(model, train_cfg)
    start_epoch, history = _restore(model, optimizer, resume)
    average = WeightAverage(model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
    if average is not None and resume is not None and resume.get("ema"):
        average.load_state_dict(resume["ema"])

    generator = torch.Generator().manual_seed(train_cfg.seed + start_epoch)
    loader = DataLoader(
        TensorDataset(data.x, data.y), batch_size=train_cfg.batch_size, shuffle=True, generator=generator
    )
    criterion: nn.Module = nn.CrossEntropyLoss()
    ledger, max_steps, mode = None, math.inf, None
    private = privacy_cfg.mode is PrivacyMode.dpsgd
    if private:
        ledger = PrivacyLedger(privacy_cfg.accountant.value, privacy_cfg.delta)
        if resume is not None and resume.get("ledger"):
            ledger.load_state_dict(resume["ledger"])
        dp = make_private(model, optimizer, loader, privacy_cfg, ledger=ledger, epochs=train_cfg.epochs)
        model, optimizer, criterion, loader, mode = (
            dp.model,
            dp.optimizer,
            dp.criterion,
            dp.loader,
            dp.grad_sample_mode,
        )
        if privacy_cfg.target_epsilon is not None and start_epoch < train_cfg.epochs:
            planned = ledger.steps + (train_cfg.epochs - start_epoch) * len(loader)
            max_steps = budget_limit(ledger, privacy_cfg.target_epsilon, planned)

    result = TrainResult(unwrap(model), ledger, history, grad_sample_mode=mode)
    step = _Step(model, optimizer, criterion, device, adversary, ledger, max_steps, average)
    epochs = tqdm(range(start_epoch, train_cfg.epochs), desc="train", disable=not progress, leave=False)
    for epoch in epochs:
        started = time.perf_counter()
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
            with average.applied(result.model) if average else nullcontext():
                row["test_accuracy"] = accuracy(model, eval_split, device)
        history.append(row)
        epochs.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "train_accuracy", "epsilon") if k in row})
        result.stopped_by_budget = stopped
        if on_epoch_end is not None:
            complete = stopped or epoch + 1 == train_cfg.epochs
            payload = checkpoint_payload(model, optimizer, ledger, history, epoch + 1, complete, stopped)
            payload["ema"] = average.state_dict() if average else None
            on_epoch_end(payload)
        if stopped:
            break
    if private:
        model.cleanup()  # remove Opacus' hooks so evaluation and attacks see a plain model
    if average is not None:
        average.copy_to(result.model)  # the averaged weights are the run's model
    return result


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

    model: nn.Module
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
                x = step.adversary(model, x, y)
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
            step.average.update(unwrap(model))
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
