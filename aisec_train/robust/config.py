"""The schema of the ``robustness`` group: adversarial training and the evaluation suite of every report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aisec_train.errors import require

from .sampling import parse_eval_samples


class Norm(Enum):
    linf = "linf"
    l2 = "l2"


class RobustMode(Enum):
    none = "none"
    pgd_at = "pgd_at"  # Madry et al. 2018
    fgsm_rs = "fgsm_rs"  # Wong et al. 2020, fast adversarial training
    trades = "trades"  # Zhang et al. 2019: CE + beta * KL(f(x) || f(x_adv))


EVAL_SUITES = ("apgd", "autoattack", "pgd")

# Default L-inf radius per dataset on the [0, 1] pixel scale (docs/robustness.md): the values the literature
# evaluates at (MNIST 0.3, CIFAR-10 8/255); digits' 8x8, 17-level images get 0.1, as do unknown npz sets;
# natural-image folders and custom datasets get CIFAR's 8/255.
DEFAULT_EPS = {
    "digits": 0.1,
    "mnist": 0.3,
    "fashion_mnist": 0.1,
    "cifar10": 8 / 255,
    "synthetic": 0.1,
    "npz": 0.1,
    "imagefolder": 8 / 255,
    "custom": 8 / 255,
}


# TRADES' trade-off: Zhang et al. use 1 to 6; a beta near float32's range overflows the loss (CE + beta * KL).
MAX_TRADES_BETA = 1000.0
# An Linf radius on the [0, 1] pixel scale below this: at 0.5 every image's ball holds the same all-grey image, so no
# classifier can be robust and the figure measures nothing; a radius in grey levels (8 for 8/255) is the usual slip.
MAX_LINF_EPS = 0.5
# Attack budgets: PGD-1000 and 10-restart evaluations are the literature's largest; the restarts of a batch run as one
# forward (the evaluation batch repeated `restarts` times), so 10^6 of them failed to allocate after training.
MAX_STEPS = 10_000
CIFAR_RADIUS = {Norm.linf: "8/255", Norm.l2: "0.5"}  # RobustBench's, quoted where a radius must be given
MAX_RESTARTS = 100


def _radius_ok(value: float | None) -> bool:
    """null (derived) or a finite number > 0: an inf radius ran, and the report passed an evasion control at it."""
    return value is None or (math.isfinite(value) and value > 0)


def _check_radius(key: str, eps: float | None, norm: Norm) -> None:
    """An Linf radius is on the [0, 1] pixel scale: below 0.5 (:data:`MAX_LINF_EPS`). An L2 radius depends on the
    image size and is checked against it where the data is known (robust/outcome.py::check_radius)."""
    if eps is None or norm is not Norm.linf:
        return
    require(
        eps < MAX_LINF_EPS,
        key,
        eps,
        f"an Linf radius on the [0, 1] pixel scale must be < {MAX_LINF_EPS:g} (at 0.5 every image's ball holds the "
        "same grey image: no model can be robust); in grey levels, divide by 255 (8 levels: 0.03137)",
    )


def _check_budget(prefix: str, steps: int, restarts: int | None = None) -> None:
    require(1 <= steps <= MAX_STEPS, f"{prefix}.steps", steps, f"must be in [1, {MAX_STEPS}]")
    if restarts is not None:
        ok = 1 <= restarts <= MAX_RESTARTS
        require(ok, f"{prefix}.restarts", restarts, f"must be in [1, {MAX_RESTARTS}] (they run as one batch)")


def _pgd_step(eps: float, steps: int) -> float:
    return 2.5 * eps / steps  # Madry et al.: enough to cross the ball from any start within the steps


@dataclass
class AttackConfig:
    """The evaluation attacks' radius and budget; stronger than the training attack by default."""

    norm: Norm = Norm.linf
    eps: float | None = None  # None: the training radius (robustness.eps)
    step_size: float | None = None  # PGD only; None: 2.5 * eps / steps
    steps: int = 20
    restarts: int = 2

    def __post_init__(self) -> None:
        require(_radius_ok(self.eps), "robustness.attack.eps", self.eps, "must be a finite number > 0, or null")
        ok = _radius_ok(self.step_size)
        require(ok, "robustness.attack.step_size", self.step_size, "must be a finite number > 0, or null")
        _check_budget("robustness.attack", self.steps, self.restarts)
        _check_radius("robustness.attack.eps", self.eps, self.norm)


