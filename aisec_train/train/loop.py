"""The one training loop: central training, every federated client and data-parallel rank, adversarial training,
backdoor fine-tuning and the extraction surrogate all run :func:`train`.

It reads top to bottom: set up (optimizer, optionally private), restore a resume payload, then epochs of
``objective (adversary -> forward -> loss) -> backward -> (DP) step``. What differs between callers is passed in:
the objective (train/objectives.py), the optimizer and scheduler configs, and callbacks (train/callbacks.py) for
the budget stop, weight averaging, numeric health and checkpointing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from aisec_train.components import accepted, build
from aisec_train.data.views import checked_collate, make_loader
from aisec_train.errors import ConfigError, Stopped
from aisec_train.privacy.engine import make_private, unwrap
from aisec_train.privacy.ledger import BudgetExhausted, PrivacyLedger, budget_limit
from aisec_train.privacy.randomness import dp_generators
from aisec_train.store.errors import BudgetError
from aisec_train.train.augmult import AugMult
from aisec_train.train.augmult import install as install_augmult
from aisec_train.train.bk import bk_report
from aisec_train.train.callbacks import (
    BudgetStop,
    Callback,
    ChargeDataset,
    Checkpointing,
    FiniteGuard,
    NonFiniteError,
    SchedulerStep,
    WeightAveraging,
    all_evaluation,
)
from aisec_train.train.config import PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.objectives import CrossEntropy, Objective, correct
from aisec_train.train.precision import Precision
from aisec_train.train.sharding import gathered, shard

NO_PRIVACY = PrivacyConfig(mode=PrivacyMode.none)
HORIZON_ARGS = ("T_max", "total_steps", "total_iters")


@dataclass
class TrainResult:
    model: nn.Module  # the plain (unwrapped) model
    ledger: PrivacyLedger | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    stopped_by_budget: bool = False
    grad_sample_mode: str | None = None
    world_size: int = 1  # processes that trained this model together (torch.distributed)
    distributed: dict[str, Any] | None = None  # backend and per-rank weight digests (train/distributed.py)
    private_step: dict[str, Any] | None = None  # how per-sample gradients were clipped, layer by layer
    # A trainer's own privacy account (privacy/report.py's Measured: the federated trainer's); None: the ledger's.
    privacy: Any = None
    # What a trainer measured beyond the loop (the federated section and its checklist answers), in Report's shape
    # (report.sections, report.checklist): the train stage adds them to the run's report; a trainer never writes it.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)


class RowLosses(nn.Module):
    """A private run's criterion: the batch mean the step differentiates, unchanged (``output``), and each row's
    loss beside it, detached (``rows``), so that the loop can log the loss over the records the step kept."""

    def __init__(self, inner: nn.CrossEntropyLoss):
        super().__init__()
        self.inner = inner
        self.output: torch.Tensor | None = None
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # rows computed only when a loss is not finite
        self.record_means: torch.Tensor | None = None

    @staticmethod
    def fits(criterion: nn.Module) -> bool:
        """A plain mean cross-entropy (bk, hooks): one whose rows' mean is the loss. Opacus' ghost wrapper is not
        wrapped (its own backward; a record whose forward overflows stops a ghost run anyway)."""
        return (
            type(criterion) is nn.CrossEntropyLoss
            and criterion.reduction == "mean"
            and criterion.weight is None
            and not criterion.label_smoothing
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.output = self.inner(logits, target)
        self._inputs = (logits.detach(), target)  # no per-row pass on the ordinary step: see finite_records
        return self.output

    def finite_records(self, records: int) -> torch.Tensor | None:
        """A mask of the ``records`` whose rows' losses are all finite (``train.augmult``: K rows a record, in order);
        ``record_means`` their mean over views. None when the rows do not split into ``records``."""
        if self._inputs is None:
            return None
        logits, target = self._inputs
        rows = F.cross_entropy(logits.float(), target, reduction="none")
        if records == 0 or rows.numel() % records:
            return None
        rows = rows.view(records, -1)
        kept = torch.isfinite(rows).all(1)
        self.record_means = torch.where(kept[:, None], rows, 0.0).mean(1)
        return kept


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


def sgd(cfg: TrainConfig) -> dict[str, Any]:
    """The optimizer config of a run that names none: SGD with ``train.lr``, momentum and weight decay."""
    return {"_target_": "torch.optim.SGD", "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}


@torch.no_grad()
def accuracy(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1024, workers: int = 0
) -> float:
    return evaluate(model, dataset, device, batch_size, workers)[0]


def evaluate(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1024, workers: int = 0
) -> tuple[float, int]:
    """Accuracy on ``dataset``, and how many of its records got a non-finite output (finite weights can still
    overflow: a private step drops the records whose forward does, so a model that overflows on every record trains
    on, on noise alone, and only its outputs show it)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    hits, seen, non_finite = 0, 0, 0
    for x, y in make_loader(dataset, batch_size=batch_size, workers=workers, device=device):
        logits = model(x.to(device, non_blocking=True))
        hits += correct(logits, torch.as_tensor(y).to(device))
        non_finite += int((~torch.isfinite(logits.detach().reshape(len(logits), -1))).any(1).sum())
        seen += len(x)
    model.train(was_training)
    return hits / max(1, seen), non_finite


