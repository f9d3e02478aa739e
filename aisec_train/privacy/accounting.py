"""Epsilon of an Opacus accountant history: Opacus' own accountants, with one cost removed.

A history is a list of ``(noise_multiplier, sample_rate, steps)``. Both the run's ledger (``privacy/ledger.py``)
and the dataset's budget store (``privacy/budget.py``) ask for its epsilon, many times a run and mostly with the
same ``(noise, sample rate)``. RDP composes linearly in the steps, so each pair's one-step RDP is computed once per
process; RDP epsilons and the PRV accountant's safe domain are built from it. The numbers are Opacus' own, bit for
bit (tests/test_privacy.py holds them to it). This module depends on Opacus only, so the store does not depend on
the training package.

    >>> epsilon("prv", [(1.1, 0.01, 500)], delta=1e-5)
"""

from __future__ import annotations

import functools
import math

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)

History = list[tuple[float, float, int]]
_GDP_EPS_MAX = 500.0  # the upper end of Opacus' root bracket in gdp.eps_from_mu


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.flags.writeable = False  # shared by every later call
    return rdp


def rdp_epsilon(history: History, delta: float) -> float:
    """Opacus' RDPAccountant.get_epsilon, with each (noise, rate)'s one-step RDP computed once per process: RDP
    composes linearly in the steps (Opacus' own compute_rdp multiplies one step's RDP by them), so the result is
    identical, while the fractional orders' series cost seconds per call at large sample rates and the budget
    look-ahead, every epoch's row and every round's report ask again with the same (noise, rate)."""
    rdp = sum([_rdp_of_one_step(float(noise), float(rate)) * steps for noise, rate, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def prv_epsilon(history: History, delta: float, eps_error: float = 0.01) -> float:
    """Opacus' PRVAccountant.get_epsilon, built from the public functions of ``opacus.accountants.analysis.prv``
    in the accountant's own order (PRVs, safe domain, truncation, discretisation, composition, upper bound), with
    one difference: the safe discretisation domain (Gopi et al. 2021, remark 5.6; Opacus'
    ``compute_safe_domain_size``) is bounded with RDP epsilons from the cached one-step RDP, the same numbers.
    That bound is 90% of a PRV epsilon's time on the default job. No private method of Opacus is overridden."""
    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(rate, noise) for noise, rate, _ in history]
    compositions = [steps for _, _, steps in history]
    total = sum(compositions)
    bound = rdp_epsilon(history, delta_error / 4)
    for noise, rate, _ in history:
        bound = max(bound, rdp_epsilon([(noise, rate, 1)], delta_error / (8 * total)))
    size = max(bound, eps_error) + 3
    mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh_size)
    dprvs = [discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain) for prv in prvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=compositions)
    _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)  # the upper bound, as Opacus returns: a guarantee, not an estimate


def epsilon(accountant: str, history: History, delta: float) -> float:
    """Epsilon at ``delta`` of ``history`` under Opacus' ``accountant`` ("prv", "rdp" or "gdp"); 0 when empty."""
    if not history:
        return 0.0
    if accountant == "rdp":
        return rdp_epsilon(history, delta)
    if accountant == "prv":
        return prv_epsilon(list(history), delta)
    if accountant == "gdp":
        return gdp_epsilon(list(history), delta)
    fresh = create_accountant(accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta=delta))


def gdp_epsilon(history: History, delta: float) -> float:
    """Opacus' GaussianAccountant.get_epsilon (Poisson sampling; like Opacus, it reads only the last entry), where
    Opacus answers. Opacus inverts delta(epsilon; mu) by a root search bracketed in epsilon [0, 500], and raises
    ("f(a) and f(b) must have different signs") when the root lies outside that bracket. delta(epsilon; mu) falls
    as epsilon grows, so outside the bracket the answer is known: if delta(500) is still above ``delta`` (little
    noise: mu of tens or more, or an overflowing mu), no epsilon up to 500 holds, and inf is the honest (and
    conservative) reading, which any finite target refuses; if delta(0) is already at most ``delta`` (mu near 0),
    the mechanism is (0, delta)-DP and 0 is exact."""
    noise, rate, steps = history[-1]
    with np.errstate(over="ignore", invalid="ignore"):  # exp(1 / noise**2) overflows for noise below ~0.04
        mu = gdp_analysis.compute_mu_poisson(steps=steps, noise_multiplier=noise, sample_rate=rate)
        if not np.isfinite(mu) or not gdp_analysis.delta_eps_mu(eps=_GDP_EPS_MAX, mu=mu) <= delta:
            return math.inf
        if gdp_analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:
            return 0.0
    return float(gdp_analysis.eps_from_mu(mu=mu, delta=delta))
