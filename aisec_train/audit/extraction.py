"""Model extraction against the guard, and an honest evaluation of its input sanitisation.

The attacker knows the architecture and holds unlabeled same-domain inputs: one half of the held-out split
(the other half scores the surrogate), expanded to the planned query count by augmentation (one-pixel
shifts plus Gaussian noise, sigma 0.05). It queries the guard in batches until the plan is done or the guard
refuses, then trains a surrogate on what came back: soft cross-entropy on released probabilities (which is
plain cross-entropy when the guard releases labels only).

Sanitisation is evaluated with the same PGD as the rest of the project (:func:`aisec_train.robust.pgd`):
"plain" differentiates straight through the sanitiser (the quantiser's gradient is zero, so this mostly
measures gradient masking) and "adaptive" is BPDA, the identity in place of the quantiser on the backward
pass. Only the adaptive figure is a robustness claim. Both sanitisers are deterministic, so expectation
over transformation has nothing to average and is not run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aisec_train.audit.guard import BudgetExhausted, Guard, QueryRefused, Sanitizer
from aisec_train.config import AttackConfig
from aisec_train.data.dataset import Split
from aisec_train.models import build_model
from aisec_train.robust.attacks import pgd


def attacker_queries(x: Tensor, n: int, seed: int) -> Tensor:
    """``n`` unlabeled inputs from ``x``: the originals first, then shifted and noisy copies."""
    g = torch.Generator().manual_seed(seed)
    reps = [x]
    while sum(len(r) for r in reps) < n:
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        reps.append((shifted + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1))
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


def train_surrogate(
    x: Tensor,
    soft: Tensor,
    *,
    model_name: str,
    num_classes: int,
    epochs: int,
    seed: int,
    device: torch.device | None = None,
) -> nn.Module:
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model = build_model(model_name, in_channels=x.shape[1], num_classes=num_classes, image_size=x.shape[-1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = x.to(device)
    target = (soft / soft.sum(1, keepdim=True).clamp_min(1e-12)).to(device)  # rounding can leave rows != 1
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad(set_to_none=True)
            loss = -(target[idx] * F.log_softmax(model(x[idx]), dim=1)).sum(1).mean()
            loss.backward()
            opt.step()
    return model.eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    a.eval(), b.eval()
    pred_a, pred_b = a(x.to(_device(a))).argmax(1).cpu(), b(x.to(_device(b))).argmax(1).cpu()
    return float((pred_a == pred_b).float().mean())


@torch.no_grad()
def accuracy_on(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x.to(_device(model))).argmax(1).cpu() == y.cpu()).float().mean())


def run_extraction(
    guard: Guard,
    inputs: Tensor,
    victim: nn.Module,
    evaluation: Split,
    *,
    model_name: str,
    num_classes: int,
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
    surrogate = train_surrogate(
        x, out, model_name=model_name, num_classes=num_classes, epochs=epochs, seed=seed, device=_device(victim)
    )
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


def split_heldout(test: Split, seed: int) -> tuple[Tensor, Split]:
    """Attacker half (inputs only) and evaluation half of the held-out split."""
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(test)))
    half = len(test) // 2
    return test.x[perm[:half]], Split(test.x[perm[half:]], test.y[perm[half:]])
