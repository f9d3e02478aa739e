"""Fine-tuning after pruning, with the classifier head re-initialised: what removes the backdoor at little cost.

The head is every module that runs after the feature layer (the presets' ``fc1``/``fc2``, a ResNet's ``fc``). It
is re-initialised (seeded), trained at the full learning rate, and the body (everything up to the feature layer) at
``backdoor.finetune_body_lr`` times it, both with weight decay, warmed up over the first 10% of steps and then
cosine-decayed to 0 (:class:`WarmupCosine`).

Why (docs/backdoor.md, "Repair"): the trigger's path on this project's models is spread over the body's channels
and the head's weights, so pruning the dormant channels alone leaves ASR at 1.0 (ANP's perturbation-sensitive
neurons too, measured); full fine-tuning at lr 0.1 removed it, but forgot what 288 trusted samples do not teach
again (digits, non-private: 0.972 -> 0.931). A fresh head has no weight on the trigger's features to start with,
and the clean data never gives it one; the body, at a fifth of the learning rate, keeps its features and still
moves enough for the decay to erase the trigger's response in them. This is the "re-initialise the linear head,
then tune" family of Min et al. 2023 (Feature Shift Tuning, FST).

The default (``backdoor.finetune_head=shift``) is FST itself: only the classifier (the last ``nn.Linear`` after
the feature layer, :func:`classifier`) is re-initialised, and the loss adds ``shift_weight <W, W_old>`` with W held
at the old weight's norm (:class:`~aisec_train.train.objectives.FeatureShift`). A classifier that may not reuse the
old one's directions forces the features to shift, and the trigger's features, entangled with the target class's,
do not survive that. On the natural-patches set a Blended backdoor outlived the whole-head re-initialisation
(ASR 0.13-0.18 after repair) and not FST (0.019-0.036 at alpha 0.05; docs/backdoor.md, "Feature Shift Tuning").
``prune.fine_prune`` falls back to the whole head when FST scores ``shift_max_cost`` below it on held-out trusted
rows (a model whose features cannot shift at the body's lr).

The loop builds the optimizer from a ``_target_`` config over ``model.parameters()`` (one training loop), so the
body's scale travels on the parameters themselves (:data:`LR_SCALE`), read by :class:`ScaledSGD` and removed after.

>>> head = reinit_head(model, "features_out", probe, seed=0)     # ["squeeze", "fc1", "fc2"]
>>> reinit_head(model, "features_out", probe, seed=0, only=[classifier(model, head)])   # ["fc2"]: FST
>>> with lr_scales(model, head, body=0.2):                       # then train with ScaledSGD + WarmupCosine
...     train(model, trusted, optimizer=OPTIMIZER | {...}, scheduler=SCHEDULER, ...)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from aisec_train.backdoor.bake import forward_order
from aisec_train.backdoor.layers import network

LR_SCALE = "_aisec_lr_scale"  # attribute on a parameter: its learning rate is this times the optimizer's lr
OPTIMIZER = "aisec_train.backdoor.retune.ScaledSGD"
SCHEDULER = "aisec_train.backdoor.retune.WarmupCosine"


class ScaledSGD(torch.optim.SGD):
    """SGD whose parameters carrying :data:`LR_SCALE` get ``lr * scale`` (one param group per scale)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        groups: dict[float, list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault(float(getattr(p, LR_SCALE, 1.0)), []).append(p)
        super().__init__(
            [{"params": ps, "lr": lr * scale} for scale, ps in sorted(groups.items())],
            lr=lr, momentum=momentum, weight_decay=weight_decay,
        )  # fmt: skip


class WarmupCosine(LambdaLR):
    """Linear warm-up over ``pct_start`` of ``total_steps``, then cosine to 0; every group keeps its own lr ratio
    (torch's OneCycleLR would set every group to one ``max_lr``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.1):
        warm = max(1, round(pct_start * total_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

        super().__init__(optimizer, factor)


def head_modules(model: nn.Module, path: str, probe: torch.Tensor) -> list[str]:
    """Modules (relative to the user's network) that start after the feature layer's output, in forward order."""
    events = forward_order(model, probe[:2])
    end = next(i for i, e in enumerate(events) if e == ("end", path))
    return list(dict.fromkeys(n for ev, n in events[end + 1 :] if ev == "start" and n))


def classifier(model: nn.Module, head: list[str]) -> str | None:
    """The last ``nn.Linear`` among the ``head`` modules (the one that writes the logits), or None."""
    modules = dict(network(model).named_modules())
    linear = [name for name in head if isinstance(modules[name], nn.Linear)]
    return linear[-1] if linear else None


def reinit_head(
    model: nn.Module, path: str, probe: torch.Tensor, seed: int, only: list[str] | None = None
) -> list[str]:
    """Re-initialise every module after the feature layer that can (``reset_parameters``), or only the modules
    ``only``, seeded without touching the global generator; returns the re-initialised module names."""
    head = head_modules(model, path, probe) if only is None else only
    modules = dict(network(model).named_modules())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in head:
            if hasattr(modules[name], "reset_parameters"):
                modules[name].reset_parameters()
    return head


@contextmanager
def lr_scales(model: nn.Module, head: list[str], body: float) -> Iterator[None]:
    """Inside: parameters outside ``head`` carry :data:`LR_SCALE` = ``body``; removed on exit."""
    modules = dict(network(model).named_modules())
    in_head = {id(p) for name in head for p in modules[name].parameters()}
    tagged = [p for p in network(model).parameters() if id(p) not in in_head]
    for p in tagged:
        setattr(p, LR_SCALE, body)
    try:
        yield
    finally:
        for p in tagged:
            if hasattr(p, LR_SCALE):
                delattr(p, LR_SCALE)
