"""The guarded query interface: what a deployed model answers, and what it refuses.

A query goes through four steps, in order: validate (shape, dtype, finite, range), charge the client's budget
and rate limit, sanitise the input (bit-depth reduction, median smoothing), and release the output under the
policy (full probabilities, top-k, label only; optional noise and rounding). A refusal raises
:class:`QueryRefused` (or its subclasses) with one readable line and costs the client nothing.

>>> guard = Guard(model, input_shape=(1, 8, 8), cfg=GuardConfig())  # doctest: +SKIP
>>> guard.query("alice", x)  # (N, classes) released outputs  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aisec_train.audit.config import GuardConfig, OutputPolicy


class QueryRefused(ValueError):
    """A malformed query: refused before it reaches the model."""


class BudgetExhausted(QueryRefused):
    """The client's query budget does not cover this query."""


class RateLimited(QueryRefused):
    """The client queries faster than the rate limit allows."""


class Sanitizer(nn.Module):
    """Bit-depth reduction and median smoothing (Xu et al. 2018, feature squeezing).

    ``bpda=True`` replaces the quantiser's zero gradient by the identity on the backward pass (Athalye et al.
    2018): the adaptive attacker's view of the same forward computation.
    """

    def __init__(self, bit_depth: int = 0, smoothing: int = 0, bpda: bool = False):
        super().__init__()
        self.bit_depth, self.smoothing, self.bpda = bit_depth, smoothing, bpda

    def forward(self, x: Tensor) -> Tensor:
        if self.bit_depth:
            levels = 2**self.bit_depth - 1
            q = torch.round(x * levels) / levels
            x = x + (q - x).detach() if self.bpda else q
        if self.smoothing:
            x = median_filter(x, self.smoothing)
        return x

    @property
    def active(self) -> bool:
        return bool(self.bit_depth or self.smoothing)


def median_filter(x: Tensor, size: int) -> Tensor:
    """Per-channel median over a size x size window (reflect padding); differentiable through the chosen pixel."""
    pad = size // 2
    patches = F.unfold(F.pad(x, (pad, pad, pad, pad), mode="reflect"), size)  # (N, C*size*size, H*W)
    n, c, h, w = x.shape
    return patches.view(n, c, size * size, h * w).median(dim=2).values.view(n, c, h, w)


@dataclass
class _Client:
    used: int = 0
    tokens: float = 0.0
    last: float = 0.0


class Guard:
    """Wraps a trained model; ``query(client, x)`` is the only way in."""

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: tuple[int, ...],
        cfg: GuardConfig,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
    ):
        self.model, self.input_shape, self.cfg, self.clock = model.eval(), tuple(input_shape), cfg, clock
        self.sanitizer = Sanitizer(cfg.bit_depth, cfg.smoothing)
        self.clients: dict[str, _Client] = {}
        self.refusals: dict[str, int] = {}
        self._noise = torch.Generator().manual_seed(seed)

    def queries_used(self, client: str) -> int:
        return self.clients[client].used if client in self.clients else 0

    def remaining(self, client: str) -> int | None:
        return None if not self.cfg.query_budget else self.cfg.query_budget - self.queries_used(client)

    @torch.no_grad()
    def query(self, client: str, x: Tensor | np.ndarray) -> Tensor:
        try:
            x = self.validate(x)
            self._charge(client, len(x))
        except QueryRefused as err:
            self.refusals[type(err).__name__] = self.refusals.get(type(err).__name__, 0) + 1
            raise
        device = next(self.model.parameters()).device
        probs = F.softmax(self.model(self.sanitizer(x).to(device)).float(), dim=1).cpu()
        return self.release(probs)

    def validate(self, x: Tensor | np.ndarray) -> Tensor:
        if isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                raise QueryRefused(f"query refused: dtype {x.dtype}; expected float32 in [0, 1]")
            x = torch.from_numpy(x)
        if not isinstance(x, Tensor):
            raise QueryRefused(f"query refused: {type(x).__name__} is not a tensor or numpy array")
        if x.dtype != torch.float32:
            raise QueryRefused(f"query refused: dtype {x.dtype}; expected torch.float32 in [0, 1]")
        if x.dim() != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape or len(x) == 0:
            raise QueryRefused(
                f"query refused: shape {tuple(x.shape)}; expected (N, {', '.join(map(str, self.input_shape))})"
                " with N >= 1"
            )
        if not bool(torch.isfinite(x).all()):
            raise QueryRefused("query refused: input holds NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise QueryRefused(f"query refused: values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]")
        return x.detach().cpu()

    def _charge(self, client: str, n: int) -> None:
        state = self.clients.setdefault(client, _Client(tokens=float(self.cfg.burst), last=self.clock()))
        left = self.remaining(client)
        if left is not None and n > left:
            raise BudgetExhausted(
                f"query refused: client {client!r} asked for {n} predictions but has {left} of its "
                f"{self.cfg.query_budget}-query budget left"
            )
        if self.cfg.rate_limit:
            now = self.clock()
            state.tokens = min(float(self.cfg.burst), state.tokens + (now - state.last) * self.cfg.rate_limit)
            state.last = now
            if n > state.tokens:
                wait = (n - state.tokens) / self.cfg.rate_limit
                raise RateLimited(
                    f"query refused: client {client!r} is over the rate limit of {self.cfg.rate_limit:g} queries/s; "
                    f"retry in {wait:.2f} s"
                )
            state.tokens -= n
        state.used += n

    def release(self, probs: Tensor) -> Tensor:
        """Apply the output policy: noise, then truncation (top-k / label), then rounding."""
        cfg = self.cfg
        if cfg.noise_std:
            noisy = probs + cfg.noise_std * torch.randn(probs.shape, generator=self._noise)
            probs = noisy.clamp_min(0) / noisy.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-12)
        if cfg.output is OutputPolicy.label:
            return F.one_hot(probs.argmax(1), probs.shape[1]).float()
        if cfg.output is OutputPolicy.top_k:
            top = probs.topk(min(cfg.top_k, probs.shape[1]), dim=1)
            probs = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
        if cfg.round_decimals is not None:
            probs = torch.round(probs * 10**cfg.round_decimals) / 10**cfg.round_decimals
        return probs
