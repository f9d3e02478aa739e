"""APGD-CE, APGD-T, FAB-T, Square and the evaluation suites against torchattacks (the oracle) on a small CNN
trained for a few seconds on scikit-learn's digits, and the Triton path against the torch path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aisec_train.errors import ConfigError
from aisec_train.robust.adversary import robust_accuracy
from aisec_train.robust.apgd import apgd, apgd_run, apgd_targeted, checkpoints, dlr_loss, dlr_loss_targeted
from aisec_train.robust.evaluation import evaluate_robustness
from aisec_train.robust.fab import boundary_projection, fab_targeted
from aisec_train.robust.square import square
from tests.conftest import accuracy, distance

torchattacks = pytest.importorskip("torchattacks")
from torchattacks.attacks.fab import projection_l2, projection_linf  # noqa: E402

# On digits (x / 16) these radii leave robust accuracy well between 0 and clean accuracy (0.94).
EPS = {"linf": 0.05, "l2": 0.5}
THEIR_NORM = {"linf": "Linf", "l2": "L2"}
TOLERANCE = 0.005  # ours may be at most 0.5 points above torchattacks' robust accuracy


@pytest.fixture(scope="module")
def digits(digits_cnn) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The digits CNN of conftest.py and 201 of its held-out digits (an odd count)."""
    model, x, y = digits_cnn
    return model, x[:201], y[:201]


# ----------------------------------------------------------------------------------------- building blocks
def test_dlr_losses_equal_torchattacks(digits):
    model, _, _ = digits
    logits = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 9, 9, 2, 5, 1])
    logits[0, 0] = 5.0  # the true class on top: the runner-up is the second logit
    target = torch.tensor([4, 4, 0, 8, 7, 6, 2])
    theirs = torchattacks.APGD(model, loss="dlr").dlr_loss(logits, y)
    torch.testing.assert_close(dlr_loss(logits, y), theirs)
    theirs_t = torchattacks.APGDT(model).dlr_loss_targeted(logits, y, target)
    torch.testing.assert_close(dlr_loss_targeted(logits, y, target), theirs_t)


@pytest.mark.parametrize("steps", [10, 37, 100])
def test_step_size_checkpoints_equal_torchattacks(digits, steps):
    """The iterations and window lengths at which APGD checks its step size: recorded from torchattacks' own
    ``check_oscillation`` calls during a real run."""
    model, x, y = digits
    attack = torchattacks.APGD(model, eps=0.05, steps=steps)
    calls, check = [], attack.check_oscillation

    def recording(losses, j, k, y5, k3=0.75):
        calls.append((int(j), int(k)))
        return check(losses, j, k, y5, k3=k3)

    attack.check_oscillation = recording
    attack.attack_single_run(x[:5], y[:5])
    assert calls == checkpoints(steps)
    assert checkpoints(100)[:3] == [(21, 22), (40, 19), (56, 16)]  # 22% first, shrinking by 3% of the steps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_trajectory_equals_torchattacks_from_the_same_start(digits, norm):
    """Step size, momentum, checkpoints, halving and restarts from the best point: from torchattacks' own start,
    40 steps of our APGD-CE reach their best losses and fool the same samples (61 samples: an odd batch)."""
    model, x, y = digits
    x, y, eps = x[:61], y[:61], EPS[norm]
    attack = torchattacks.APGD(model, norm=THEIR_NORM[norm], eps=eps, steps=40)
    torch.manual_seed(3)
    x_best, still_correct, loss_best, _ = attack.attack_single_run(x, y)
    torch.manual_seed(3)  # their start, drawn again from the same stream
    if norm == "linf":
        t = 2 * torch.rand(x.shape) - 1
        start = x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    else:
        t = torch.randn(x.shape)
        start = x + eps * t / (t.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
    ours = apgd_run(model, x, y, loss="ce", eps=eps, norm=norm, steps=40, x_init=start.clamp(0, 1), backend="torch")
    fooled = ~still_correct
    assert 5 < int(fooled.sum()) < 55  # the comparison is not trivial
    assert torch.equal(ours.fooled, fooled)
    robust = ~fooled
    close = (ours.loss_best[robust] - loss_best[robust]).abs() <= 1e-4
    # Linf is exact; L2 projections round differently (1e-10 vs 1e-12 guards), which moves a few samples
    assert close.float().mean() >= (1.0 if norm == "linf" else 0.9)
    assert (distance(ours.x_adv, x, norm) <= eps + 1e-5).all() and ours.x_adv.min() >= 0 and ours.x_adv.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(50, 64), (7, 13)])
