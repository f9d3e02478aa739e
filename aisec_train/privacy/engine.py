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
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
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
    sum_backward: bool = False,
) -> PrivateTraining:
    """Wrap model, optimizer and loader with Opacus; the noise comes from the ledger on resume.

    ``noise_generator`` draws the Gaussian noise (privacy/randomness.py: OS entropy unless the debug override); the
    loader's own generator draws the Poisson batches. Always returns the four pieces (Opacus' ghost mode adds a
    criterion, hooks mode does not).

    ``sum_backward`` (train.precision=bf16): the caller backpropagates the *sum* of its rows' losses (its mean
    times the rows), so the per-sample machinery takes each row's gradient as it comes instead of multiplying by
    the batch size, while the optimizer still divides the noisy sum by the expected batch. Why: under a mean loss
    the batch size B (which a record changes under Poisson sampling) enters every gradient before the bf16
    backward rounds it, so one record moved the other records' clipped gradients too (train/precision.py).
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
    reduction = "sum" if sum_backward else "mean"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(reduction=reduction),
            loss_reduction=reduction,
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
    if isinstance(private_loader.batch_sampler, DistributedUniformWithReplacementSampler):
        private_loader.batch_sampler.__class__ = EveryDrawSampler  # a rank's empty draw is a step too (below)
    if sum_backward:  # the step is still the mean over the expected batch (and over data-parallel ranks)
        private_optimizer.loss_reduction = "mean"
        criterion = nn.CrossEntropyLoss()  # the objectives' mean; the loop scales it to the sum it backpropagates
    report = {**bk_report(private_model), "forwards_per_step": forwards}  # "mode": what actually ran
    if mode == "ghost_fsdp":  # Opacus' FSDP module is no GradSampleModule subclass: bk_report cannot tell
        report["mode"] = mode
    return PrivateTraining(private_model, private_optimizer, criterion, private_loader, report["mode"], report)


class EveryDrawSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler (the same coins from the same generator), yielding a rank's empty draw.

    Opacus' own ``__iter__`` skips a draw in which none of the rank's records came up. Then the ranks took
    different numbers of steps: rank 0's k-th step was summed with another rank's k-th *non-empty* draw, a record
    entered a step with more than the charged rate q (given that its shard's draw was not empty), and the step
    count wandered (2 ranks, 48 records, batch 2: 33 and 48 steps in two runs of a plan of 48, against 48 in one
    process). An empty draw is now a step of a zero sum on that rank, as in one process (train/loop.py), so every
    rank takes ``num_batches`` steps an epoch and each global step is one Poisson draw of every record.
    """

    def __iter__(self):
        if self.shuffle:  # the public split of records between ranks, as Opacus draws it
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        indices = indices[self.rank : self.total_size : self.num_replicas]
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)]


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
