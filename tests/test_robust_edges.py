"""Red-team edges of the robustness package: radii on the wrong scale, inputs outside the [0, 1] range the attacks
project into, budgets that could not be allocated, Python API arguments that raised tracebacks or were silently
replaced, and report entries that named work that did not happen (docs/robustness.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aisec_train import compose
from aisec_train.data.errors import DataError
from aisec_train.errors import ConfigError
from aisec_train.models import build_model
from aisec_train.robust.adversary import make_adversary, robust_accuracy
from aisec_train.robust.config import AttackConfig, Norm, RobustMode, RobustnessConfig
from aisec_train.robust.evaluation import _Evaluator, evaluate_robustness
from aisec_train.robust.outcome import AttackResult
from aisec_train.robust.square import square
from aisec_train.robust.stage import masking_verdict
from aisec_train.robust.trades import Trades
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def untrained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An untrained digits-sized CNN and 12 random [0, 1] images: enough for every check that runs before an attack."""
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8).eval()
    return model, torch.rand(12, 1, 8, 8), torch.arange(12) % 10


class _Scaled(nn.Module):
    """``model`` on images scaled to [0, k]: what a user whose data is not in [0, 1] hands the evaluation."""

    def __init__(self, model: nn.Module, k: float) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x / self.k)


# ---------------------------------------------------------------------------------------- radii and budgets
@pytest.mark.parametrize(
    "make",
    [
        lambda: RobustnessConfig(eps=8.0),  # 8 grey levels meant as 8/255: passed the evasion item at robust 0.0
        lambda: RobustnessConfig(eps=0.5),
        lambda: AttackConfig(eps=1e30),
    ],
)
def test_an_linf_radius_off_the_pixel_scale_is_refused(make):
    with pytest.raises(ConfigError, match=r"eps=.* is not allowed: an Linf radius on the \[0, 1\] pixel scale"):
        make()
    RobustnessConfig(eps=0.49, attack=AttackConfig(eps=0.3))  # below 0.5 passes, and L2 radii are not Linf ones
    RobustnessConfig(norm=Norm.l2, eps=3.0, mode=RobustMode.pgd_at, attack=AttackConfig(norm=Norm.l2))


@pytest.mark.parametrize(
    "make, key",
    [
        # the evaluation at the digits' Linf default 0.1 read as an L2 radius: robust 0.31 where Linf 0.1 left 0.0
        (lambda: RobustnessConfig(attack=AttackConfig(norm=Norm.l2)), "robustness.attack.eps"),
        (lambda: RobustnessConfig(mode=RobustMode.pgd_at, norm=Norm.l2), "robustness.eps"),
        (lambda: RobustnessConfig(norm=Norm.l2, eps=0.5), "robustness.attack.eps"),  # an L2 radius read as Linf
    ],
)
def test_a_null_radius_that_would_be_read_in_another_norm_is_refused(make, key):
    with pytest.raises(ConfigError, match=rf"{key}=None is not allowed: must be set with robustness"):
        make()


def test_the_cli_refuses_a_radius_in_grey_levels_in_one_line(tmp_path):
    out = run_cli("experiment=smoke", "privacy=none", "robustness.eps=8", f"hydra.run.dir={tmp_path}", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "aisec-train: error: robustness.eps=8.0 is not allowed: an Linf radius on the [0, 1] pixel scale must be < "
        "0.5 (at 0.5 every image's ball holds the same grey image: no model can be robust); in grey levels, divide "
        "by 255 (8 levels: 0.03137)"
    ]


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: AttackConfig(restarts=10**6), "robustness.attack.restarts"),  # failed to allocate after training
        (lambda: AttackConfig(steps=10**8), "robustness.attack.steps"),
        (lambda: RobustnessConfig(steps=10**8), "robustness.steps"),
    ],
)
def test_attack_budgets_beyond_the_caps_are_refused(make, key):
    with pytest.raises(ConfigError, match=rf"{key}=\d+ is not allowed: must be in \[1, "):
        make()
    AttackConfig(steps=10_000, restarts=100)


def test_augmult_beyond_its_cap_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"train.augmult=100000 is not allowed: at most 256 views per record"):
        compose(["privacy=none", "train.augmult=100000"])  # failed to allocate at the first step


