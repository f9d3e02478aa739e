"""A federated run's account in the project's dataset-level privacy ledger (aisec_train/store).

The federation is one run on the dataset. Its spend is what the data as a whole is exposed to:
- record-level DP (``federated.dp=record``): every client runs DP-SGD on its own, disjoint partition, so by
  parallel composition the dataset's spend is the *worst* client's; that client's accountant history is charged;
- client-level DP (``federated.dp=client``): the server's client-level ledger (one subsampled-Gaussian step per
  round). A client-level (epsilon, delta) guarantee covers each record of that client too, so charging it to the
  record-level dataset ledger is sound (and conservative).

Before the first round the planned spend (the smallest partition's plan, or the rounds of the client-level plan)
must fit the dataset's budget with every earlier run composed, or the run is refused in one line; after the last
round the actual spend is charged. A federated run cannot stop half-way through a client's round, so the check is
up front.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aisec_train.federated.client_level import LEDGER_FILE, ClientDPPlan
from aisec_train.federated.task import FederatedTask, _calibrated_ledger, load_client_state
from aisec_train.privacy import DatasetLedger
from aisec_train.store import BudgetError
from aisec_train.train import checkpoint


def planned(task: FederatedTask, plan: ClientDPPlan | None) -> tuple[float, float, int, float, str]:
    """(noise multiplier, sample rate, steps, delta, accountant) of the worst-case planned spend."""
    cfg = task.cfg
    if plan is not None:
        return plan.noise_multiplier, plan.sample_rate, cfg.federated.rounds, plan.delta, plan.accountant
    n = min(len(p) for p in task.partition.indices)  # the smallest shard: the highest sample rate
    ledger = _calibrated_ledger(cfg, n)
    steps = cfg.federated.rounds * cfg.federated.local_epochs * math.ceil(n / cfg.federated.batch_size)
    return ledger["noise_multiplier"], ledger["sample_rate"], steps, ledger["delta"], ledger["accountant"]


def begin(ledger: DatasetLedger, run_id: str, task: FederatedTask, plan: ClientDPPlan | None, n_train: int) -> None:
    """Record the run and refuse it when its planned spend does not fit the dataset's budget."""
    cfg = task.cfg
    noise, rate, steps, delta, accountant = planned(task, plan)
    target = plan.target_epsilon if plan is not None else cfg.privacy.target_epsilon
    scope = cfg.privacy.budget_scope.value

    def admit() -> None:
        if scope == "run":  # charged too: past the dataset's target only on record
            ledger.admit_past_target(run_id, (noise, rate, steps), why=cfg.privacy.budget_reason, own_target=target)
            return
        spent = ledger.steps(run_id)  # a resumed federation has charged its earlier rounds already
        fits = ledger.steps_within(noise_multiplier=noise, sample_rate=rate, limit=steps, target_epsilon=target)
        if spent == 0 and fits < steps:
            raise BudgetError(
                f"privacy budget of dataset {ledger.dataset[:16]}: the federation's planned spend ({steps} steps at "
                f"noise {noise:.3f}, sample rate {rate:.4f}) does not fit what earlier runs left (epsilon "
                f"{ledger.total_epsilon():.3f} spent of {ledger.target_epsilon}); nothing was trained"
            )

    # A new run is admitted inside begin_run, before its budget (if it is the first) is committed: a refused
    # first federation leaves no budget behind. A resumed one is checked again after its invariants.
    resumed = run_id in ledger.runs()
    ledger.begin_run(
        run_id, delta=delta, accountant=accountant, sample_rate=rate, noise_multiplier=noise,
        split_seed=task.data.split_seed, target_epsilon=target, n_train=n_train,
        budget_scope=scope, delta_reason=cfg.privacy.delta_reason, admit=admit,
    )  # fmt: skip
    if resumed:
        admit()


def charge(ledger: DatasetLedger, run_id: str, client_state: Path, server_state: Path, plan, clients: int) -> dict:
    """Charge what was actually spent (the worst client, or the client-level ledger) beyond earlier charges."""
    history = _server_history(server_state) if plan is not None else _worst_client(client_state, clients)
    done = ledger.steps(run_id)
    new, skipped = [], 0
    for noise, rate, steps in history:  # charge only the tail not charged by an earlier (resumed) job
        take = steps - max(0, done - skipped)
        skipped += steps
        if take > 0:
            new.append((noise, rate, take))
    if new:
        ledger.charge(run_id, new)
    return {"charged": new, "dataset_epsilon": ledger.spent_epsilon(run_id)}


def _worst_client(state_dir: Path, clients: int) -> list[tuple[float, float, int]]:
    from aisec_train.privacy.ledger import PrivacyLedger

    worst, worst_eps = [], -1.0
    for pid in range(clients):
        state: dict[str, Any] = load_client_state(state_dir, pid)
        if state["ledger"]:
            ledger = PrivacyLedger(state["ledger"]["accountant"], state["ledger"]["delta"])
            ledger.load_state_dict(state["ledger"])
            if ledger.epsilon() > worst_eps:
                worst, worst_eps = [tuple(e) for e in ledger.accountant.history], ledger.epsilon()
    return worst  # type: ignore[return-value]


def _server_history(state_dir: Path) -> list[tuple[float, float, int]]:
    path = Path(state_dir) / LEDGER_FILE
    if not path.exists():
        return []
    return [tuple(e) for e in checkpoint.load(path)["ledger"]["history"]]  # type: ignore[misc]
