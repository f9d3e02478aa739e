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
    clock = ManualClock()
    limit = GuardConfig(output=OutputPolicy.label, query_budget=0, rate_limit=10.0, burst=len(x))
    limited = Guard(model, input_shape=tuple(x.shape[1:]), clock=clock, cfg=limit)
    limited.query("probe", x)  # spends the whole burst
    try:
        limited.query("probe", x[:1])
        rate_refused = False
    except QueryRefused:
        rate_refused = True
    clock.now += 0.2  # two tokens back at 10 queries/s
    recovered = len(limited.query("probe", x[:2])) == 2
    return {
        "malformed_sent": len(refused),
        "malformed_refused": sum(v is not None for v in refused.values()),
        "refusals": refused,
        "valid_query_answered": valid_answered,
        "rate_limit": {"queries_per_s": limit.rate_limit, "burst": limit.burst},
        "rate_limit_refused_burst": rate_refused,
        "rate_limit_recovered": recovered,
    }
