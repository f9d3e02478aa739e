"""What one training step minimises: the loop calls ``objective(model, attacked, x, y, criterion)``.

An objective returns ``(loss, logits)``: the loss the (private) optimizer steps on, and the logits the loop
counts accuracy from. ``model`` is what is trained (the plain module or its Opacus / DDP wrapper), ``attacked``
is what an adversary may differentiate through (Opacus' hooks are switched off there), and ``criterion`` is the
per-run loss module (Opacus' ghost-clipping wrapper under ``grad_sample_mode=ghost``), which standard objectives
must use so that the private step clips what they compute.

>>> loss, logits = CrossEntropy()(model, model, x, y, nn.CrossEntropyLoss())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Objective(Protocol):
    name: str
    forwards: int  # forward passes of the trained model per step (2: TRADES; per-sample clipping must sum them)

    def __call__(
        self, model: nn.Module, attacked: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module
    ) -> tuple[Tensor, Tensor]: ...


class CrossEntropy:
    """Standard training on the batch as it comes."""

    name, forwards = "standard", 1

    def __call__(self, model, attacked, x, y, criterion):
        logits = model(x)
        return criterion(logits, y), logits


class Adversarial:
    """Adversarial training (PGD-AT, FGSM-RS): replace the batch by ``adversary(attacked, x, y)``, then train."""

    forwards = 1

    def __init__(self, name: str, adversary: Callable[[nn.Module, Tensor, Tensor], Tensor]):
        self.name, self.adversary = name, adversary

    def __call__(self, model, attacked, x, y, criterion):
        x_adv = self.adversary(attacked, x, y)
        model.train()  # the attack ran the model in eval mode
        logits = model(x_adv)
        return criterion(logits, y), logits


class SoftTargets:
    """Distillation to soft labels (the extraction surrogate): cross-entropy against probability rows of ``y``."""

    name, forwards = "soft_targets", 1

    def __call__(self, model, attacked, x, y, criterion):
        logits = model(x)
        target = y / y.sum(1, keepdim=True).clamp_min(1e-12)  # rounding by a guard can leave rows != 1
        return -(target * F.log_softmax(logits, dim=1)).sum(1).mean(), logits


class Distillation:
    """Cross-entropy on the labels plus knowledge distillation from a frozen ``teacher`` (Hinton et al. 2015):
    ``(1 - weight) CE(logits, y) + weight T^2 KL(softmax(teacher / T) || softmax(logits / T))``. The ``T^2`` keeps
    the soft term's gradient on the hard term's scale. Used by Fine-Pruning's fine-tuning (backdoor/prune.py).

    Guarded (``exclude`` a class, ``correct_only``): the soft term leaves out the class ``exclude`` (renormalising
    over the others, so it teaches nothing about that class's probability) and counts only the rows the teacher
    classifies correctly. A backdoored teacher's clean errors and its extra mass lean to the backdoor's target;
    the guarded term passes on the rest of what it knows (docs/backdoor.md, "Guarded distillation").
    """

    name, forwards = "distillation", 1

    def __init__(
        self, teacher: nn.Module, temperature: float, weight: float, exclude: int | None = None, correct_only=False
    ):
        self.teacher, self.temperature, self.weight = teacher, temperature, weight
        self.exclude, self.correct_only = exclude, correct_only

    def __call__(self, model, attacked, x, y, criterion):
        logits = model(x)
        with torch.no_grad():
            teacher = self.teacher(x)
        kl = soft_term(logits, teacher, self.temperature, self.exclude)
        if self.correct_only:
            kl = kl * (teacher.argmax(1) == y).to(kl.dtype)
        hard = criterion(logits, y)
        return (1 - self.weight) * hard + self.weight * self.temperature**2 * kl.mean(), logits


def soft_term(student: Tensor, teacher: Tensor, temperature: float, exclude: int | None) -> Tensor:
    """Per row, ``KL(softmax(teacher / T) || softmax(student / T))`` over every class but ``exclude``."""
    if exclude is not None:
        keep = torch.arange(student.shape[1], device=student.device) != exclude
        student, teacher = student[:, keep], teacher[:, keep]
    soft = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), soft, reduction="none").sum(1)


class UnlabelledDistillation:
    """``inner``'s loss plus distillation's soft term on a batch of unlabelled ``inputs`` drawn each step (as many
    rows as the labelled batch, a generator seeded with ``seed``), the class ``exclude`` left out, weighted as in
    :class:`Distillation`: what a teacher knows about inputs the labelled batch does not cover.

    Fine-Pruning's guarded distillation on a non-private run reads the training split's inputs this way (their
    labels, some of them poisoned, are never read; backdoor/prune.py). ``exclude`` must be the backdoor's suspected
    target: on a triggered input the teacher's mass is there, and leaving it out passes on only the rest."""

    name, forwards = "unlabelled_distillation", 2

    def __init__(self, inner: Objective, teacher: nn.Module, inputs: Tensor, temperature: float, weight: float,
                 exclude: int, seed: int):  # fmt: skip
        self.inner, self.teacher, self.inputs = inner, teacher, inputs
        self.temperature, self.weight, self.exclude = temperature, weight, exclude
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model, attacked, x, y, criterion):
        loss, logits = self.inner(model, attacked, x, y, criterion)
        rows = torch.randint(len(self.inputs), (len(x),), generator=self.generator)
        unlabelled = self.inputs[rows].to(x.device)
        student = model(unlabelled)
        with torch.no_grad():
            teacher = self.teacher(unlabelled)
        kl = soft_term(student, teacher, self.temperature, self.exclude)
        return loss + self.weight * self.temperature**2 * kl.mean(), logits


