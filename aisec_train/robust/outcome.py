"""What the attacks of the evaluation ensemble share: their result, argument checks, norms, the sphere start,
and the per-sample state they shrink as samples are fooled.

Every attack of :mod:`aisec_train.robust.evaluation` (APGD-CE, APGD-T, FAB-T, Square) attacks a whole batch at
once and drops a sample from further work as soon as it is misclassified within the radius. No quantity of
these attacks couples samples, so dropping one changes no other sample's trajectory: it only saves work.
"""

from __future__ import annotations

import math
import numbers
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


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_attack_args(*, eps: float, norm: str, **counts: int) -> None:
    """One line naming the bad argument and what is allowed (ConfigError: the CLI turns it into exit 2). An inf eps
    reached the kernel's ValueError (a traceback), a string eps a TypeError, a float count ``range()``'s."""
    require(norm in NORMS, "norm", norm, f"must be one of {', '.join(NORMS)}")
    require(_real(eps) and math.isfinite(eps) and eps > 0, "eps", eps, "must be a finite number > 0")
    for name, value in counts.items():
        require(_count(value) and value >= 1, name, value, "must be an integer >= 1")


# The data range every attack projects into (attacks.LO, HI): the loaders scale images to it. RANGE_SLACK lets a
# float file's 1.0000001 through: the clamp moves it by less than the evaluator's distance slack (1e-7 + eps 1e-5).
LO, HI = 0.0, 1.0
RANGE_SLACK = 1e-6


def check_inputs(x: Tensor, y: Tensor | None = None, *, classes: int | None = None) -> None:
    """Attack inputs the eps-ball and the [0, 1] clamp are defined for: finite floating point images in [0, 1]
    (DataError: normalisation belongs in the model, dataset.normalize); integer labels, inside the model's classes.

    Outside [0, 1] every attack's clamp moved the inputs themselves: APGD's candidates left the eps-ball and none
    counted (robust accuracy = clean accuracy on data in [0, 16], the evasion item passed), while PGD's figure was
    that of the clamped images (0.08 for 0.47)."""
    from aisec_train.data.errors import DataError

    if not x.is_floating_point():
        raise DataError(f"attack inputs are {x.dtype}; expected float images in [{LO:g}, {HI:g}] (x.float() / 255)")
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if not (lo >= LO - RANGE_SLACK and hi <= HI + RANGE_SLACK):  # NaN fails both
            if math.isnan(lo) or math.isnan(hi):
                raise DataError(f"attack inputs hold NaN; expected finite images in [{LO:g}, {HI:g}]")
            raise DataError(
                f"attack inputs span [{lo:.4g}, {hi:.4g}]; the attacks' eps-ball and clamp are on the [{LO:g}, {HI:g}] "
                "pixel scale: scale the images to [0, 1] and put any normalisation in the model (dataset.normalize)"
            )
    if y is None:
        return
    ok = not y.is_floating_point() and not y.is_complex() and y.dtype is not torch.bool
    require(ok, "labels dtype", str(y.dtype), "must be an integer dtype (class indices)")
    if classes is not None and y.numel():
        lo, hi = int(y.min()), int(y.max())
        require(lo >= 0 and hi < classes, "labels", [lo, hi], f"must lie in [0, {classes - 1}], the model's classes")


def check_radius(eps: float, norm: str, x: Tensor) -> None:
    """A radius that measures something on [0, 1] images of ``x``'s size: below half the box's diameter (Linf 0.5, L2
    sqrt(D) / 2). At that radius every image's ball holds the all-grey image, so no model is robust to it, and a
    radius in grey levels (8 for 8/255) or on another scale lands there (robust/config.py's MAX_LINF_EPS)."""
    dims = int(x[0].numel()) if len(x) else 1
    limit = 0.5 if norm == "linf" else 0.5 * math.sqrt(dims)
    require(
        eps < limit,
        "eps",
        eps,
        f"must be < {limit:.4g} for {norm} on [0, 1] images of {dims} values (at half the box's diameter every "
        "image's ball holds the all-grey image: no model can be robust); in grey levels, divide by 255",
    )


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
