"""Composing a dataset's spend across runs, and the rules on the budget itself (finite target, delta < 1/n).

A history is Opacus' accountant history: a list of ``(noise_multiplier, sample_rate, steps)``. Entries with the
same noise and sample rate are merged before accounting (composition is commutative, so this is exact) which keeps
the PRV accountant fast however many runs and charges a dataset has. Opacus' GDP accountant only reads the last
history entry, which would under-count a composed history, so a GDP ledger with more than one distinct
``(noise, sample rate)`` is composed with RDP instead (a valid, more conservative bound).

    >>> compose_epsilon([(1.1, 0.01, 500), (1.1, 0.01, 300), (2.0, 0.02, 100)], delta=1e-5, accountant="prv")
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aisec_train.errors import ConfigError
from aisec_train.store.timing import timed

if TYPE_CHECKING:  # accounting imports Opacus; the light names of this package must not
    from aisec_train.privacy.accounting import History

ACCOUNTANTS = ("prv", "rdp", "gdp")


def check_entry(entry: object, what: str) -> tuple[float, float, int]:
    """One history entry, validated: finite noise >= 0, sample rate in (0, 1], steps a positive integer."""
    from aisec_train.store.errors import IntegrityError

    ok = isinstance(entry, list | tuple) and len(entry) == 3
    if ok:  # numbers.Real / Integral: numpy scalars are fine, bools are not
        noise, rate, steps = entry
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (noise, rate))
        ok = ok and isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps > 0
        ok = ok and math.isfinite(noise) and noise >= 0 and math.isfinite(rate) and 0 < rate <= 1
    if not ok:
        raise IntegrityError(
            f"{what}: history entry {entry!r} is not (noise_multiplier >= 0, sample_rate in (0, 1], steps > 0)"
        )
    return float(entry[0]), float(entry[1]), int(entry[2])


def merge(history: Iterable[tuple[float, float, int]]) -> History:
    """Sum the steps of entries with equal (noise, sample rate), in first-seen order."""
    totals: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:
        totals[(float(noise), float(rate))] = totals.get((float(noise), float(rate)), 0) + int(steps)
    return [(noise, rate, steps) for (noise, rate), steps in totals.items() if steps > 0]


@timed("budget")
def compose_epsilon(history: Iterable[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of every entry of ``history`` composed (0 for an empty history)."""
    merged = merge(history)
    if not merged:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={accountant!r} is not allowed: one of {ACCOUNTANTS}")
    if any(noise == 0 for noise, _, _ in merged):
        return math.inf  # a step without noise has no finite guarantee
    if accountant == "gdp" and len(merged) > 1:
        accountant = "rdp"
    from aisec_train.privacy.accounting import epsilon

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(GDP accounting|Optimal order).*")
        return epsilon(accountant, merged, delta)


@timed("budget")
def steps_within(
    prior: Iterable[tuple[float, float, int]],
    *,
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    limit: int,
    delta: float,
    accountant: str,
) -> int:
    """The most new steps (0..``limit``) at (noise, sample rate) whose composition with ``prior`` stays within
    ``target_epsilon``: the dataset ledger's look-ahead, never above the exact maximum and at most 0.1% below it
    (:func:`search_steps`)."""
    return search_steps(
        prior, noise_multiplier=noise_multiplier, sample_rate=sample_rate, target_epsilon=target_epsilon,
        limit=limit, delta=delta, accountant=accountant, exact=False,
    )  # fmt: skip


def search_steps(
    prior: Iterable[tuple[float, float, int]],
    *,
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    limit: int,
    delta: float,
    accountant: str,
    exact: bool = True,
) -> int:
    """The one search for a step count that fits a budget: the most new steps (0..``limit``) at (noise, sample
    rate) whose composition with ``prior`` stays within ``target_epsilon``. Never above the exact maximum; the
    exact maximum itself, or (``exact=False``) at most 0.1% below it. It interpolates on epsilon squared (about
    linear in steps) alternating with bisection, so it needs a handful of accountant evaluations where plain
    bisection needs log2(limit), each costly for PRV at large step counts."""
    prior = merge(prior)
    cache: dict[int, float] = {}

    def eps(extra: int) -> float:
        if extra not in cache:
            added = [(noise_multiplier, sample_rate, extra)] if extra > 0 else []
            cache[extra] = compose_epsilon(prior + added, delta=delta, accountant=accountant)
        return cache[extra]

    if limit <= 0 or eps(0) > target_epsilon:
        return 0
    if eps(limit) <= target_epsilon:
        return limit
    lo, hi, interpolate = 0, limit, True  # invariant: eps(lo) <= target < eps(hi)
    while hi - lo > (1 if exact else max(1, hi // 1000)):
        mid = (lo + hi) // 2
        low_sq, high_sq = eps(lo) ** 2, eps(hi) ** 2
        if interpolate and math.isfinite(high_sq) and high_sq > low_sq:
            guess = lo + (hi - lo) * (target_epsilon**2 - low_sq) / (high_sq - low_sq)
            mid = int(min(max(guess, lo + 1), hi - 1))
        lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
        interpolate = not interpolate
    return lo


def check_target_epsilon(value: object, key: str = "privacy.target_epsilon") -> float:
    """A privacy target must be a finite number > 0 (``inf`` or NaN would make any spend pass)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: must be a finite number > 0")
    return float(value)


def check_delta(delta: float, n_train: int, *, reason: str | None = None, key: str = "privacy.delta") -> bool:
    """``delta`` must be in (0, 1) and below 1/n (n = training records) unless ``reason`` records why not.

    Returns True when the override is in use (the caller records ``reason`` in the ledger and the report).
    """
    if not (isinstance(delta, numbers.Real) and not isinstance(delta, bool) and math.isfinite(delta) and 0 < delta < 1):
        raise ConfigError(f"{key}={delta!r} is not allowed: must be in (0, 1)")
    if not isinstance(n_train, numbers.Integral) or isinstance(n_train, bool) or n_train <= 0:
        raise ConfigError(f"training set size {n_train!r} is not allowed: must be a positive integer")
    if delta < 1.0 / n_train:
        return False
    if reason is None or not str(reason).strip():
        raise ConfigError(
            f"{key}={delta!r} is not allowed: must be below 1/n = {1.0 / n_train:.3g} for n={n_train} training records "
            "(a larger delta can release whole records); set privacy.delta_reason to record why, if you must"
        )
    return True