class BlendedInputs:
    """``inner`` with the trained model reading its inputs blended with noise: each row, with probability 1/2,
    becomes ``(1 - a) x + a k`` for a fresh uniform key ``k`` and ``a ~ U(0, max_weight)`` (a generator seeded
    with ``seed``); the labels and any teacher read the clean rows. The model learns to answer on a blended image
    what the clean image is, so a whole-image blended trigger (Blended's noise key is one such ``k``) loses its
    pull; a backdoored teacher never sees a blended input, so it cannot hand its trigger response back. Used by
    Fine-Pruning's fine-tuning (``backdoor.repair_blend``, backdoor/prune.py; docs/backdoor.md says why)."""

    def __init__(self, inner: Objective, max_weight: float, seed: int, p: float = 0.5):
        self.inner, self.max_weight, self.p = inner, max_weight, p
        self.name, self.forwards = inner.name, inner.forwards
        self.generator = torch.Generator().manual_seed(seed)

    def blend(self, x: Tensor) -> Tensor:
        g, rows = self.generator, x.shape[0]
        chosen = torch.rand(rows, generator=g) < self.p
        weight = (torch.rand(rows, generator=g) * self.max_weight * chosen).to(x.device, x.dtype)
        key = torch.rand(x.shape, generator=g).to(x.device, x.dtype)
        weight = weight.view(-1, *([1] * (x.dim() - 1)))
        return (1 - weight) * x + weight * key

    def __call__(self, model, attacked, x, y, criterion):
        return self.inner(lambda inputs: model(self.blend(inputs)), attacked, x, y, criterion)


ERASE_AREA = (0.02, 0.1)  # the box's share of the image (torchvision's RandomErasing scale, its upper end cut)
ERASE_RATIO = (0.3, 3.3)  # its aspect ratio, log-uniform (RandomErasing's default)


