"""Where a DP step's time goes: our book-keeping step against the non-private step, phase by phase.

Phases: ``forward`` (model and loss), ``backward`` (autograd, minus what the two book-keeping phases below
took inside it), ``per_sample_norms`` (each layer's norms, :meth:`LayerRecord.process`), ``clip_accumulate``
(the clip factors and the clipped sums written into ``p.grad``), ``noise`` (Opacus' ``add_noise``),
``optimizer`` (scaling and the wrapped optimizer's update), and ``loader`` (drawing one batch: Opacus' Poisson
``DPDataLoader`` for ours, a shuffled ``DataLoader`` for the non-private step). Each phase is timed by wrapping
the method that does it with ``time.perf_counter``, so the profile adds a few microseconds per call and no
profiler; the phases of one step add up to that step's wall time (the ``other`` column holds the rest).

The noise row is measured twice, with the generator our private step uses since the guarantee issue (a
``torch.Generator`` seeded from ``os.urandom``) and with torch's global generator, so the cost of secret noise
is on record beside everything else.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class PhaseClock:
    """Accumulates wall time per phase name; ``wrap`` times a bound method in place."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list = []

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def _loader(x: torch.Tensor, y: torch.Tensor, private: bool) -> DataLoader:
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=True)
    if not private:
        return loader
    from opacus.data_loader import DPDataLoader

    from aisec_train.privacy.randomness import secret_generator

    return DPDataLoader.from_data_loader(loader, generator=secret_generator("cpu"))


def profile_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, private: bool, steps: int = 5) -> dict:
    """Median seconds per phase over ``steps`` steps (after one warm-up step) of ours or the non-private step."""
    from aisec_train.train.bk_capture import LayerRecord
    from aisec_train.train.bk_engine import BKPrivacyEngine

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    loader = _loader(x, y, private)
    clock = PhaseClock()
    if private:
        from aisec_train.privacy.randomness import secret_generator

        model, optimizer, criterion, loader = BKPrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="bk", noise_generator=secret_generator(x.device),
        )  # fmt: skip
        optimizer.secure_mode = True  # as privacy/engine.py: four draws summed (floating-point attack)
        clock.wrap(LayerRecord, "process", "per_sample_norms")
        clock.wrap(model, "_write_clipped_sum", "clip_accumulate")
        clock.wrap(optimizer, "add_noise", "noise")
        clock.wrap(optimizer, "scale_grad", "optimizer")
        clock.wrap(optimizer.original_optimizer, "step", "optimizer")
    else:
        clock.wrap(optimizer, "step", "optimizer")
    rows: list[dict[str, float]] = []
    try:
        for i in range(steps + 1):
            clock.seconds.clear()
            started = time.perf_counter()
            with clock.phase("loader"):
                xb, yb = next(iter(loader))
            if len(xb) == 0:  # an empty Poisson draw: time a full batch instead (the phases are per batch)
                xb, yb = x, y
            optimizer.zero_grad(set_to_none=True)
            with clock.phase("forward"):
                loss = criterion(model(xb), yb)
            with clock.phase("backward_total"):
                loss.backward()
            optimizer.step()
            total = time.perf_counter() - started
            phases = dict(clock.seconds)
            # per-sample norms and clipping run inside the backward (book-keeping's hooks): take them out of it
            phases["backward"] = phases.pop("backward_total") - phases.get("per_sample_norms", 0.0)
            phases["backward"] -= phases.get("clip_accumulate", 0.0)
            phases["other"] = total - sum(phases.values())
            phases["total"] = total
            if i > 0:
                rows.append(phases)
    finally:
        clock.restore()
    keys = ["loader", "forward", "backward", "per_sample_norms", "clip_accumulate", "noise", "optimizer", "other"]
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys + ["total"]}


def noise_cost(numel: int, repeats: int = 20) -> dict:
    """Seconds to draw noise for ``numel`` parameters: one draw from torch's global generator (Opacus' default),
    one from a generator whose state comes from os.urandom, and Opacus' secure-mode draw (four summed) from it,
    which is what aisec-train's private step uses."""
    from opacus.optimizers.optimizer import _generate_noise

    from aisec_train.privacy.randomness import secret_generator

    secret, reference = secret_generator("cpu"), torch.empty(numel)
    draws = {
        "global_generator": lambda: torch.normal(0.0, 1.0, size=(numel,)),
        "os_entropy_generator": lambda: torch.normal(0.0, 1.0, size=(numel,), generator=secret),
        "os_entropy_secure_mode": lambda: _generate_noise(1.0, reference, generator=secret, secure_mode=True),
    }
    out = {}
    for label, draw in draws.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            draw()
            times.append(time.perf_counter() - started)
        out[label] = statistics.median(times)
    out["os_entropy_over_global"] = out["os_entropy_generator"] / out["global_generator"]
    out["secure_mode_over_global"] = out["os_entropy_secure_mode"] / out["global_generator"]
    return out
