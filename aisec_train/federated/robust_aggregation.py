"""Robust aggregation against malicious clients, through Flower's own strategies, and what CKKS rules out.

Every defence but FedAvg reads individual updates: a median or trimmed mean compares each coordinate
across clients, Krum measures distances between updates, a server-enforced norm bound measures each
update. Under CKKS the server holds ciphertexts and a key-less context and can only add, so none of them
can run there (:func:`runs_on_ciphertexts` says why, for the report). Clients may clip their own update
before encrypting (the client-side half of ``norm_bound``): that bounds honest clients only, because the
server cannot compute or check an encrypted update's norm, so a malicious client that skips the clip is
neither bounded nor detected. Enforcing it would take zero-knowledge norm proofs (e.g. RoFL, EIFFeL),
which this project does not implement.

On plaintext, :func:`aggregate` applies a defence to flat update vectors (``local - global``) with the
functions Flower's Message-API strategies use (FedAvg's ``aggregate_arrayrecords``, FedMedian's
coordinate-wise median, FedTrimmedAvg's ``trim_mean``, Krum/MultiKrum's ``select_multikrum``), and
:func:`flower_strategy` builds the Flower strategy itself. Median, trimmed mean and Krum ignore example
counts (as Flower's do); FedAvg and ``norm_bound`` weigh by them.

Example::

    step = aggregate("krum", deltas, weights, num_malicious=2)
    ok, why = runs_on_ciphertexts("median")          # (False, "...compares individual updates...")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from aisec_train.errors import require
from aisec_train.federated.client_dp import clip_update

DEFENCES = {
    "fedavg": "example-weighted mean (FedAvg): no defence",
    "median": "coordinate-wise median (FedMedian; Yin et al. 2018)",
    "trimmed_mean": "coordinate-wise mean without the trim_fraction largest and smallest (FedTrimmedAvg)",
    "krum": "the update nearest its n-f-2 neighbours (Krum; MultiKrum with krum_select > 1; Blanchard et al. 2017)",
    "norm_bound": "each update scaled to L2 norm <= bound, then the weighted mean (Sun et al. 2019)",
}
_CKKS = {
    "fedavg": (True, "a weighted sum: clients pre-multiply by their weight and the server adds ciphertexts"),
    "median": (False, "a coordinate-wise median compares individual updates; the server cannot compare ciphertexts"),
    "trimmed_mean": (False, "trimming orders each coordinate across clients; the server cannot compare ciphertexts"),
    "krum": (False, "Krum needs distances between individual updates; the server sees no update and no distance"),
    "norm_bound": (
        False,
        "the server cannot compute or check an encrypted update's norm; clients clip before encrypting, which "
        "bounds honest clients only: a malicious client skips the clip and nothing detects it",
    ),
}
KEY, WEIGHT = "delta", "num-examples"


def runs_on_ciphertexts(defence: str) -> tuple[bool, str]:
    """Whether ``defence`` can protect a CKKS aggregation, and why (one sentence for the report)."""
    _check_name(defence)
    return _CKKS[defence]


def ckks_summary(defences: Sequence[str] = tuple(DEFENCES)) -> dict[str, dict[str, object]]:
    """The report's table: for each defence, whether it runs on ciphertexts and why."""
    return {d: dict(zip(("runs_on_ciphertexts", "why"), runs_on_ciphertexts(d), strict=True)) for d in defences}


def _check_name(defence: str) -> None:
    require(defence in DEFENCES, "federated.defence", defence, f"use one of {list(DEFENCES)}")