class ErasedInputs:
    """``inner`` with the trained model reading its images with one random box of standard-normal noise: each row,
    with probability ``p``, gets a box covering ``ERASE_AREA`` of it at a random place and aspect ratio, filled
    with N(0, 1) pixels per channel (torchvision's ``RandomErasing(value="random")``); labels and any teacher read
    the clean rows. The model learns that a local high-contrast patch says nothing about the class, so a patch
    trigger (BadNets) and the pull a weak model's mistakes show toward a class on triggered inputs both lose
    their hold. Used by Fine-Pruning's fine-tuning (``backdoor.repair_erase``, backdoor/prune.py; docs/backdoor.md,
    "Erased boxes in the repair").

    Written here rather than as a torchvision transform on the view: ``RandomErasing`` draws from the global
    generator one image at a time, and on the view the teacher would read the erased rows too. This draws a whole
    batch from its own generator (seeded with ``seed``); a box that would not fit is clamped to the image (where
    torchvision retries). Inputs that are not (N, C, H, W) floating images pass through unchanged."""

    def __init__(self, inner: Objective, p: float, seed: int):
        self.inner, self.p = inner, p
        self.name, self.forwards = inner.name, inner.forwards
        self.generator = torch.Generator().manual_seed(seed)

    def erase(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            return x
        g, (n, _, height, width) = self.generator, x.shape
        chosen = torch.rand(n, generator=g) < self.p
        area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(n, generator=g))
        low, high = torch.log(torch.tensor(ERASE_RATIO))
        ratio = torch.exp(low + (high - low) * torch.rand(n, generator=g))
        h = torch.sqrt(area * ratio).round().clamp(1, height)
        w = torch.sqrt(area / ratio).round().clamp(1, width)
        top = (torch.rand(n, generator=g) * (height - h + 1)).floor()
        left = (torch.rand(n, generator=g) * (width - w + 1)).floor()
        rows, cols = torch.arange(height)[None, :], torch.arange(width)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (N, H)
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (N, W)
        box = (in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None])[:, None]  # (N, 1, H, W)
        noise = torch.randn(x.shape, generator=g)
        return torch.where(box.to(x.device), noise.to(x.device, x.dtype), x)

    def __call__(self, model, attacked, x, y, criterion):
        return self.inner(lambda inputs: model(self.erase(inputs)), attacked, x, y, criterion)


class FeatureShift:
    """``inner``'s loss plus ``alpha <W, W_old>`` on the classifier's weight ``W``, held at ``||W_old||`` (projected
    before every step; the caller projects once more after the last): the new classifier is pushed away from the
    compromised one, so the features must shift to serve it (Min et al. 2023, Feature Shift Tuning; their alpha
    0.2). Used by Fine-Pruning's fine-tuning (backdoor/prune.py, ``backdoor.finetune_head=shift``)."""

    name, forwards = "feature_shift", 1

    def __init__(self, inner: Objective, weight: nn.Parameter, original: Tensor, alpha: float):
        self.inner, self.weight, self.alpha = inner, weight, alpha
        self.original, self.norm = original.detach().clone(), float(original.norm())

    def project(self) -> None:
        with torch.no_grad():
            self.weight.mul_(self.norm / float(self.weight.norm().clamp_min(1e-12)))

    def __call__(self, model, attacked, x, y, criterion):
        self.project()
        loss, logits = self.inner(model, attacked, x, y, criterion)
        return loss + self.alpha * (self.weight * self.original).sum(), logits


def correct(logits: Tensor, y: Tensor) -> int:
    """Correct predictions against hard labels, or against the argmax of soft ones."""
    truth = y if y.ndim == 1 else y.argmax(1)
    return int((logits.argmax(1) == truth).sum())


def as_tensor_labels(y) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else torch.as_tensor(y)


def objective_from_config(robustness) -> Objective:
    """The training objective a ``robustness`` config asks for (picklable inputs: rebuilt in every process)."""
    from aisec_train.robust.adversary import adversary_from_config
    from aisec_train.robust.config import RobustMode
    from aisec_train.robust.trades import Trades

    if robustness.mode is RobustMode.trades:
        return Trades.from_config(robustness)
    adversary = adversary_from_config(robustness)
    if adversary is None:
        return CrossEntropy()
    return Adversarial(robustness.mode.value, adversary)
