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

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

History = list[tuple[float, float, int]]


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


class CachedPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant, whose safe discretisation domain (Gopi et al. 2021, remark 5.6; Opacus'
    ``compute_safe_domain_size``) is bounded with two RDP epsilons per call: 90% of a PRV epsilon's time on the
    default job. They come from the cached one-step RDP here, the same numbers; the rest is Opacus' own code."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        total = sum(num_self_compositions)
        composed = [(p.noise_multiplier, p.sample_rate, k) for p, k in zip(prvs, num_self_compositions, strict=True)]
        bound = rdp_epsilon(composed, delta_error / 4)
        for prv in prvs:
            bound = max(bound, rdp_epsilon([(prv.noise_multiplier, prv.sample_rate, 1)], delta_error / (8 * total)))
        size = max(bound, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


def epsilon(accountant: str, history: History, delta: float) -> float:
    """Epsilon at ``delta`` of ``history`` under Opacus' ``accountant`` ("prv", "rdp" or "gdp"); 0 when empty."""
    if not history:
        return 0.0
    if accountant == "rdp":
        return rdp_epsilon(history, delta)
    fresh = CachedPRVAccountant() if accountant == "prv" else create_accountant(accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta=delta))
