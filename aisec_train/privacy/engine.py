"""DP-SGD through Opacus: wrap model, optimizer and loader so every step is charged to the ledger.

The ledger itself (Opacus' accountant plus the noise and sample rate it charges) is in
:mod:`aisec_train.privacy.ledger`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from aisec_train.privacy.ledger import PrivacyLedger, calibrated_noise, check_mechanism
from aisec_train.train.bk import bk_report
from aisec_train.train.bk_engine import BKPrivacyEngine
from aisec_train.train.config import PrivacyConfig


@dataclass
class PrivateTraining:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: DataLoader
    grad_sample_mode: str
    report: dict[str, Any]  # how per-sample gradients are clipped (bk: per layer), for the report


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: PrivacyConfig,
    *,
    ledger: PrivacyLedger,
    epochs: int,
    forwards: int = 1,
    noise_generator: torch.Generator,
) -> PrivateTraining:
    """Wrap model, optimizer and loader with Opacus; the noise comes from the ledger on resume.

    ``noise_generator`` draws the Gaussian noise (privacy/randomness.py: OS entropy unless the debug override); the
    loader's own generator draws the Poisson batches. Always returns the four pieces (Opacus' ghost mode adds a
    criterion, hooks mode does not).
    """
    sample_rate = 1.0 / len(loader)
    check_mechanism(ledger, cfg, sample_rate)  # a resume keeps the mechanism its ledger was charged for
    if ledger.noise_multiplier is None:
        ledger.noise_multiplier = cfg.noise_multiplier or calibrated_noise(
            cfg.target_epsilon, cfg.delta, sample_rate, epochs, cfg.accountant.value
        )
    ledger.sample_rate, ledger.max_grad_norm = sample_rate, cfg.max_grad_norm
    ledger.reproducible_noise = cfg.reproducible_noise
    # BKPrivacyEngine is Opacus' PrivacyEngine plus the one-backward "bk" mode (train/bk_engine.py): the loader,
    # optimizer (noise, scaling) and accountant stay Opacus' own in every mode.
    engine = BKPrivacyEngine(accountant=cfg.accountant.value)
    engine.accountant = ledger.accountant  # every step is charged to the ledger's accountant
    mode = cfg.grad_sample_mode.value
    extra: dict[str, Any] = {}
    if isinstance(model, FSDPModule):  # sharded (train/sharding.py): Opacus clips sharded layers by ghost norms only
        mode = "ghost_fsdp"
    elif mode == "bk" and isinstance(model, DPDDP):  # data-parallel: Opacus' distributed clipping (bk is one process)
        mode = "ghost" if forwards == 1 else "hooks"
    elif mode == "bk":
        extra["bk_fallback"] = "hooks" if forwards > 1 else "ghost"  # ghost cannot clip two forward passes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=cfg.poisson_sampling,
            grad_sample_mode=mode,
            noise_generator=noise_generator,
            **extra,
        )
    if mode in ("ghost", "bk", "ghost_fsdp"):
        private_model, private_optimizer, criterion, private_loader = wrapped
    else:
        private_model, private_optimizer, private_loader = wrapped
        criterion = nn.CrossEntropyLoss()
    # Opacus' secure-mode noise (a sum of four draws, _generate_noise) against the floating-point attack on the
    # Gaussian mechanism; secure_mode itself also needs torchcsprng, which no longer builds (docs/privacy.md).
    private_optimizer.secure_mode = True
    report = {**bk_report(private_model), "forwards_per_step": forwards}  # "mode": what actually ran
    if mode == "ghost_fsdp":  # Opacus' FSDP module is no GradSampleModule subclass: bk_report cannot tell
        report["mode"] = mode
    return PrivateTraining(private_model, private_optimizer, criterion, private_loader, report["mode"], report)


def quiet_known_warnings() -> None:
    """Silence Opacus' per-run warnings about settings chosen on purpose (docs/privacy.md): secure RNG off,
    full backward hooks on input-less modules, the RDP order at the edge of its range."""
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
    logging.getLogger("opacus").setLevel(logging.WARNING)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus' GradSampleModule and (DP)DDP wrappers (parameters are shared)."""
    while True:
        if hasattr(model, "_module"):  # GradSampleModule
            model = model._module
        elif isinstance(model, (DPDDP, DDP)):
            model = model.module
        else:
            return model