def check_defence(
    defence: str, clients: int, *, num_malicious: int = 0, trim_fraction: float = 0.2, norm_bound: float | None = None
) -> None:
    """Refuse a defence that cannot honestly tolerate ``num_malicious`` of ``clients`` updates (one line)."""
    _check_name(defence)
    f = num_malicious
    require(f >= 0, "federated.defence.num_malicious", f, "must be >= 0")
    # FedAvg and norm bounding read no f (a lone update is a valid mean); only the defences that tolerate f need n > f.
    if defence in ("median", "trimmed_mean", "krum"):
        require(f < clients, "federated.defence.num_malicious", f, f"must be in [0, {clients}) for {clients} updates")
    if defence == "median":
        require(2 * f < clients, "federated.defence.num_malicious", f, f"a median needs a majority of {clients} honest")
    if defence == "trimmed_mean":
        require(0 <= trim_fraction < 0.5, "federated.defence.trim_fraction", trim_fraction, "must be in [0, 0.5)")
        cut = int(trim_fraction * clients)
        require(
            cut >= f,
            "federated.defence.trim_fraction",
            trim_fraction,
            f"cuts {cut} of {clients} updates per side, fewer than num_malicious={f}",
        )
    if defence == "krum":
        require(
            clients >= 2 * f + 3, "federated.defence.num_malicious", f, f"Krum needs >= 2f+3 updates, got {clients}"
        )
    if defence == "norm_bound":
        require(norm_bound is not None and norm_bound > 0, "federated.defence.norm_bound", norm_bound, "must be > 0")


def _records(updates: Sequence[np.ndarray], weights: Sequence[float]) -> list[RecordDict]:
    """Flat updates as the RecordDicts Flower's strategies aggregate (one array, one weight each)."""
    return [
        RecordDict(
            {"arrays": ArrayRecord({KEY: Array(np.asarray(u, np.float64))}), "metrics": MetricRecord({WEIGHT: w})}
        )
        for u, w in zip(updates, weights, strict=True)
    ]


def _weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    return aggregate_arrayrecords(_records(updates, weights), WEIGHT)[KEY].numpy()


def aggregate(
    defence: str,
    updates: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    *,
    num_malicious: int = 0,
    trim_fraction: float = 0.2,
    norm_bound: float | None = None,
    krum_select: int = 1,
) -> np.ndarray:
    """Apply ``defence`` to flat plaintext updates; ``weights`` (example counts) matter for fedavg/norm_bound."""
    require(len(updates) >= 1, "updates", len(updates), "at least one update")
    stacked = np.stack([np.asarray(u, np.float64) for u in updates])
    weights = [1.0] * len(updates) if weights is None else [float(w) for w in weights]
    check_defence(
        defence, len(updates), num_malicious=num_malicious, trim_fraction=trim_fraction, norm_bound=norm_bound
    )
    if defence == "fedavg":
        return _weighted_mean(stacked, weights)
    if defence == "median":
        return np.median(stacked, axis=0)  # what FedMedian computes per array
    if defence == "trimmed_mean":
        return np.asarray(trim_mean(stacked, trim_fraction))
    if defence == "krum":
        require(1 <= krum_select <= len(updates), "federated.defence.krum_select", krum_select, "in [1, updates]")
        chosen = select_multikrum(_records(stacked, weights), num_malicious, krum_select)
        return aggregate_arrayrecords(chosen, WEIGHT)[KEY].numpy()
    return _weighted_mean([clip_update(u, norm_bound)[0] for u in stacked], weights)  # norm_bound


def flower_strategy(
    defence: str, *, num_malicious: int = 0, trim_fraction: float = 0.2, krum_select: int = 1, **fedavg_kwargs
) -> FedAvg:
    """Flower's Message-API strategy for ``defence`` (``fedavg_kwargs`` go to FedAvg: fractions, minimums, keys).

    ``norm_bound`` has no Flower strategy: it is :func:`aggregate` (or a client-side clip) before FedAvg.
    """
    _check_name(defence)
    require(defence != "norm_bound", "federated.defence", defence, "norm_bound is a clip before FedAvg, not a strategy")
    if defence == "median":
        return FedMedian(**fedavg_kwargs)
    if defence == "trimmed_mean":
        return FedTrimmedAvg(beta=trim_fraction, **fedavg_kwargs)
    if defence == "krum":
        if krum_select == 1:
            return Krum(num_malicious_nodes=num_malicious, **fedavg_kwargs)
        return MultiKrum(num_malicious_nodes=num_malicious, num_nodes_to_select=krum_select, **fedavg_kwargs)
    return FedAvg(**fedavg_kwargs)