# ---------------------------------------------------------------------------------------------- the data range
@pytest.mark.parametrize("scale", [16.0, -1.0])
def test_inputs_outside_the_unit_range_are_refused_by_every_entry_point(untrained, scale):
    """On digits in [0, 16] the default suite found no adversarial example (every candidate was clamped out of the
    eps-ball): robust accuracy equalled clean accuracy and the evasion item passed; PGD measured clamped images."""
    model, x, y = untrained
    xs = x * scale
    scaled = _Scaled(model, scale)
    calls = {
        "evaluate_robustness": lambda: evaluate_robustness(scaled, xs, y, eps=0.1, steps=2, n_target_classes=2),
        "robust_accuracy": lambda: robust_accuracy(scaled, xs, y, eps=0.1, step_size=0.02, steps=2),
        "pgd_at": lambda: make_adversary("pgd_at", eps=0.1, steps=2)(scaled, xs, y),
        "fgsm_rs": lambda: make_adversary("fgsm_rs", eps=0.1)(scaled, xs, y),
        "trades": lambda: Trades(eps=0.1, step_size=0.02, steps=2).perturb(scaled, xs, y),
    }
    for call in calls.values():
        with pytest.raises(DataError, match=r"attack inputs span \[.*\]; the attacks' eps-ball and clamp"):
            call()


def test_non_finite_inputs_are_refused(untrained):
    model, x, y = untrained
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="attack inputs hold NaN"):
        evaluate_robustness(model, bad, y, eps=0.1, steps=2, n_target_classes=2)


def test_the_evaluator_counts_only_examples_inside_the_data_range():
    """An attack's example is re-checked for the radius and, now, for [0, 1]: a point below 0 within the ball that
    a model misclassifies is no image of the data, and counted against robust accuracy before."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0] = -1000.0  # class 1 wins once pixel 0 goes below 0
        model[1].bias.copy_(torch.tensor([1e-3, 0.0]))
    x, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    ev = _Evaluator(model, x, y, norm="linf", eps=0.1, seed=0, backend="torch", bf16=False, batch=8)
    assert bool(ev.correct.all())

    def below_zero(m, xb, yb, seed, **kw):
        x_adv = xb.clone()
        x_adv[:, 0, 0, 0] = -0.1  # within the Linf ball of 0.1, outside [0, 1]
        return AttackResult(x_adv, torch.zeros(len(xb), dtype=torch.bool))

    fooled, _ = ev.run(below_zero, ev.correct)
    assert int(fooled.sum()) == 0


# ------------------------------------------------------------------------------------------ API arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=float("inf")), r"eps=inf is not allowed: must be a finite number > 0"),  # the kernel's ValueError
        (dict(eps="0.1"), r"eps='0.1' is not allowed"),  # TypeError
        (dict(steps=2.5), r"steps=2.5 is not allowed: must be an integer >= 1"),  # range()'s TypeError
        (dict(pgd_step_size=0.0, suite="pgd"), r"pgd_step_size=0.0 is not allowed"),  # ran 2.5 * eps / 20, reported it
        (dict(pgd_step_size=-1.0, suite="pgd"), r"pgd_step_size=-1.0 is not allowed"),  # the kernel's ValueError
        (dict(square_check_queries=-1), r"square_check_queries=-1 is not allowed"),  # the check silently off
        (dict(eps=4.0, norm="l2"), r"eps=4.0 is not allowed: must be < 4 for l2 on \[0, 1\] images of 64 values"),
    ],
)
def test_evaluation_arguments_are_refused_in_one_line(untrained, kwargs, match):
    model, x, y = untrained
    args = dict(eps=0.1, steps=2, n_target_classes=2) | kwargs
    with pytest.raises(ConfigError, match=match):
        evaluate_robustness(model, x, y, **args)


def test_labels_the_model_cannot_output_are_refused(untrained):
    """A label past the model's classes counted as a clean mistake, silently lowering both accuracies."""
    model, x, y = untrained
    wrong = y.clone()
    wrong[0] = 12
    with pytest.raises(ConfigError, match=r"labels=\[0, 12\] is not allowed: must lie in \[0, 9\]"):
        evaluate_robustness(model, x, wrong, eps=0.1, steps=2, n_target_classes=2)
    with pytest.raises(ConfigError, match=r"labels dtype='torch.float32' is not allowed"):  # cross_entropy's error
        evaluate_robustness(model, x, y.float(), eps=0.1, steps=2, n_target_classes=2)


