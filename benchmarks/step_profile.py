"""Where a DP step's time goes: our book-keeping step against the non-private step, phase by phase.

Phases: ``forward`` (model and loss), ``backward`` (autograd, minus what the two book-keeping phases below
took inside it), ``per_sample_norms`` (each layer's norms, :meth:`LayerRecord.process`), ``clip_accumulate``
(the clip factors and the clipped sums written into ``p.grad``), ``noise`` (Opacus' ``add_noise``),
``optimizer`` (scaling and the wrapped optimizer's update), and ``loader`` (drawing one batch: Opacus' Poisson
``DPDataLoader`` for ours, a shuffled ``DataLoader`` for the non-private step). Each phase is timed by wrapping
the method that does it with ``time.perf_counter``, so the profile adds a few microseconds per call and no
profiler; the phases of one step add up to that step's wall time (the ``other`` column holds the rest).

``profile_pair`` runs the two interleaved step by step (N O N O ..., so a shared machine's load falls on both)
and adds the paired ratio and each phase's excess over the non-private step. ``benchmarks/dpsgd.py`` prints it
after its timings; ``benchmarks/dpsgd_profile.py`` runs the profile alone and writes JSON (a file of its own, so
this module never imports the benchmark that imports it).

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


class Stepper:
    """One implementation's training step (ours or the non-private one), timed phase by phase."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, private: bool):
        from aisec_train.train.bk_capture import LayerRecord
        from aisec_train.train.bk_engine import BKPrivacyEngine

        self.x, self.y, self.private = x, y, private
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        criterion = nn.CrossEntropyLoss()
        loader = _loader(x, y, private)
        self.clock = clock = PhaseClock()
        if private:
            from aisec_train.privacy.randomness import secret_generator

            model, optimizer, criterion, loader = BKPrivacyEngine(accountant="prv").make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="bk",
                noise_generator=secret_generator(x.device),
            )  # fmt: skip
            optimizer.secure_mode = True  # as privacy/engine.py: four draws summed (floating-point attack)
            clock.wrap(LayerRecord, "process", "per_sample_norms")
            clock.wrap(model, "_write_clipped_sum", "clip_accumulate")
            clock.wrap(optimizer, "accumulate", "optimizer")
            clock.wrap(optimizer, "add_noise", "noise")
            clock.wrap(optimizer, "scale_grad", "optimizer")
            clock.wrap(optimizer.original_optimizer, "step", "optimizer")
        else:
            clock.wrap(optimizer, "step", "optimizer")
        self.model, self.optimizer, self.criterion, self.loader = model, optimizer, criterion, loader

    def step(self) -> dict[str, float]:
        """One step; seconds per phase, ``other`` (the rest) and ``total``."""
        clock = self.clock
        clock.seconds.clear()
        started = time.perf_counter()
        with clock.phase("loader"):
            xb, yb = next(iter(self.loader))
        if len(xb) == 0:  # an empty Poisson draw: time a full batch instead (the phases are per batch)
            xb, yb = self.x, self.y
        self.optimizer.zero_grad(set_to_none=True)
        with clock.phase("forward"):
            loss = self.criterion(self.model(xb), yb)
        with clock.phase("backward_total"):
            loss.backward()
        self.optimizer.step()
        total = time.perf_counter() - started
        phases = dict(clock.seconds)
        # per-sample norms and clipping run inside the backward (book-keeping's hooks): take them out of it
        phases["backward"] = phases.pop("backward_total") - phases.get("per_sample_norms", 0.0)
        phases["backward"] -= phases.get("clip_accumulate", 0.0)
        phases["other"] = total - sum(phases.values())
        phases["total"] = total
        return phases

    def close(self) -> None:
        self.clock.restore()


PHASES = ["loader", "forward", "backward", "per_sample_norms", "clip_accumulate", "noise", "optimizer", "other"]


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in PHASES + ["total"]}


def profile_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, private: bool, steps: int = 5) -> dict:
    """Median seconds per phase over ``steps`` steps (after one warm-up step) of ours or the non-private step."""
    stepper = Stepper(model, x, y, private)
    try:
        rows = [stepper.step() for _ in range(steps + 1)][1:]
    finally:
        stepper.close()
    return _medians(rows)


def profile_pair(make_model, x: torch.Tensor, y: torch.Tensor, steps: int = 5, warmup: int = 1) -> dict:
    """The non-private step and ours on the same batch, interleaved step by step (N O N O ...), so that the load
    of a shared machine falls on both alike. Per impl: the median seconds of each phase; ``ratio``: the median
    over steps of ours' total over the non-private total of the same round, and ``phase_excess``: the median of
    each phase's (ours - non-private) seconds, as a fraction of the non-private total of that round."""
    steppers = {"nonprivate": Stepper(make_model(), x, y, False), "ours": Stepper(make_model(), x, y, True)}
    rows: dict[str, list[dict]] = {k: [] for k in steppers}
    try:
        for i in range(warmup + steps):
            for impl, stepper in steppers.items():
                phases = stepper.step()
                if i >= warmup:
                    rows[impl].append(phases)
    finally:
        for stepper in steppers.values():
            stepper.close()
    pairs = list(zip(rows["nonprivate"], rows["ours"], strict=True))
    out = {impl: _medians(r) for impl, r in rows.items()}
    out["ratio"] = statistics.median(o["total"] / n["total"] for n, o in pairs)
    out["phase_excess"] = {
        k: statistics.median((o.get(k, 0.0) - n.get(k, 0.0)) / n["total"] for n, o in pairs) for k in PHASES
    }
    out["steps"] = steps
    return out


def noise_cost(numel: int, repeats: int = 20) -> dict:
    """Seconds to draw noise for ``numel`` parameters: one draw from torch's global generator (Opacus' default),
    one from a generator whose state comes from os.urandom, and Opacus' secure-mode draw (four summed) from it,
    the mechanism aisec-train's private step uses (there drawn per group of tensors: privacy/noise.py)."""
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
