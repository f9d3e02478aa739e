"""The guarded query interface: refusals (validation, budget, rate limit), output policies and sanitisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F

from aisec_train.audit.config import GuardConfig, OutputPolicy
from aisec_train.audit.guard import BudgetExhausted, Guard, QueryRefused, RateLimited, Sanitizer
from aisec_train.audit.probes import ManualClock, guard_probes
from aisec_train.errors import ConfigError
from aisec_train.models import ModelFactory
from tests.conftest import run_cli

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    factory = ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, input_shape=SHAPE, num_classes=10)
    return factory(seed=0).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))


def guard_with(model, **cfg) -> Guard:
    return Guard(model, input_shape=SHAPE, cfg=GuardConfig(**{"query_budget": 0, **cfg}))


@pytest.mark.parametrize(
    "bad, words",
    [
        (lambda x: x[:, :, :7], ["shape (16, 1, 7, 8)", "expected (N, 1, 8, 8)"]),
        (lambda x: x[0], ["shape (1, 8, 8)"]),
        (lambda x: x[:0], ["shape (0, 1, 8, 8)", "N >= 1"]),
        (lambda x: x.double(), ["dtype torch.float64", "float32"]),
        (lambda x: (x.numpy() * 255).astype(np.uint8), ["dtype uint8", "float32 in [0, 1]"]),
        (lambda x: torch.where(x > 0.5, torch.tensor(float("nan")), x), ["NaN or inf"]),
        (lambda x: x.clone().fill_(float("inf")), ["NaN or inf"]),
        (lambda x: x * 3 - 1, ["values in [", "expected [0, 1]"]),
        (lambda x: x.tolist(), ["list is not a tensor"]),
    ],
    ids=["shape", "no-batch", "empty", "float64", "uint8", "nan", "inf", "range", "list"],
)
def test_malformed_query_refused_with_one_clear_line(model, x, bad, words):
    guard = guard_with(model, query_budget=100)
    with pytest.raises(QueryRefused) as err:
        guard.query("alice", bad(x))
    message = str(err.value)
    assert "\n" not in message and message.startswith("query refused:")
    for word in words:
        assert word in message
    assert guard.queries_used("alice") == 0  # a refusal costs the client nothing


def test_numpy_float32_is_accepted(model, x):
    assert guard_with(model).query("alice", x.numpy()).shape == (16, 10)


def test_output_policies(model, x):
    probs = F.softmax(model(x), dim=1)
    full = guard_with(model, output=OutputPolicy.probs).query("a", x)
    torch.testing.assert_close(full, probs)
    top = guard_with(model, output=OutputPolicy.top_k, top_k=3).query("a", x)
    assert ((top > 0).sum(1) == 3).all()
    torch.testing.assert_close(top.topk(3, 1).values, probs.topk(3, 1).values)
    torch.testing.assert_close(top.topk(3, 1).indices, probs.topk(3, 1).indices)
    label = guard_with(model, output=OutputPolicy.label).query("a", x)
    torch.testing.assert_close(label, F.one_hot(probs.argmax(1), 10).float())
    rounded = guard_with(model, output=OutputPolicy.probs, round_decimals=1).query("a", x)
    torch.testing.assert_close(rounded, torch.round(probs * 10) / 10)
    noisy = guard_with(model, output=OutputPolicy.probs, noise_std=0.05)
    first, again = noisy.query("a", x), noisy.query("a", x)
    assert (first >= 0).all() and torch.allclose(first.sum(1), torch.ones(16))
    assert not torch.allclose(first, probs, atol=1e-3) and not torch.equal(first, again)
    assert (first - probs).abs().mean() < 0.1  # noise, not garbage


def test_budget_refuses_beyond_the_budget_and_counts_per_client(model, x):
    guard = guard_with(model, query_budget=20)
    guard.query("alice", x)  # 16 of 20
    with pytest.raises(BudgetExhausted, match=r"client 'alice' asked for 16 predictions but has 4 of its 20-query"):
        guard.query("alice", x)
    assert guard.queries_used("alice") == 16 and guard.remaining("alice") == 4
    assert guard.query("alice", x[:4]).shape == (4, 10) and guard.remaining("alice") == 0
    assert guard.query("bob", x).shape == (16, 10)  # budgets are per client
    assert guard.refusals == {"BudgetExhausted": 1}


def test_rate_limit_refuses_bursts_and_refills(model, x):
    clock = ManualClock()
    guard = Guard(model, input_shape=SHAPE, clock=clock, cfg=GuardConfig(query_budget=0, rate_limit=10.0, burst=16))
    guard.query("alice", x)
    with pytest.raises(RateLimited, match=r"over the rate limit of 10 queries/s; retry in 0.10 s"):
        guard.query("alice", x[:1])
    clock.now += 0.5  # five tokens back
    assert guard.query("alice", x[:5]).shape == (5, 10)
    with pytest.raises(RateLimited):
        guard.query("alice", x[:1])


def test_sanitizer_matches_references():
    x = torch.rand(4, 2, 9, 9, generator=torch.Generator().manual_seed(1))
    quantised = Sanitizer(bit_depth=2)(x)
    assert set(torch.unique(quantised * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert (quantised - x).abs().max() <= 1 / 6 + 1e-6
    smoothed = Sanitizer(smoothing=3)(x)
    # torch's "reflect" padding is scipy's "mirror" mode
    reference = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror")
    np.testing.assert_allclose(smoothed.numpy(), reference, rtol=0, atol=0)


def test_bpda_passes_the_gradient_the_quantiser_blocks():
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    Sanitizer(bit_depth=3)(x).sum().backward()
    assert x.grad is not None and (x.grad == 0).all()  # plain PGD sees no gradient: masking
    x.grad = None
    Sanitizer(bit_depth=3, bpda=True)(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_probes_refuse_every_malformed_query(model, x):
    probes = guard_probes(model, x[:4], GuardConfig())
    assert probes["malformed_refused"] == probes["malformed_sent"] >= 9
    assert probes["valid_query_answered"] and probes["rate_limit_refused_burst"] and probes["rate_limit_recovered"]


def test_guard_config_range_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"audit.guard.smoothing=2 is not allowed: 0 \(off\) or an odd size >= 3"):
        GuardConfig(smoothing=2)
    with pytest.raises(ConfigError, match=r"audit.guard.query_budget=-1"):
        GuardConfig(query_budget=-1)


def test_cli_refuses_a_bad_audit_override_in_one_line(tmp_path):
    proc = run_cli("audit.extraction.seeds=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "aisec-train: error: audit.extraction.seeds=0 is not allowed: must be >= 1"
    ]
    assert not (tmp_path / "run" / "report.json").exists()
