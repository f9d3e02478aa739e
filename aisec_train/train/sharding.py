"""``train.distributed.strategy=fsdp``: each data-parallel rank holds a shard of the model (torch's FSDP2).

``ddp`` (the default) keeps a full replica on every rank (Opacus' DPDDP under DP, torch's DDP without). ``fsdp``
shards every layer's parameters, gradients and optimizer state across the ranks with ``fully_shard``, through
Opacus' ``FSDP2Wrapper``; under DP, Opacus clips with ghost norms (``grad_sample_mode="ghost_fsdp"``, the only
per-sample mode Opacus runs on sharded parameters). The mechanism is DPDDP's: one privacy ledger, Opacus'
distributed Poisson sampler at the global rate, the clipped gradients averaged across ranks by the reduce-scatter,
and each rank adds noise to its *own* shard only, so every coordinate gets exactly one Gaussian draw per step
(``FSDPOptimizerFastGradientClipping``). Rank 0 alone charges the ledger and writes checkpoints; the checkpoint,
the weight averaging state and the final model are gathered to full tensors on every rank (a collective:
:func:`gathered`), so checkpoints are the same files a ``ddp`` run writes and resume either way.

What Opacus' FSDP2 path does not support is refused in one line before any work (:func:`check_strategy`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from aisec_train.errors import ConfigError
from aisec_train.hashing import tensor_bytes

STRATEGIES = ("ddp", "fsdp")

# ``cfg`` below is aisec_train/config.py's composed ``Config``, which calls :func:`check_strategy` while it
# validates; it is not imported here, even for annotations, so the two files do not import each other.
Config = Any


class ShardableLoop(Protocol):
    """What :func:`shard` rewires of the loop (train/loop.py's ``Loop`` has it). Named here, not imported, so the
    loop and this module do not import each other (tests/test_import_graph.py)."""

    plain: nn.Module
    model: nn.Module
    base_optimizer: torch.optim.Optimizer


def check_strategy(cfg: Config) -> None:
    """Refuse, in one line, what FSDP2 with Opacus cannot run (each reason is where Opacus or FSDP stops).

    ``train.augmult`` needs hooks mode (train/augmult.py refuses it otherwise), so it falls under the hooks rule."""
    if cfg.train.distributed.strategy != "fsdp":
        return
    from aisec_train.train.config import GradSampleMode, PrivacyMode
    from aisec_train.train.launch import under_torchrun

    t, priv, dp = cfg.train, cfg.privacy, cfg.privacy.mode is PrivacyMode.dpsgd
    refusals = [
        (t.distributed.nproc < 2 and not under_torchrun(), "train.distributed.nproc", t.distributed.nproc,
         "must be >= 2 with train.distributed.strategy=fsdp (or launch under torchrun): one process has nothing "
         "to shard across"),
        (dp and priv.grad_sample_mode is GradSampleMode.hooks, "privacy.grad_sample_mode", "hooks",
         "with train.distributed.strategy=fsdp Opacus clips sharded parameters with ghost norms only "
         "(ghost_fsdp); allowed: bk or ghost (both run as ghost_fsdp)"),
        (dp and _forwards(cfg) > 1, "robustness", cfg.robustness.mode.value,
         "with train.distributed.strategy=fsdp under DP: ghost clipping norms each forward pass on its own, and "
         "this objective feeds every record twice; allowed: strategy=ddp (clips the sum with hooks)"),
        (t.max_physical_batch_size < t.batch_size, "train.max_physical_batch_size", t.max_physical_batch_size,
         f"must be >= train.batch_size={t.batch_size} with train.distributed.strategy=fsdp: every rank must run "
         "the same forward passes (each gathers the shards), so a logical batch is never split"),
    ]  # fmt: skip
    for bad, key, value, allowed in refusals:
        if bad:
            raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _forwards(cfg: Config) -> int:
    from aisec_train.train.objectives import objective_from_config

    return objective_from_config(cfg.robustness).forwards


def shard(loop: ShardableLoop, optimizer_cfg: dict[str, Any], resume: dict[str, Any] | None) -> None:
    """Shard ``loop.plain`` in place; rebuild the optimizer over the sharded parameters, carrying a resumed state.

    ``fully_shard`` replaces every parameter with a sharded ``DTensor``, so the optimizer the loop built (and
    restored from ``resume``) must be rebuilt; a resumed callback state keyed by parameter name (the weight
    average) is sharded the same way."""
    from opacus.utils.fsdp_utils import FSDP2Wrapper

    from aisec_train.components import build

    before = loop.base_optimizer.state_dict()
    FSDP2Wrapper(loop.plain)  # in place: the same module object, now an FSDPModule
    loop.base_optimizer = build(optimizer_cfg, "optimizer", params=loop.plain.parameters())
    params = list(loop.plain.parameters())
    for index, state in before["state"].items():  # full tensors from the checkpoint: keep this rank's shard
        state.update({k: _like(v, params[index]) for k, v in state.items()})
    loop.base_optimizer.load_state_dict(before)
    if resume is not None and resume.get("callbacks"):
        model_state = loop.plain.state_dict()
        resume["callbacks"] = {
            key: _shard_like(state, model_state) if isinstance(state, dict) else state
            for key, state in resume["callbacks"].items()
        }
    loop.model = loop.plain


def _like(value: Any, param: Any) -> Any:
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def _shard_like(state: dict[str, Any], model_state: dict[str, Any]) -> dict[str, Any]:
    return {k: _like(v, model_state[k]) if k in model_state else v for k, v in state.items()}


def gathered(obj: Any) -> Any:
    """``obj`` with every sharded tensor replaced by its full value on the CPU: a collective under FSDP (every rank
    must call it, on the same structure); without sharded tensors, ``obj`` unchanged."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, dict):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(gathered(v) for v in obj)
    return obj


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_digest(model: torch.nn.Module) -> str:
    """SHA-256 of this rank's own shards (differs between ranks: each holds a different slice)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        local = value.to_local() if isinstance(value, DTensor) else value
        digest.update(name.encode())
        digest.update(tensor_bytes(local))
    return digest.hexdigest()