def check_outputs_finite(non_finite: int, n_test: int, lr: float) -> None:
    """Refuse a model whose outputs overflow on at least half the test split: broken, though its weights are finite
    (a private step drops each record whose forward overflows, so such a model trains on, on noise alone). Fewer
    are a few extreme inputs, not a broken model: counted in ``metrics.non_finite_test_outputs``, each a miss."""
    if non_finite and 2 * non_finite >= n_test:
        raise NonFiniteError(
            f"the trained model's outputs are non-finite on {non_finite} of {n_test} test records, though its "
            "weights are finite (under DP each record whose forward overflows is dropped from its step, so such a "
            f"model trains on, on noise alone; train.lr={lr:g}); model.pt is not written and the steps taken are "
            "charged. Lower train.lr or check the data"
        )


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    train_cfg: TrainConfig,
    privacy_cfg: PrivacyConfig = NO_PRIVACY,
    device: torch.device,
    objective: Objective | None = None,
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    resume: dict[str, Any] | None = None,
    eval_dataset: Dataset | None = None,
    persist=None,
    spend=None,
    ledger: PrivacyLedger | None = None,
    workers: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``dataset`` (items ``(image, label)``); ``resume`` is a payload from a checkpoint.

    ``optimizer`` / ``scheduler`` are ``_target_`` configs (default: SGD from ``train_cfg``; no schedule);
    ``persist(payload)`` is called after each epoch with everything a resume needs; ``spend`` (privacy/spend.py) is
    the run's account in the dataset-level ledger, charged before each checkpoint. Under DP, ``ledger`` is the
    account this training continues and charges (a federated client's, across its rounds; its noise may be set
    already); without it the loop opens a fresh one, or continues the resume payload's. Not both.
    """
    if ledger is not None and resume is not None and resume.get("ledger"):
        raise ValueError("train() takes a ledger or a resume payload holding one, not both")
    objective = objective or CrossEntropy()
    if train_cfg.augmult > 1:  # K augmented views per record, one clipped gradient each (train/augmult.py)
        objective = AugMult(objective, train_cfg.augmult, flip=train_cfg.augmult_flip)
    loop = Loop(model, dataset, train_cfg, privacy_cfg, device, objective, workers, progress, spend, ledger)
    extras: list[Callback] = [FiniteGuard()]
    if train_cfg.ema_decay > 0:
        extras.append(WeightAveraging(train_cfg.ema_decay))
    if scheduler:
        extras.append(SchedulerStep(lambda opt: _scheduler(scheduler, opt, loop.planned_steps)))
    extras += list(callbacks)
    if spend is not None and privacy_cfg.mode is PrivacyMode.dpsgd:
        extras.append(ChargeDataset(spend))  # before the checkpoint: the ledger never falls behind it
    if persist is not None:
        extras.append(Checkpointing(persist))
    return loop.run(optimizer or sgd(train_cfg), extras, resume, eval_dataset)


def _scheduler(node: dict[str, Any], optimizer: torch.optim.Optimizer, planned_steps: int):
    from aisec_train.components import check_target

    target = check_target(node, "scheduler", supplied=("optimizer", *HORIZON_ARGS))
    horizon = {k: max(1, planned_steps) for k in accepted(target, HORIZON_ARGS) if k not in node}
    return build(node, "scheduler", optimizer=optimizer, **horizon)


class Loop:
    """The state of one training run; :meth:`run` is the loop itself."""

    def __init__(self, model, dataset, train_cfg, privacy_cfg, device, objective, workers, progress, spend, ledger):
        self.plain = model.to(device)
        self.model: nn.Module = self.plain  # what is trained: the plain model or its Opacus / DDP wrapper
        self.dataset, self.cfg, self.privacy, self.device = dataset, train_cfg, privacy_cfg, device
        self.objective, self.workers, self.progress = objective, workers, progress
        self.private = privacy_cfg.mode is PrivacyMode.dpsgd
        self.rank, self.world = rank_and_world()
        self.given_ledger = ledger  # the account to continue (train's ``ledger``), opened in _setup under DP
        self.ledger: PrivacyLedger | None = None
        self.callbacks: list[Callback] = []
        self.history: list[dict[str, Any]] = []
        self.epoch, self.start_epoch, self.steps = 0, 0, 0
        self.last_loss: float | None = None  # the step's loss as logged (under DP: over its finite rows, below)
        self.batch_loss_finite = True  # the objective's own loss of the last step was finite (FiniteGuard)
        self.stopped_by_budget = False
        self.resumed = self.resumed_stop = False  # resumed from a checkpoint; one that had stopped at the budget
        self.planned_steps = 0
        self.spend = spend
        self.noise_generator: torch.Generator | None = None  # under DP: the Gaussian noise's (privacy/randomness.py)
        self.amp = Precision(train_cfg.precision, device)  # train.precision (train/precision.py)

    # ---- set-up ------------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        """The logical-batch loader. Opacus turns it into Poisson sampling (sharded across ranks when distributed).

        Under DP its generator draws the Poisson coins: secret (privacy/randomness.py), each rank its own, so every
        sample's inclusion is an independent coin flip nobody can replay from ``train.seed``.
        """
        cfg, pin = self.cfg, self.device.type == "cuda"
        common = dict(num_workers=self.workers, pin_memory=pin, collate_fn=checked_collate)
        if self.world > 1 and not self.private:
            if cfg.batch_size % self.world:  # each rank takes an equal share: another global batch would train
                raise ConfigError(
                    f"train.batch_size={cfg.batch_size} is not allowed with {self.world} data-parallel ranks and "
                    f"privacy=none: each rank takes batch_size / {self.world} records a step, so "
                    f"{max(1, cfg.batch_size // self.world) * self.world} would train; allowed: a multiple of "
                    f"{self.world}"
                )
            sampler = DistributedSampler(
                self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed
            )
            return DataLoader(self.dataset, batch_size=max(1, cfg.batch_size // self.world), sampler=sampler, **common)
        if self.private:
            self.noise_generator, generator = dp_generators(
                self.privacy.reproducible_noise, cfg.seed + self.start_epoch, self.rank, self.device
            )
        else:
            generator = torch.Generator().manual_seed(cfg.seed + self.start_epoch + 7919 * self.rank)
        return DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator, **common)

    def _setup(self, optimizer_cfg: dict[str, Any], resume: dict[str, Any] | None) -> tuple[DataLoader, Any]:
        self.base_optimizer = build(optimizer_cfg, "optimizer", params=self.plain.parameters())
        self._restore(resume)
        loader = self._loader()
        if self.world > 1 and self.cfg.distributed.strategy == "fsdp":  # each rank a shard (train/sharding.py)
            shard(self, optimizer_cfg, resume)
        elif self.world > 1:  # Opacus' DPDDP leaves clipping and noise to its distributed optimizer; DDP all-reduces
            self.model = DPDDP(self.plain) if self.private else DDP(self.plain)
        self.optimizer, self.criterion, self.mode, self.private_step = (
            self.base_optimizer,
            nn.CrossEntropyLoss(),
            None,
            None,
        )
        if self.private:
            self.ledger = self.given_ledger or PrivacyLedger(self.privacy.accountant.value, self.privacy.delta)
            if resume is not None and resume.get("ledger"):
                self.ledger.load_state_dict(resume["ledger"])
            if self.spend is not None:  # privacy.fit_to_budget: noise calibrated to the dataset's remainder
                self.spend.fit(self.ledger, self.privacy, len(loader), self.cfg.epochs)
            dp = make_private(
                self.model, self.base_optimizer, loader, self.privacy, ledger=self.ledger, epochs=self.cfg.epochs,
                forwards=self.objective.forwards, noise_generator=self.noise_generator,
                sum_backward=self.amp.sum_backward(self.private),
            )  # fmt: skip
            self.model, self.optimizer, self.criterion, loader = dp.model, dp.optimizer, dp.criterion, dp.loader
            if self.cfg.augmult > 1:  # each record's K view-rows averaged before clipping
                install_augmult(self.optimizer, self.cfg.augmult)
            self.mode, self.private_step = dp.grad_sample_mode, dp.report
            if RowLosses.fits(self.criterion):  # the logged loss leaves out the records the step drops
                self.criterion = RowLosses(self.criterion)
            self.amp.check_private_step(self.mode, self.world, dp.report.get("fallback"))
        self.planned_steps = self.cfg.epochs * len(loader)
        return loader, self.optimizer

    def _restore(self, resume: dict[str, Any] | None) -> None:
        if resume is None:
            return
        self.plain.load_state_dict(resume["model"])
        self.base_optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        self.start_epoch, self.history = resume["epoch"], list(resume["history"])
        self.steps = int(resume.get("steps") or 0)  # the trackers' step axis goes on where the checkpoint left it
        self.resumed, self.resumed_stop = True, bool(resume.get("stopped_by_budget"))

    def _budget(self, loader: DataLoader) -> None:
        """Under DP: stop before the step that would pass the run's target or the dataset's budget (every run on
        the same data composed); refuse before any step when none fits. Data-parallel ranks all take rank 0's
        answer (or its refusal), so they stop at the same step."""
        epochs_left = self.cfg.epochs - self.start_epoch
        if self.ledger is None or epochs_left <= 0:
            return
        limit, error = math.inf, None
        try:
            limit = self._limit(epochs_left * len(loader))
        except (BudgetExhausted, BudgetError) as err:
            # A resumed run that already stopped at its budget, or whose ledger charged steps its lost last
            # checkpoint held, finishes with what it has (nothing new trained) instead of being refused forever.
            # Without a checkpoint (deleted, or none yet) nothing is kept: refused.
            reconciled = self.spend is not None and self.spend.reconciled > 0
            finishing = self.resumed and (self.resumed_stop or reconciled)
            limit, error = (self.ledger.steps, None) if finishing else (limit, err)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank alike
            error = err
        if self.world > 1:  # every rank takes rank 0's limit and its ledger (reconciled on resume)
            shared = [limit, error, list(self.ledger.accountant.history)]
            dist.broadcast_object_list(shared, src=0)
            limit, error, self.ledger.accountant.history = shared
        if error is not None:
            raise error
        self.stopped_by_budget = limit <= self.ledger.steps
        self.callbacks.insert(0, BudgetStop(limit))

    def _limit(self, planned: int) -> float:
        assert self.ledger is not None
        limit = self.spend.begin(self.ledger, planned) if self.spend is not None else math.inf
        if self.privacy.target_epsilon is not None:
            run_limit = budget_limit(self.ledger, self.privacy.target_epsilon, self.ledger.steps + planned)
            limit = min(limit, run_limit)
        return limit

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self, optimizer_cfg, callbacks, resume, eval_dataset) -> TrainResult:
        torch.manual_seed(self.cfg.seed)
        loader, _ = self._setup(optimizer_cfg, resume)
        self.callbacks = list(callbacks)
        self._budget(loader)
        for cb in self.callbacks:
            if cb.key and resume is not None and (resume.get("callbacks") or {}).get(cb.key) is not None:
                cb.load_state_dict(resume["callbacks"][cb.key], self.plain)
            cb.on_train_start(self)
        first = self.cfg.epochs if self.stopped_by_budget else self.start_epoch  # no step fits: train nothing
        epochs = tqdm(range(first, self.cfg.epochs), desc="train", disable=not self.progress, leave=False)
        try:
            self._epochs(loader, epochs, eval_dataset)
        except BaseException as err:  # Ctrl-C, SIGTERM, a non-finite stop, a bug: every step taken is charged
            try:
                self._stopped(err)
            except Stopped as late:  # a signal that came with another error (a torchrun peer that stopped first
                self._stopped(late)  # closes the collective under this rank): charge again, now unstoppable
                raise late from err
            raise
        if self.private:
            self.private_step = {**(self.private_step or {}), **bk_report(self.model)}  # the methods that ran
            self.model.cleanup()  # remove Opacus' hooks so evaluation and attacks see a plain model
        for cb in self.callbacks:
            cb.on_train_end(self)
        return TrainResult(
            self.plain, self.ledger, self.history, self.stopped_by_budget, self.mode, self.world,
            private_step=self.private_step,
        )  # fmt: skip

    def _epochs(self, loader: DataLoader, epochs, eval_dataset) -> None:
        for self.epoch in epochs:
            started = time.perf_counter()
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(self.epoch)
            loss, acc = self._run_epoch(loader)
            row = {
                "epoch": self.epoch + 1,
                "loss": loss,
                "train_accuracy": acc,
                "seconds": time.perf_counter() - started,
            }
            if self.ledger is not None:
                row.update(epsilon=self.ledger.epsilon(), steps=self.ledger.steps)
            if eval_dataset is not None:
                with all_evaluation(self.callbacks, self.plain):
                    row["test_accuracy"] = accuracy(self.plain, eval_dataset, self.device, workers=self.workers)
            self.history.append(row)
            epochs.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "train_accuracy", "epsilon") if k in row})
            for cb in self.callbacks:
                cb.on_epoch_end(self, row)
            if self.stopped_by_budget:
                break

    def _stopped(self, err: BaseException) -> None:
        """Training ended by ``err`` part-way: each callback does what a stop needs (the dataset ledger charges
        every step taken, train/callbacks.py's ChargeDataset); a signal's one line then says what was taken."""
        said = [s for cb in self.callbacks if (s := cb.on_train_stopped(self))]
        # The run's own training (the one that checkpoints), not an audit's shadow or surrogate model's loop
        if isinstance(err, Stopped) and any(isinstance(cb, Checkpointing) for cb in self.callbacks):
            # DP: the ledger's steps (Opacus' accountant) include a resumed run's
            taken = f"{self.ledger.steps} private" if self.ledger is not None else f"{self.steps}"
            err.where = (
                ", ".join([f" in epoch {self.epoch + 1} with {taken} step(s) taken in all", *said])
                + "; the last good checkpoint is kept and no model is released"
            )

    def _batches(self, loader: DataLoader):
        """Split logical batches into memory-sized ones (Opacus BatchMemoryManager); a no-op without DP."""
        if not self.private:
            return nullcontext(loader)
        return BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=self.cfg.max_physical_batch_size, optimizer=self.optimizer
        )

    def _run_epoch(self, loader: DataLoader) -> tuple[float, float]:
        """One pass; returns (mean loss, accuracy). Stops early when a callback says so (budget)."""
        self.model.train()
        total, averaged, hits, seen = 0.0, 0, 0, 0  # the loss's sum over its rows; hits over the records drawn
        attacked = self.model if self.private else self.plain  # the attack must not run through DDP's reducer
        with self._batches(loader) as batches:
            for x, y in batches:
                if any(cb.before_step(self) for cb in self.callbacks):
                    self.optimizer.zero_grad(
                        set_to_none=True
                    )  # drop a half-accumulated logical batch: nothing released
                    break
                steps_before = self.ledger.steps if self.ledger is not None else self.steps
                if len(y) == 0:  # Poisson sampling can draw an empty batch; Opacus still takes its noisy step
                    # Cleared first, as every step is: the last step's clipped sum, still marked processed, made
                    # Opacus refuse the step ("Gradients haven't been cleared"), a traceback part-way through a run.
                    self.optimizer.zero_grad(set_to_none=True)
                    for p in self.plain.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)  # Opacus' accumulation reads a gradient even here
                            p.grad_sample = p.new_zeros((0, *p.shape))  # hooks mode clips 0 per-sample rows
                    self.optimizer.step()
                else:
                    x, y = x.to(self.device, non_blocking=True), torch.as_tensor(y).to(self.device)
                    self.optimizer.zero_grad(set_to_none=True)
                    with self.amp.autocast():  # the forward only: params, clipping, noise stay fp32
                        loss, logits = self.objective(self.model, attacked, x, y, self.criterion)
                    self.amp.backward(loss, rows=len(y) * self.cfg.augmult, private=self.private)
                    self.amp.step(self.optimizer)
                    value = float(loss.detach())
                    self.batch_loss_finite = math.isfinite(value)
                    kept = None if self.batch_loss_finite else self._kept_records(loss, len(y))
                    if kept is None:
                        self.last_loss = value
                        total, averaged = total + value * len(y), averaged + len(y)
                        hits += correct(logits.detach(), y)
                    else:  # a dropped record: left out of the loss, a miss in the accuracy (its logits are NaN)
                        if kept.any():  # none kept: logged as an empty batch is (the last value stays)
                            self.last_loss = float(self.criterion.record_means[kept].mean())
                            total, averaged = total + self.last_loss * int(kept.sum()), averaged + int(kept.sum())
                        hits += correct(logits.detach()[kept], y[kept])
                    seen += len(y)
                # With BatchMemoryManager only the last physical batch of a logical batch really steps.
                stepped = self.ledger.steps > steps_before if self.ledger is not None else True
                if stepped:
                    self.steps += 1
                    for cb in self.callbacks:
                        cb.after_step(self)
        # No record kept in the whole epoch (under DP every one drawn overflowed): its loss is undefined, NaN, not
        # the 0.000 that read as a perfect fit in the progress bar and the trackers' epoch axis
        return (total / averaged if averaged else math.nan), hits / max(1, seen)

    def _kept_records(self, loss: torch.Tensor, records: int) -> torch.Tensor | None:
        """Under DP, after a non-finite batch loss: which records the logged loss and accuracy count (a mask).

        A record whose forward overflows is dropped from the private step (train/bk.py, train/bk_engine.py), and
        a NaN in metrics.csv, the trackers and the progress bar at exactly the steps and epochs that drew it told
        when the secret Poisson draws picked it. So the logs average the records whose loss is finite, as the step
        does; how many were left out is logged nowhere (an un-noised count): the accuracy still counts every record
        drawn, a dropped one as a miss. None: no such mask (not private, or an objective whose loss is not the
        criterion's mean, e.g. TRADES, whose NaN stays: docs/privacy.md)."""
        if not (self.private and isinstance(self.criterion, RowLosses) and loss is self.criterion.output):
            return None
        return self.criterion.finite_records(records)

    def _rng_state(self) -> torch.Tensor:
        """The global generator's state a resume continues from.

        Under DP not the live one: augmentation, augmult's views and dropout draw from it per record loaded, so how
        far it has run from ``torch.manual_seed(train.seed)`` counts the records the secret Poisson draws put in
        batches (a checkpoint gave their exact sum, epoch by epoch). A resume continues from a state the seed and
        the epoch fix instead, public like the rest of the global stream (docs/privacy.md).
        """
        if not self.private:
            return torch.get_rng_state()
        return torch.Generator().manual_seed(self.cfg.seed + self.epoch + 1).get_state()

    def payload(self) -> dict[str, Any]:
        """Everything a resume needs, in types ``torch.load(weights_only=True)`` accepts."""
        complete = self.stopped_by_budget or self.epoch + 1 == self.cfg.epochs
        state = {
            "model": {k: v.detach().cpu() for k, v in unwrap(self.plain).state_dict().items()},
            "optimizer": self.base_optimizer.state_dict(),
            "ledger": self.ledger.state_dict() if self.ledger is not None else None,
            "history": self.history,
            "epoch": self.epoch + 1,
            "steps": self.steps,  # optimizer steps taken so far (the trackers' step axis, continued on resume)
            "complete": complete,
            "stopped_by_budget": self.stopped_by_budget,
            "rng": self._rng_state(),
            "callbacks": {cb.key: cb.state_dict() for cb in self.callbacks if cb.key and hasattr(cb, "state_dict")},
        }
        return gathered(state)  # sharded (strategy=fsdp): full tensors, a collective every rank joins