def test_trades_and_square_parameters_are_refused(untrained):
    model, x, y = untrained
    with pytest.raises(ConfigError, match=r"robustness.step_size=inf is not allowed"):
        Trades(eps=0.1, step_size=float("inf"))
    with pytest.raises(ConfigError, match=r"p_init=-0.5 is not allowed"):  # math.sqrt's domain error
        square(model, x, y, eps=0.1, n_queries=2, p_init=-0.5)


# --------------------------------------------------------------------------------- what the report claims
def test_each_attack_says_how_many_samples_it_ran_on(digits_cnn):
    """At a radius where APGD-CE fools every sample, the cascade's later attacks ran on none: the entries said
    ``fooled 0`` beside their budget as if they had run; now ``samples`` says 0, and the autoattack suite's own
    Square, the masking check, says it had no survivor to attack instead of "fooled 0 more"."""
    model, x, y = digits_cnn
    x, y = x[:24], y[:24]
    out = evaluate_robustness(model, x, y, suite="autoattack", eps=0.3, steps=10, n_target_classes=2, square_queries=5)
    correct = round(out["clean_accuracy"] * len(x))
    assert out["robust_accuracy"] == 0.0 and correct > 0
    assert out["attacks"]["apgd-ce"]["samples"] == correct
    assert [out["attacks"][name]["samples"] for name in ("apgd-t", "fab-t", "square")] == [0, 0, 0]
    square_check = out["gradient_masking"]["checks"]["square"]
    assert square_check["samples"] == 0
    status, evidence, _ = masking_verdict(out["gradient_masking"], correct)
    assert status == "pass" and "no white-box survivor to attack" in evidence


@pytest.mark.slow
def test_a_float_npz_in_grey_levels_is_refused_not_passed(tmp_path):
    """digits as float 0-16 in an .npz: the run passed "tested against evasion attacks" with robust accuracy equal
    to clean accuracy (0.35 and 0.35); now it is refused in one line, exit 2 (by the data stage's
    check_attack_scale before training, and by the robustness stage's check_inputs behind it)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path / "digits16.npz"
    np.savez(path, x=digits.images.astype(np.float32), y=digits.target.astype(np.int64))
    args = ("experiment=smoke", "privacy=none", "audit=off", "dataset=npz", f"dataset.path={path}")
    out = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "span [0, 16]" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("aisec-train: error: ")  # the one-line refusal


# ------------------------------------------------------------------------------------------------ model=wrn
def test_a_wide_resnet_too_large_to_allocate_is_refused_before_allocating():
    from aisec_train.models.wrn import WideResNet

    with pytest.raises(ValueError, match=r"model.depth=16 with model.width=100000 is not allowed: 1.71e\+15"):
        WideResNet(in_channels=1, num_classes=10, image_size=8, depth=16, width=100_000)  # asked for 92 TB
    with pytest.raises(ValueError, match=r"model.depth=2002 is not allowed: at most 1000"):
        WideResNet(in_channels=1, num_classes=10, image_size=8, depth=2002, width=1)  # 10^5 built for minutes


def test_more_steps_is_a_masking_finding_only_when_a_sign_test_finds_it():
    """The default job's 32 checked samples gave 16 robust after 50 APGD steps and 14 after 25 (2 samples fooled
    by the short run only, 0 by the long one), and the old rule (a rise of two samples) failed the masking item.
    Both runs start at random points: that split is a fair coin's (p = 0.25). Six against none is not (p = 0.016)."""
    from aisec_train.robust.evaluation import STEPS_LEVEL, sign_test_p

    assert sign_test_p(2, 0) == pytest.approx(0.25) and sign_test_p(2, 0) >= STEPS_LEVEL
    assert sign_test_p(6, 0) == pytest.approx(1 / 64) and sign_test_p(6, 0) < STEPS_LEVEL
    assert sign_test_p(0, 5) == 1.0 and sign_test_p(6, 6) > 0.5
    assert sign_test_p(3, 1) == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