def test_boundary_projection_equals_the_reference(norm, shape):
    """FAB's projection onto a hyperplane within the [0, 1] box, against torchattacks' ``projection_*``."""
    gen = torch.Generator().manual_seed(0)
    t, w = torch.rand(shape, generator=gen), torch.randn(shape, generator=gen)
    w[0, :3] = 0.0  # coordinates the hyperplane ignores must not move
    b = (w * t).sum(1) + 3 * torch.randn(shape[0], generator=gen)
    reference = projection_linf if norm == "linf" else projection_l2
    d = boundary_projection(t, w, b, norm)
    torch.testing.assert_close(d, reference(t, w, b), atol=1e-6, rtol=1e-5)
    assert d[0, :3].abs().max() == 0 and (t + d).min() >= 0 and (t + d).max() <= 1


# ------------------------------------------------------------------------------- strength against the oracle
def _ours(name: str, model, x, y, norm: str):
    eps = EPS[norm]
    if name == "apgd-ce":
        return apgd(model, x, y, eps=eps, norm=norm, steps=10, seed=0).x_adv
    if name == "apgd-t":
        return apgd_targeted(model, x, y, eps=eps, norm=norm, steps=10, n_target_classes=9, seed=0).x_adv
    if name == "fab-t":
        return fab_targeted(model, x, y, eps=eps, norm=norm, steps=10, n_target_classes=9).x_adv
    return square(model, x, y, eps=eps, norm=norm, n_queries=200, seed=0).x_adv


def _theirs(name: str, model, norm: str):
    kw = dict(norm=THEIR_NORM[norm], eps=EPS[norm], seed=0)
    if name == "apgd-ce":
        return torchattacks.APGD(model, steps=10, loss="ce", **kw)
    if name == "apgd-t":
        return torchattacks.APGDT(model, steps=10, n_classes=10, **kw)
    if name == "fab-t":
        return torchattacks.FAB(model, steps=10, multi_targeted=True, n_classes=10, **kw)
    return torchattacks.Square(model, n_queries=200, resc_schedule=False, **kw)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square"])
