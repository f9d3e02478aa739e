"""Model extraction against the guard, and an honest evaluation of its input sanitisation.

The attacker knows the architecture and holds unlabeled same-domain inputs: one half of the held-out split
(the other half scores the surrogate), expanded to the planned query count by augmentation (one-pixel
shifts plus Gaussian noise, sigma 0.05). It queries the guard in batches until the plan is done or the guard
refuses, then trains a surrogate on what came back: a fresh model from the run's model factory, trained by the one
loop (:func:`~aisec_train.train.loop.train`) with the :class:`~aisec_train.train.objectives.SoftTargets` objective
(soft cross-entropy on released probabilities, which is plain cross-entropy when the guard releases labels only),
Adam at 3e-3, batch 128, no privacy and no weight averaging. The held-out split is read through bounded samples:
at most ``queries`` attacker inputs and :data:`EVALUATION_SAMPLES` evaluation samples are materialised.

Sanitisation is evaluated with the same PGD as the rest of the project (:func:`aisec_train.robust.pgd`):
"plain" differentiates straight through the sanitiser (the quantiser's gradient is zero, so this mostly
measures gradient masking) and "adaptive" is BPDA, the identity in place of the quantiser on the backward
pass. Only the adaptive figure is a robustness claim. Both sanitisers are deterministic, so expectation
over transformation has nothing to average and is not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from aisec_train.audit.guard import BudgetExhausted, Guard, QueryRefused, Sanitizer
from aisec_train.data.views import Sample, materialize, subset
from aisec_train.robust.attacks import pgd
from aisec_train.robust.config import AttackConfig
from aisec_train.train.config import TrainConfig
from aisec_train.train.loop import train
from aisec_train.train.objectives import SoftTargets

if TYPE_CHECKING:
    from aisec_train.models.factory import ModelFactory

EVALUATION_SAMPLES = 2000  # held-out samples the surrogate is scored on, at most (digits: its 180)
SURROGATE_OPTIMIZER = {"_target_": "torch.optim.Adam", "lr": 3e-3}
SURROGATE_BATCH = 128


def attacker_queries(x: Tensor, n: int, seed: int) -> Tensor:
    """``n`` unlabeled inputs from ``x``: the originals first, then shifted and noisy copies."""
    g = torch.Generator().manual_seed(seed)
    reps, have = [x], len(x)
    if have == 0:  # nothing to expand: the caller needs held-out inputs (audit/stage.py answers not applicable)
        raise ValueError("attacker_queries needs at least one input")
    while have < n:
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        reps.append((shifted + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1))
        have += len(x)
    return torch.cat(reps)[:n].contiguous()


def steal(guard: Guard, client: str, inputs: Tensor, batch_size: int = 100) -> tuple[Tensor, Tensor, str | None]:
    """Query until done or refused; returns (inputs answered, outputs, refusal message or None)."""
    xs, outs = [], []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        try:
            outs.append(guard.query(client, batch))
        except BudgetExhausted as err:
            left = guard.remaining(client) or 0
            if left:  # spend what is left, then stop
                outs.append(guard.query(client, batch[:left]))
                xs.append(batch[:left])
            return torch.cat(xs), torch.cat(outs), str(err)
        except QueryRefused as err:
            return (torch.cat(xs) if xs else inputs[:0]), (torch.cat(outs) if outs else inputs[:0]), str(err)
        xs.append(batch)
    return torch.cat(xs), torch.cat(outs), None


def surrogate_config(epochs: int, seed: int) -> TrainConfig:
    """The surrogate's loop settings: batch 128, Adam's learning rate, no weight averaging (the attacker's recipe)."""
    lr = SURROGATE_OPTIMIZER["lr"]
    return TrainConfig(
        epochs=epochs, batch_size=SURROGATE_BATCH, max_physical_batch_size=SURROGATE_BATCH, lr=lr, seed=seed,
        ema_decay=0.0,
    )  # fmt: skip


def train_surrogate(
    x: Tensor,
    soft: Tensor,
    *,
    factory: ModelFactory,
    epochs: int,
    seed: int,
    device: torch.device | None = None,
) -> nn.Module:
    """A fresh model from ``factory`` distilled on (queries, released outputs) by the one training loop."""
    device = device or torch.device("cpu")
    result = train(
        factory(seed=seed),
        Sample(x, soft.float()),
        train_cfg=surrogate_config(epochs, seed),
        device=device,
        objective=SoftTargets(),
        optimizer=dict(SURROGATE_OPTIMIZER),
        progress=False,
    )
    return result.model.eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted classes, in batches (the evaluation sample may be large images)."""
    model.eval()
    device = _device(model)
    return torch.cat([model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def agreement(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    return float((predictions(a, x) == predictions(b, x)).float().mean())


def accuracy_on(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predictions(model, x) == y.cpu()).float().mean())


def run_extraction(
    guard: Guard,
    inputs: Tensor,
    victim: nn.Module,
    evaluation: Sample,
    *,
    factory: ModelFactory,
    epochs: int,
    seed: int,
    client: str = "attacker",
) -> dict[str, Any]:
    """One attacker: query the guard with ``inputs`` (until refused), train a surrogate, score it."""
    x, out, refusal = steal(guard, client, inputs)
    result: dict[str, Any] = {
        "queries": len(x),
        "planned_queries": len(inputs),
        "stopped_by_guard": refusal is not None,
    }
    if refusal is not None:
        result["refusal"] = refusal
    if len(x) == 0:
        return {**result, "fidelity": None, "surrogate_accuracy": None}
    surrogate = train_surrogate(x, out, factory=factory, epochs=epochs, seed=seed, device=_device(victim))
    return {
        **result,
        "fidelity": agreement(surrogate, victim, evaluation.x),
        "surrogate_accuracy": accuracy_on(surrogate, evaluation.x, evaluation.y),
    }


def sanitizer_robustness(
    model: nn.Module, x: Tensor, y: Tensor, *, bit_depth: int, smoothing: int, attack: AttackConfig, backend: str
) -> dict[str, Any]:
    """Clean and robust accuracy of model, model behind the sanitiser (plain PGD) and under BPDA-PGD."""
    kwargs = dict(
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        norm=attack.norm.value,
        restarts=attack.restarts,
        backend=backend,
    )
    x, y = x.to(_device(model)), y.to(_device(model))
    defended = nn.Sequential(Sanitizer(bit_depth, smoothing), model).eval()
    bpda = nn.Sequential(Sanitizer(bit_depth, smoothing, bpda=True), model).eval()
    return {
        "sanitizer": {"bit_depth": bit_depth, "smoothing": smoothing},
        "attack": {
            "name": "pgd",
            "norm": attack.norm.value,
            "eps": attack.eps,
            "step_size": attack.step_size,
            "steps": attack.steps,
            "restarts": attack.restarts,
        },
        "n_samples": len(y),
        "clean_accuracy_undefended": accuracy_on(model, x, y),
        "clean_accuracy_sanitized": accuracy_on(defended, x, y),
        "robust_accuracy_undefended": accuracy_on(model, pgd(model, x, y, **kwargs), y),
        "robust_accuracy_plain": accuracy_on(defended, pgd(defended, x, y, **kwargs), y),
        "robust_accuracy_adaptive": accuracy_on(defended, pgd(bpda, x, y, **kwargs), y),
        "adaptive_attack": "BPDA (identity backward through the quantiser; no randomness, so no EOT)",
    }


def split_heldout(
    test: Dataset, seed: int, *, attacker_limit: int | None = None, eval_limit: int = EVALUATION_SAMPLES
) -> tuple[Tensor, Sample]:
    """Attacker half (inputs only, at most ``attacker_limit``) and evaluation half (at most ``eval_limit``) of the
    held-out split, materialised as bounded samples."""
    perm = np.random.default_rng(seed).permutation(len(test))  # type: ignore[arg-type]
    half = len(test) // 2  # type: ignore[arg-type]
    attacker_x, _ = materialize(subset(test, perm[:half][:attacker_limit]))
    eval_x, eval_y = materialize(subset(test, perm[half:][:eval_limit]))
    return attacker_x, Sample(eval_x, eval_y)
