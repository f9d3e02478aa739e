"""Probe the guard the way a careless or abusive client would, and record what it refused.

The deployment checklist item is answered from these refusals (measured), not from the guard's code.

>>> guard_probes(model, x, GuardConfig())["malformed_refused"]  # doctest: +SKIP
7
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aisec_train.audit.config import GuardConfig, OutputPolicy
from aisec_train.audit.guard import Guard, QueryRefused


class ManualClock:
    """A clock the probe advances by hand, so the rate-limit probe does not depend on wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def malformed_queries(x: Tensor) -> dict[str, Any]:
    """Out-of-contract versions of a valid batch ``x`` (N, C, H, W float32 in [0, 1])."""
    return {
        "wrong shape": x[:, :, :-1],
        "missing batch axis": x[0],
        "empty batch": x[:0],
        "float64": x.double(),
        "uint8 array": (x.numpy() * 255).astype(np.uint8),
        "NaN": torch.full_like(x, float("nan")),
        "inf": torch.full_like(x, float("inf")),
        "out of range": x + 2.0,
        "python list": x.tolist(),
    }


def guard_probes(model: nn.Module, x: Tensor, guard_cfg: GuardConfig) -> dict[str, Any]:
    """Send malformed and over-fast queries; count refusals and check a valid query still gets through."""
    if len(x) < 2:  # the rate-limit probe spends a burst of len(x), then asks for 2 after a 2-token refill
        x = x.repeat(2, *([1] * (x.dim() - 1)))[:2]  # (one held-out input used to read as a guard defect)
    guard = Guard(model, input_shape=tuple(x.shape[1:]), cfg=guard_cfg)
    refused: dict[str, str | None] = {}
    for name, bad in malformed_queries(x).items():
        try:
            guard.query("probe", bad)
            refused[name] = None
        except QueryRefused as err:
            refused[name] = str(err)
    valid_answered = len(guard.query("probe", x[:1])) == 1
    # The rate limit this guard is configured with (audit.guard.rate_limit, burst), on a manual clock. Without one
    # (rate_limit=0, unlimited) the deployed guard refuses no over-rate query: the probe then checks the mechanism
    # at PROBE_RATE and records that it is not configured, so the report never calls it a control of this guard.
    configured = guard_cfg.rate_limit > 0
    # A burst beyond PROBE_MAX_BURST is probed at that size (audit.guard.burst is unbounded: 10^9 would be 10^7
    # forward passes); the rate, which decides what an over-rate client gets, is the guard's own.
    rate, burst = (guard_cfg.rate_limit, min(guard_cfg.burst, PROBE_MAX_BURST)) if configured else (PROBE_RATE, len(x))
    clock = ManualClock()
    limit = GuardConfig(output=OutputPolicy.label, query_budget=0, rate_limit=rate, burst=burst)
    limited = Guard(model, input_shape=tuple(x.shape[1:]), clock=clock, cfg=limit)
    _spend(limited, x, burst)  # the whole burst, as fast as a client can send it
    try:
        limited.query("probe", x[:1])
        rate_refused = False
    except QueryRefused:
        rate_refused = True
    back = min(2, burst)
    clock.now += back / rate * (1 + 1e-9)  # that many tokens back (a hair more: (back / rate) * rate may round down)
    recovered = len(limited.query("probe", x[:back])) == back
    return {
        "malformed_sent": len(refused),
        "malformed_refused": sum(v is not None for v in refused.values()),
        "refusals": refused,
        "valid_query_answered": valid_answered,
        "rate_limit": {
            "queries_per_s": rate,
            "burst": burst,
            "configured": configured,
            "configured_burst": guard_cfg.burst if configured else None,
        },
        "rate_limit_refused_burst": rate_refused,
        "rate_limit_recovered": recovered,
    }


PROBE_RATE = 10.0  # queries/s of the mechanism probe when the guard has no rate limit of its own
PROBE_CHUNK = 64  # inputs per query while the probe spends a burst (bounded memory whatever the burst)
PROBE_MAX_BURST = 1024  # the largest burst the probe spends (16 queries of PROBE_CHUNK); the default burst is 1000


def _spend(guard: Guard, x: Tensor, tokens: int) -> None:
    """Spend ``tokens`` of ``guard``'s burst with queries of repeated inputs from ``x`` (at most PROBE_CHUNK each)."""
    while tokens > 0:
        n = min(tokens, PROBE_CHUNK)
        guard.query("probe", x[torch.arange(n) % len(x)])
        tokens -= n
