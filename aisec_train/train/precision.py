"""Mixed precision for the one loop: ``train.precision=32|bf16|fp16``.

Only the forward pass (objective: adversary, forward, loss) runs under ``torch.autocast``; the parameters stay
float32, and what the per-sample machinery captured in bf16 is upcast before any per-sample arithmetic (Opacus'
samplers through its registries, :func:`fp32_per_sample_math`; the book-keeping engine in train/bk_capture.py), so
per-sample gradients, norms, clipping, the noise and the optimizer step all stay float32 under bk and hooks. A
private bf16 step backpropagates the sum of its rows' losses (:meth:`Precision.sum_backward`), and Opacus' ghost
clipping, whose clipped sum comes from a second bf16 backward, is refused (:meth:`Precision.check_private_step`).
fp16 adds torch's ``GradScaler`` against underflow; under DP-SGD it is refused, because the scaler multiplies
every per-sample gradient before it is clipped (the clip norm would bound the scaled gradient): use bf16, whose
float32 exponent range needs no scaler.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

from aisec_train.errors import ConfigError
from aisec_train.train.config import FP16_UNDER_DP

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fp32_per_sample_math() -> None:
    """Opacus computes per-sample gradients and ghost norms in the dtype its hooks captured (bf16 under autocast):
    wrap every sampler in Opacus' own registries so it upcasts activations and output gradients to float32 first.
    Idempotent; a no-op cast for float32 runs, so the wrapped registries serve every later run too."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    fast = GradSampleHooksFastGradientClipping
    for table in (GradSampleHooks.GRAD_SAMPLERS, fast.GRAD_SAMPLERS, fast.NORM_SAMPLERS):
        for layer, sampler in list(table.items()):
            if not getattr(sampler, "fp32", False):
                table[layer] = _upcasting(sampler)


def _upcasting(sampler):
    @functools.wraps(sampler)  # the report names a layer's method by its sampler's name, wrapped or not
    def upcast(module, activations, backprops):
        activations = [a.float() if _low(a) else a for a in activations]
        return sampler(module, activations, backprops.float() if _low(backprops) else backprops)

    upcast.fp32 = True
    return upcast


def _low(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)


def check_precision(precision: str, device: torch.device, private: bool) -> None:
    """Refuse, before any work, a precision this device or DP-SGD cannot honour (one line)."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        return
    if precision == "fp16" and private:
        raise ConfigError(FP16_UNDER_DP)
    try:
        with torch.autocast(device.type, dtype=dtype):
            torch.ones(1, 1, device=device) @ torch.ones(1, 1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(
            f"train.precision={precision!r} is not allowed on {device}: torch cannot autocast to {dtype} there "
            f"({str(err).splitlines()[0]}); allowed: 32"
        ) from None


class Precision:
    """The loop's forward context, backward and step for one precision."""

    def __init__(self, precision: str, device: torch.device):
        self.name, self.device, self.dtype = precision, device, DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        if self.dtype is not None:
            fp32_per_sample_math()

    def check_private_step(self, mode: str, world: int, fallback: str | None) -> None:
        """Refuse (before any step or charge) a low-precision forward under Opacus' ghost clipping, whatever chose
        it: ``privacy.grad_sample_mode=ghost``, data-parallel ranks (Opacus' distributed ghost optimizer), FSDP, or
        book-keeping's fallback. Ghost clipping forms the clipped sum in a second backward through the recorded
        bf16 forward, so the clip factors (from float32 norms) scale bf16-rounded gradients: a record's own clipped
        gradient measured up to 1.002 C alone and 1.011 C against its batch (tests/test_dp_numerics.py), past the
        sensitivity the accountant charges for. bk and hooks clip the float32 per-sample gradients themselves.
        fp16 is refused here too, whatever path reached the loop: ``aisec_train.fit`` trained it under DP (its
        scaler's skipped steps follow the batch's own unclipped gradients)."""
        if self.name == "fp16":
            raise ConfigError(FP16_UNDER_DP)
        if self.dtype is None or mode not in ("ghost", "ghost_fsdp"):
            return
        why = f"{world} data-parallel ranks clip with it" if world > 1 else f"book-keeping fell back: {fallback}"
        why = why if world > 1 or fallback else "privacy.grad_sample_mode=ghost"
        raise ConfigError(
            f"train.precision={self.name!r} is not allowed with Opacus' ghost clipping ({why}): it forms the clipped "
            "sum in a second backward through the bf16 forward, so a record's clipped gradient can exceed "
            "privacy.max_grad_norm; allowed: train.precision=32, or bf16 with privacy.grad_sample_mode=hooks, or "
            "with bk in one process"
        )

    def autocast(self):
        if self.dtype is None:
            return nullcontext()  # float32: no autocast object per step
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sum_backward(self, private: bool) -> bool:
        """Whether a private step backpropagates the sum of its rows' losses (privacy/engine.py's ``sum_backward``).

        Under bf16 and a mean loss, the 1/B of the batch (B changes when a record joins a Poisson batch) entered
        every gradient before the bf16 backward rounded it: one record moved every other record's clipped gradient
        by rounding, and the batch's clipped sum by up to 1.008 C (small models, B = 6 to 512) against the C the
        accountant charges for. Summed, each row's gradient no longer depends on B: 1.0000002 C, as in float32."""
        return private and self.dtype is not None

    def backward(self, loss: torch.Tensor, rows: int = 1, private: bool = False) -> None:
        """``loss`` is the objective's mean over ``rows`` rows; a private low-precision step backpropagates its sum."""
        if self.sum_backward(private):
            loss = loss * rows
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then shrinks
        self.scaler.update()
