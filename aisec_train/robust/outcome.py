"""What the attacks of the evaluation ensemble share: their result, argument checks, norms, the sphere start,
and the per-sample state they shrink as samples are fooled.

Every attack of :mod:`aisec_train.robust.evaluation` (APGD-CE, APGD-T, FAB-T, Square) attacks a whole batch at
once and drops a sample from further work as soon as it is misclassified within the radius. No quantity of
these attacks couples samples, so dropping one changes no other sample's trajectory: it only saves work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from aisec_train.errors import require

NORMS = ("linf", "l2")


class AttackResult(NamedTuple):
    """``x_adv``: per sample, an adversarial example if one was found, else the attack's strongest point;
    ``robust``: True where the sample is still classified correctly (False also for clean mistakes)."""

    x_adv: Tensor
    robust: Tensor


def check_attack_args(*, eps: float, norm: str, **counts: int) -> None:
    """One line naming the bad argument and what is allowed (ConfigError: the CLI turns it into exit 2)."""
    require(norm in NORMS, "norm", norm, f"must be one of {', '.join(NORMS)}")
    require(eps > 0, "eps", eps, "must be > 0")
    for name, value in counts.items():
        require(value >= 1, name, value, "must be >= 1")


def check_classes(num_classes: int, needed: int, attack: str) -> None:
    ok = num_classes >= needed
    require(ok, f"{attack} on a model with classes", num_classes, f"needs >= {needed} (its loss reads the top logits)")


def lp_norm(t: Tensor, norm: str) -> Tensor:
    """Per-sample Linf or L2 norm of a batch, shape (N,)."""
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A (N,) tensor viewed so it broadcasts over ``like``'s (N, ...) samples."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def sphere_start(x: Tensor, *, eps: float, norm: str, seed: int) -> Tensor:
    """APGD's and FAB's random start: a random direction scaled onto the ``norm`` sphere of radius ``eps``
    (Linf: uniform noise divided by its largest entry; L2: a normalised Gaussian), clamped to [0, 1].

    APGD's first step is 2 * eps, so it starts on the sphere rather than uniformly inside the ball (the
    project's ``random_start`` kernel); the generator lives on ``x``'s device, so a seed fixes the start
    whichever kernel backend runs the steps.
    """
    gen = generator(seed, x.device)
    if norm == "linf":
        t = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
    else:
        t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return (x + eps * t / (per_sample(lp_norm(t, norm), t) + 1e-12)).clamp(0.0, 1.0)


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


@dataclass
class Rows:
    """Per-sample state of a running attack; ``keep(mask)`` drops the rows whose sample is finished.

    Subclasses declare their tensors as fields; every field is indexed along its first dimension, so a new
    piece of state cannot be forgotten when the batch shrinks.
    """

    idx: Tensor  # each row's position in the attack's input

    def keep(self, mask: Tensor) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[mask])

    def __len__(self) -> int:
        return self.idx.shape[0]
