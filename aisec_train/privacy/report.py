"""The report's ``privacy`` section and its DP checklist item: one writer for every trainer.

A trainer says what it measured as a :class:`Measured` (the accountant's figures, what they cover, why they may
not be a guarantee); the train stage hands it to :func:`write`. The central and data-parallel trainers' figures
come from their ledger (:func:`from_ledger`); the federated trainer builds its own (record-level: the worst
client's ledger; client-level: the server's DP-FedAvg ledger). No DP at all is ``None``: every figure null and
the item failed.

    write(report, measured)        # the figures, mode, details, randomness, guarantee, and the checklist item
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aisec_train.privacy import claims
from aisec_train.privacy.randomness import describe as describe_randomness
from aisec_train.report.budget_text import records_spent  # the records' composed spend across runs

ITEM = ("training", "differentially private training (DP-SGD)")
FIGURES = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant")


@dataclass(frozen=True)
class Measured:
    """What a trainer measured of its privacy, for the report."""

    figures: dict[str, Any]  # FIGURES: the accountant's (epsilon, delta) and the mechanism it charged
    mode: str  # "dpsgd" (record-level DP-SGD) or "dp-fedavg" (client-level)
    target_epsilon: float | None
    evidence: str  # the checklist item's account of the figures, in words
    details: dict[str, Any] = field(default_factory=dict)  # further keys of the section (scope, per client, ...)
    randomness: dict[str, Any] = field(default_factory=dict)  # where the noise and the sampling came from
    gaps: list[str] = field(default_factory=list)  # why the figures are no DP guarantee (empty: they are one)
    not_covered: list[str] = field(default_factory=list)  # what this trainer's files release beyond claims' list


def write(report: Any, measured: Measured | None) -> None:
    """The ``privacy`` section's figures and the DP checklist item. The store's keys come from the admission
    (privacy/admission.py) and a federated run's ``budget`` from its trainer, both before training."""
    if measured is None:
        report.add("privacy", **dict.fromkeys(FIGURES), mode="none")
        report.check(*ITEM, "fail", "privacy=none: no DP guarantee")
        return
    figures = measured.figures
    target = measured.target_epsilon
    report.add("privacy", **{k: figures[k] for k in FIGURES}, mode=measured.mode, target_epsilon=target)
    report.add("privacy", **measured.details)
    report.add("privacy", randomness=measured.randomness, guarantee=claims.guarantee(measured.gaps))
    # released without noise: treat as the data
    report.add("privacy", not_covered=[*claims.NOT_COVERED, *measured.not_covered])
    within = target is None or figures["epsilon"] <= target + 1e-9
    status, evidence = claims.dp_item(within, measured.evidence + records_spent(report), measured.gaps)
    report.check(*ITEM, status, evidence)


def from_ledger(cfg: Any, result: Any, n_train: int, budget: dict[str, Any] | None) -> Measured:
    """A central or data-parallel run's figures: the ledger of its ``TrainResult`` under ``cfg`` (the whole
    config); ``budget``: the run's account in the dataset ledger, every run on the same data composed."""
    privacy, ledger = cfg.privacy, result.ledger
    figures = ledger.summary()
    evidence = (
        f"({figures['epsilon']:.3f}, {figures['delta']:g})-DP by the {figures['accountant']} accountant over "
        f"{figures['steps']} steps, noise multiplier {figures['noise_multiplier']:.3f}, sample rate "
        f"{figures['sample_rate']:.4f}, clip {privacy.max_grad_norm}; target epsilon {privacy.target_epsilon}"
    )
    return Measured(
        figures,
        "dpsgd",
        privacy.target_epsilon,
        evidence,
        details={
            "max_grad_norm": privacy.max_grad_norm,
            "grad_sample_mode": result.grad_sample_mode,
            "private_step": result.private_step,
            "poisson_sampling": privacy.poisson_sampling,
        }
        | ({"budget": budget} if budget is not None else {}),
        randomness=describe_randomness(privacy, cfg.train.seed),
        gaps=claims.guarantee_gaps(privacy, n_train),  # reproducible noise, delta >= 1/n: no guarantee
    )