@dataclass
class RobustnessConfig:
    mode: RobustMode = RobustMode.none  # adversarial training: none, pgd_at, fgsm_rs or trades
    norm: Norm = Norm.linf
    eps: float | None = None  # training attack radius; None: DEFAULT_EPS of the dataset
    step_size: float | None = None  # None: 2.5 * eps / steps (pgd_at, trades), 1.25 * eps (fgsm_rs)
    steps: int = 7
    beta: float = 6.0  # TRADES' trade-off between natural and robust error (Zhang et al.: 6 on CIFAR-10)
    backend: str = "auto"  # kernel backend: auto, triton or torch
    evaluate: bool = True  # robust accuracy in every report
    eval: str = "apgd"  # the evaluation suite: apgd (APGD-CE + APGD-T), autoattack (standard ensemble) or pgd
    # A seeded, class-stratified sample of the test split, with the robust accuracy's 95% Clopper-Pearson interval
    # in the report (robust/sampling.py): keeps the evaluation to a fraction of training (200: about 0.15 of the
    # default job's, whose split has 360; the interval is about +-6.5 points wide at 0.3); `all` (or 0): every
    # sample. Issue 24, docs/robustness.md "What the default evaluation costs".
    eval_samples: Any = 200
    attack: AttackConfig = field(default_factory=AttackConfig)

    def __post_init__(self) -> None:
        require(_radius_ok(self.eps), "robustness.eps", self.eps, "must be a finite number > 0, or null")
        ok = _radius_ok(self.step_size)
        require(ok, "robustness.step_size", self.step_size, "must be a finite number > 0, or null")
        _check_budget("robustness", self.steps)
        _check_radius("robustness.eps", self.eps, self.norm)
        self._check_default_radius()
        require(0 <= self.beta <= MAX_TRADES_BETA, "robustness.beta", self.beta, f"must be in [0, {MAX_TRADES_BETA:g}]")
        ok = self.backend in ("auto", "triton", "torch")
        require(ok, "robustness.backend", self.backend, "must be auto, triton or torch")
        require(self.eval in EVAL_SUITES, "robustness.eval", self.eval, f"must be one of {', '.join(EVAL_SUITES)}")
        try:
            parse_eval_samples(self.eval_samples)
        except ValueError:
            require(False, "robustness.eval_samples", self.eval_samples, "must be a count >= 1, or all (0: all)")

    def _check_default_radius(self) -> None:
        """A null radius takes the dataset's default, an Linf radius (DEFAULT_EPS); ``robustness.attack.eps: null``
        takes the training radius, in the training norm. Either read as an L2 radius measured nothing: an L2
        evaluation of digits at 0.1 (an eighth of the Linf 0.1 ball's reach) passed the evasion item at 0.31 where
        Linf 0.1 left 0.0 (docs/robustness.md, "Per-dataset default radius")."""
        if self.eps is None and self.norm is Norm.l2 and self.mode is not RobustMode.none:
            require(
                False,
                "robustness.eps",
                None,
                "must be set with robustness.norm=l2: the per-dataset defaults are Linf radii; give an L2 radius "
                "(RobustBench's for CIFAR-10 is 0.5)",
            )
        a = self.attack
        if a.eps is not None:
            return
        inherited = self.norm if self.eps is not None else Norm.linf  # what robustness.eps (or its default) measures
        if a.norm is not inherited:
            given = (
                f"robustness.eps={self.eps} is an {inherited.value} radius"
                if self.eps is not None
                else "the per-dataset default (robustness.eps=null) is an Linf radius"
            )
            require(
                False,
                "robustness.attack.eps",
                None,
                f"must be set with robustness.attack.norm={a.norm.value}: a null radius takes the training radius, and "
                f"{given}; give an {a.norm.value} radius (RobustBench's for CIFAR-10: {CIFAR_RADIUS[a.norm]})"
                + (
                    f", or robustness.attack.norm={inherited.value} to attack at the training radius"
                    if self.eps
                    else ""
                ),
            )

    def resolve(self, dataset: str) -> None:
        """Fill every null radius and step from the dataset, so later stages read plain numbers."""
        if self.eps is None:
            self.eps = DEFAULT_EPS.get(dataset, 8 / 255)
        if self.step_size is None:
            self.step_size = 1.25 * self.eps if self.mode is RobustMode.fgsm_rs else _pgd_step(self.eps, self.steps)
        if self.attack.eps is None:
            self.attack.eps = self.eps
        if self.attack.step_size is None:
            self.attack.step_size = _pgd_step(self.attack.eps, self.attack.steps)


def training_attack(rob: RobustnessConfig) -> dict[str, Any] | None:
    """The attack adversarial training actually ran (the report's ``train.adversarial_attack``): FGSM-RS takes one
    step whatever ``robustness.steps`` says (Wong et al. 2020), so the report says 1, not the unused setting."""
    if rob.mode is RobustMode.none:
        return None
    steps = 1 if rob.mode is RobustMode.fgsm_rs else rob.steps
    attack = {"norm": rob.norm.value, "eps": rob.eps, "step_size": rob.step_size, "steps": steps}
    if rob.mode is RobustMode.fgsm_rs:
        attack["random_start"] = True
    if rob.mode is RobustMode.trades:
        attack["beta"] = rob.beta
    return attack


def check_backend(backend: str, device: Any) -> None:
    """Before training: ``robustness.backend=triton`` must be able to run where the attacks will run (CUDA, or
    Triton's CPU interpreter under TRITON_INTERPRET=1). Unchecked, the first attack raised a traceback mid-run:
    in training with adversarial training, else in the robustness stage after training (and its DP charge)."""
    if backend != "triton":
        return
    from aisec_kernels.dispatch import interpret_mode, triton_available

    require(triton_available(), "robustness.backend", backend, "needs the triton package; allowed here: auto or torch")
    ok = getattr(device, "type", str(device)) == "cuda" or interpret_mode()
    require(
        ok,
        "robustness.backend",
        backend,
        f"runs Triton kernels on CUDA, and train.device resolved to {device}: use robustness.backend=auto or torch "
        "(or set TRITON_INTERPRET=1 for Triton's CPU interpreter)",
    )
