"""Does the guard lower extraction fidelity, and which of its defences does the work?

One attacker plan (the same unlabeled inputs, the same surrogate recipe) is run against four interfaces,
for several attacker seeds, so every defence is judged by a paired difference against the same plan:

- ``undefended``: full probabilities, no budget, every planned query answered;
- ``output_policy_only``: the guard's output policy (label / top-k / rounding / noise) without its budget;
- ``full_probs_same_queries``: full probabilities, cut at the query count the guard allowed;
- ``guarded``: the guard as configured (output policy and budget).

``effects`` are the per-seed fidelity drops (positive: the defence lowered the surrogate's agreement):
the output policy at equal queries, the output policy at the planned queries, the budget alone, and the
whole guard. With a few seeds the spread is wide; the report states the mean, the standard deviation and
in how many seeds the defence lowered fidelity, never a bare difference of two numbers.

>>> compare_guard(model, attacker_x, evaluation, guard_cfg=GuardConfig(), queries=500,  # doctest: +SKIP
...               seeds=[0, 1, 2], factory=run.factory, epochs=30)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from aisec_train.audit.config import GuardConfig, OutputPolicy
from aisec_train.audit.extraction import attacker_queries, run_extraction
from aisec_train.audit.guard import Guard
from aisec_train.data.views import Sample

if TYPE_CHECKING:
    from aisec_train.models.factory import ModelFactory

SETTINGS = ("undefended", "output_policy_only", "full_probs_same_queries", "guarded")
EFFECTS = {  # name: (without the defence, with it)
    "output_policy_at_equal_queries": ("full_probs_same_queries", "guarded"),
    "output_policy_at_planned_queries": ("undefended", "output_policy_only"),
    "budget": ("undefended", "full_probs_same_queries"),
    "guard": ("undefended", "guarded"),
}
OPEN = GuardConfig(output=OutputPolicy.probs, query_budget=0)


def spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": [float(v) for v in arr],
    }


def _one_seed(
    model: nn.Module, inputs: Tensor, evaluation: Sample, guard_cfg: GuardConfig, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    seed = kwargs["seed"]
    shape = tuple(inputs.shape[1:])

    def attack(cfg: GuardConfig, planned: Tensor) -> dict[str, Any]:
        return run_extraction(Guard(model, input_shape=shape, cfg=cfg, seed=seed), planned, model, evaluation, **kwargs)

    guarded = attack(guard_cfg, inputs)
    undefended = attack(OPEN, inputs)
    n = guarded["queries"]
    # Skip runs that would repeat another exactly: no budget refusal, or no output policy to speak of.
    same = undefended if n == len(inputs) else attack(OPEN, inputs[:n]) if n else {"queries": 0, "fidelity": None}
    no_budget = dataclasses.replace(guard_cfg, query_budget=0, rate_limit=0.0)
    policy = guarded if not guarded["stopped_by_guard"] else attack(no_budget, inputs)
    return {"undefended": undefended, "output_policy_only": policy, "full_probs_same_queries": same, "guarded": guarded}


def compare_guard(
    model: nn.Module,
    attacker_x: Tensor,
    evaluation: Sample,
    *,
    guard_cfg: GuardConfig,
    queries: int,
    seeds: list[int],
    factory: ModelFactory,
    epochs: int,
) -> dict[str, Any]:
    """The four settings and the paired effects over ``seeds`` (each seed: new queries, new surrogate init).

    Every surrogate is a fresh model from ``factory`` (the run's model factory: the attacker knows the architecture).
    """
    runs = []
    for seed in seeds:
        inputs = attacker_queries(attacker_x, queries, seed)
        kwargs = dict(factory=factory, epochs=epochs, seed=seed)
        runs.append(_one_seed(model, inputs, evaluation, guard_cfg, **kwargs))
    settings: dict[str, Any] = {}
    for name in SETTINGS:
        per_seed = [r[name] for r in runs]
        settings[name] = {"queries": per_seed[0]["queries"]}
        if all(r["fidelity"] is not None for r in per_seed):
            settings[name]["fidelity"] = spread([r["fidelity"] for r in per_seed])
            settings[name]["surrogate_accuracy"] = spread([r["surrogate_accuracy"] for r in per_seed])
    effects = {}
    for name, (without, with_) in EFFECTS.items():
        if "fidelity" in settings[without] and "fidelity" in settings[with_]:
            before, after = settings[without]["fidelity"]["values"], settings[with_]["fidelity"]["values"]
            gaps = [a - b for a, b in zip(before, after, strict=True)]
            effects[name] = {**spread(gaps), "lowered_in": sum(g > 0 for g in gaps), "seeds": len(gaps)}
    guarded = runs[0]["guarded"]
    return {
        "queries": guarded["queries"],
        "planned_queries": queries,
        "stopped_by_guard": guarded["stopped_by_guard"],
        "refusal": guarded.get("refusal"),
        "seeds": list(seeds),
        "settings": settings,
        "effects": effects,
    }