def test_each_attack_at_least_as_strong_as_torchattacks(digits, name, norm):
    """Same radius and budget (torchattacks' AutoAttack defaults: 10 steps, 9 target classes; Square 200
    queries here), each attack alone on the same 121 samples: ours is at most 0.5 points less effective."""
    model, x, y = digits
    x, y = x[:121], y[:121]
    x_ours = _ours(name, model, x, y, norm)
    x_theirs = _theirs(name, model, norm)(x, y)
    assert (distance(x_ours, x, norm) <= EPS[norm] * (1 + 1e-5)).all()
    ours, theirs, clean = accuracy(model, x_ours, y), accuracy(model, x_theirs, y), accuracy(model, x, y)
    assert theirs < clean - 0.05  # the attack does something on this model
    assert ours <= theirs + TOLERANCE, f"{name} {norm}: ours {ours:.4f} vs torchattacks {theirs:.4f}"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ensemble_at_least_as_strong_as_torchattacks_multiattack(digits, norm):
    """The cascade of all four (10 steps, 9 targets, Square 300 queries) against torchattacks' MultiAttack of
    the same four attacks on 81 samples: the worst case over the ensemble is at most 0.5 points above theirs."""
    model, x, y = digits
    x, y = x[:81], y[:81]
    attacks = [_theirs(n, model, norm) for n in ("apgd-ce", "apgd-t", "fab-t")]
    attacks.append(torchattacks.Square(model, norm=THEIR_NORM[norm], eps=EPS[norm], n_queries=300, seed=0))
    theirs = accuracy(model, torchattacks.MultiAttack(attacks)(x, y), y)
    out = evaluate_robustness(
        model, x, y, suite="autoattack", norm=norm, eps=EPS[norm], steps=10, square_queries=300, batch_size=29
    )
    assert out["robust_accuracy"] <= theirs + TOLERANCE
    per_attack = [out["attacks"][n]["robust_accuracy"] for n in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert per_attack == sorted(per_attack, reverse=True)  # a cascade only ever removes samples
    assert out["robust_accuracy"] <= per_attack[-1] and out["clean_accuracy"] == pytest.approx(accuracy(model, x, y))


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ensemble_at_least_as_strong_as_torchattacks_autoattack(digits, norm):
    """torchattacks' own ``AutoAttack`` class (standard version at its defaults: 10 steps, Square 5000 queries)
    against our suite at the same budget, on 101 samples."""
    model, x, y = digits
    x, y = x[:101], y[:101]
    oracle = torchattacks.AutoAttack(
        model, norm=THEIR_NORM[norm], eps=EPS[norm], version="standard", n_classes=10, seed=0
    )
    theirs = accuracy(model, oracle(x, y), y)
    out = evaluate_robustness(model, x, y, suite="autoattack", norm=norm, eps=EPS[norm], steps=10)
    assert out["robust_accuracy"] <= theirs + TOLERANCE


# ------------------------------------------------------------------------------------------ the suites
def test_pgd_suite_is_todays_robust_accuracy(digits):
    model, x, y = digits
    kw = dict(norm="linf", eps=0.05, step_size=2.5 * 0.05 / 20, steps=20, restarts=2, batch_size=37)
    out = evaluate_robustness(model, x, y, suite="pgd", eps=0.05, batch_size=37)
    assert out["robust_accuracy"] == robust_accuracy(model, x, y, **kw)
    assert out["attack"] == {"name": "pgd", **{k: kw[k] for k in ("norm", "eps", "step_size", "steps", "restarts")}}


def test_apgd_suite_is_stronger_than_pgd_and_reports_each_attack(digits):
    model, x, y = digits
    x, y = x[:81], y[:81]
    pgd_only = evaluate_robustness(model, x, y, suite="pgd", eps=0.05, masking_checks=False)
    out = evaluate_robustness(model, x, y, suite="apgd", eps=0.05, batch_size=64)
    assert set(out["attacks"]) == {"apgd-ce", "apgd-t"}
    assert out["robust_accuracy"] <= pgd_only["robust_accuracy"]
    for entry in out["attacks"].values():
        assert {"robust_accuracy", "fooled", "seconds", "steps"} <= set(entry)
    masking = out["gradient_masking"]
    assert masking == {"flagged": False, "reasons": [], "checks": masking["checks"]}
    assert set(masking["checks"]) == {"square", "steps", "zero_gradients"}
    individual = evaluate_robustness(model, x, y, suite="apgd", eps=0.05, per_attack="individual", masking_checks=False)
    assert individual["attacks"]["apgd-t"]["robust_accuracy"] >= out["attacks"]["apgd-t"]["robust_accuracy"]


class _Quantised(nn.Module):
    """Input quantisation to 17 grey levels: a textbook gradient-masking 'defence' (zero input gradient)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 16) / 16)


def test_masking_is_flagged_on_a_quantised_model(digits):
    """White-box attacks see zero gradients; black-box Square is not fooled by that and finds what they miss."""
    model, x, y = digits
    masked = _Quantised(model).eval()
    out = evaluate_robustness(masked, x[:80], y[:80], suite="apgd", eps=0.1, steps=10, n_target_classes=2)
    masking = out["gradient_masking"]
    assert masking["flagged"]
    assert masking["checks"]["zero_gradients"]["samples"] > 0
    assert masking["checks"]["square"]["fooled_after_white_box"] > 0
    reasons = " ".join(masking["reasons"])
    assert "black-box Square fooled" in reasons and "all-zero input gradient" in reasons
    assert out["robust_accuracy"] < out["attacks"]["apgd-t"]["robust_accuracy"]  # Square's finds count too


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(suite="fgsm"), "robustness.eval='fgsm' is not allowed"),
        (dict(norm="l1"), "norm='l1' is not allowed"),
        (dict(steps=0), "steps=0 is not allowed"),
        (dict(queries=5), "budget=['queries'] is not allowed"),
        (dict(per_attack="both"), "per_attack='both' is not allowed"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(digits, kwargs, message):
    model, x, y = digits
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluate_robustness(model, x[:4], y[:4], **{"eps": 0.05, **kwargs})


# ------------------------------------------------------------------------------------ kernels: Triton path
try:  # tests/conftest.py imported triton under its CPU interpreter where there is no GPU
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    IN_PROCESS = isinstance(triton.language.zeros, InterpretedFunction)
except ImportError:
    IN_PROCESS = False


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not IN_PROCESS:
        pytest.skip("needs triton imported under its CPU interpreter (tests/conftest.py does so without a GPU)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # aisec_kernels builds its kernels at launch: this is enough


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_triton_path_equals_torch_path(digits, interpret, norm):
    """APGD's and Square's projections run the fused pgd_update kernel; 5 samples, a few steps each."""
    model, x, y = digits
    x, y = x[:5], y[:5]
    kw = dict(eps=EPS[norm], norm=norm, seed=1)
    a, b = (apgd(model, x, y, steps=4, backend=be, **kw) for be in ("triton", "torch"))
    torch.testing.assert_close(a.x_adv, b.x_adv, atol=1e-5, rtol=0)
    assert torch.equal(a.robust, b.robust)
    c, d = (square(model, x, y, n_queries=3, backend=be, **kw) for be in ("triton", "torch"))
    torch.testing.assert_close(c.x_adv, d.x_adv, atol=1e-5, rtol=0)
