"""What book-keeping captures during the one backward pass, and the autograd functions that capture it.

Each supported layer runs its op inside :class:`_Op`, a custom autograd function whose backward returns the
gradient of the layer's *input* only: autograd never computes the non-private weight gradient, which is the
saving book-keeping is about. The same backward hands the output gradient ``g`` to the layer's record, next
to the input ``a`` kept at forward time. Once every forward call of the layer has its ``g``, the record asks
its rule for the per-sample norms (and, where cheaper, the per-sample gradients), and drops what the clipped
sum will not need. Layers that book-keeping has no rule for run with detached parameters under :class:`_Tap`,
which only records ``g`` (Opacus' grad sampler for that layer type turns it into per-sample gradients).

A layer called twice before one backward (TRADES: clean and adversarial inputs) keeps one :class:`Call` per
forward; its per-sample gradient is the sum over calls, and the rules account for the cross terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from aisec_train.train.bk_call import Call

if TYPE_CHECKING:
    from aisec_train.train.bk_layers import Processed, Rule


@dataclass
class LayerRecord:
    """A supported (or Opacus-sampled) layer of the wrapped model and what one step captured for it."""

    name: str
    module: nn.Module
    rule: Rule
    hub: Any  # the BKGradSampleModule, told when a backward starts so it can schedule the clipping
    params: dict[str, nn.Parameter]
    calls: list[Call] = field(default_factory=list)
    processed: Processed | None = None
    method: str | None = None  # the last step's method, for the report
    why: str | None = None
    busy: bool = False  # inside the layer's own forward (an Opacus-sampled layer re-enters it once)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.params.items() if p.requires_grad}

    def add_call(self, saved: tuple) -> Call:
        first = saved[0] if saved else None
        call = Call(saved, first._version if isinstance(first, Tensor) else 0)
        self.calls.append(call)
        return call

    def receive(self, call: Call, grad: Tensor) -> None:
        first = call.saved[0] if call.saved else None
        if isinstance(first, Tensor) and first._version != call.version:
            raise RuntimeError(
                f"bk: the input of layer {self.name!r} was modified in place between its forward and backward; "
                "book-keeping needs it unchanged (clone it, or use privacy.grad_sample_mode=ghost)"
            )
        if grad.dtype in _LOW_PRECISION:  # train.precision=bf16/fp16: per-sample norms and clipping in fp32
            grad = grad.float()
            low = _LOW_PRECISION
            call.saved = tuple(t.float() if isinstance(t, Tensor) and t.dtype in low else t for t in call.saved)
        call.grad = grad
        self.hub.backward_started()
        if all(c.grad is not None for c in self.calls):
            self.process()

    def process(self) -> None:
        """Per-sample norms from the calls that got a gradient; free what the clipped sum will not need."""
        done = [c for c in self.calls if c.grad is not None]
        self.calls = done
        if not done:
            return
        sizes = {c.grad.shape[0] for c in done}
        if len(sizes) > 1:
            raise ValueError(
                f"bk: layer {self.name!r} ran on batches of sizes {sorted(sizes)} before one backward; "
                "per-sample clipping needs every forward of a step on the same samples"
            )
        self.processed = self.rule.norms(self.module, self.trainable(), done)
        self.method, self.why = self.processed.method, self.processed.why
        if not self.processed.keep_calls:
            for call in done:  # free the input and output gradient now, not at the end of the backward
                call.saved, call.grad, call.extra = (), None, None
            self.calls = []

    def clipped(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        grads = self.rule.clipped(self.module, self.trainable(), self.processed, self.calls, weights)
        self.reset()
        return grads

    def reset(self) -> None:
        self.calls, self.processed = [], None

    def drop_rows(self, rows: Tensor) -> None:
        """Zero what this step captured for the samples in ``rows`` (a boolean (B,) mask): those whose norm is not
        finite, whose clip factor is 0. A zero factor alone did not drop them: a record whose forward overflowed
        has inf inputs or NaN output gradients here, and ``0 * inf`` is NaN, so the clipped sum, the step and the
        model went NaN (the run stopped at the step that drew the record). Every captured tensor is per sample,
        batch first (inputs, output gradients, norm statistics, stored per-sample gradients)."""

        def zero(t: Any) -> Any:
            return _zero_rows(t, rows) if isinstance(t, Tensor) and t.dim() and t.shape[0] == rows.shape[0] else t

        for call in self.calls:
            call.saved = tuple(zero(t) for t in call.saved)
            call.grad = zero(call.grad)
            if call.extra is not None:
                call.extra = tuple(zero(t) for t in call.extra)
        if self.processed is not None:
            self.processed.stored = {k: _zero_chunks(v, rows) for k, v in self.processed.stored.items()}


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _zero_rows(t: Tensor, rows: Tensor) -> Tensor:
    return torch.where(rows.view(-1, *[1] * (t.dim() - 1)), torch.zeros((), dtype=t.dtype, device=t.device), t)


def _zero_chunks(stored: Tensor | list[Tensor], rows: Tensor) -> Tensor | list[Tensor]:
    """Stored per-sample gradients, one tensor or consecutive chunks of samples (bk_conv keeps chunks)."""
    if isinstance(stored, Tensor):
        return _zero_rows(stored, rows)
    out, start = [], 0
    for chunk in stored:
        out.append(_zero_rows(chunk, rows[start : start + chunk.shape[0]]))
        start += chunk.shape[0]
    return out


class _Op(torch.autograd.Function):
    """A supported layer's op: forward as usual; backward returns the input gradient only and records ``g``."""

    @staticmethod
    def forward(ctx, record: LayerRecord, x: Tensor, *params: Tensor) -> Tensor:
        out, saved = record.rule.forward(record.module, x)
        ctx.record, ctx.call = record, record.add_call(saved)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        record, call = ctx.record, ctx.call
        grad = grad.detach().contiguous() if record.rule.contiguous_grad else grad.detach()
        grad_x = record.rule.backward(record.module, call, grad, ctx.needs_input_grad[1])
        ctx.call = None  # the graph outlives the backward (until the loss is dropped): keep nothing here
        record.receive(call, grad)
        return (None, grad_x) + (None,) * (len(ctx.needs_input_grad) - 2)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output (cloned, so later in-place ops stay legal) that records its gradient.

    The parameters ride along only so the output requires grad even when the layer's input does not.
    """

    @staticmethod
    def forward(ctx, record: LayerRecord, call: Call, out: Tensor, *params: Tensor) -> Tensor:
        ctx.record, ctx.call, ctx.n_params = record, call, len(params)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        call, ctx.call = ctx.call, None
        ctx.record.receive(call, grad.detach())
        return (None, None, grad) + (None,) * ctx.n_params


def run_op(record: LayerRecord, x: Tensor) -> Tensor:
    return _Op.apply(record, x, *record.params.values())


def tap(record: LayerRecord, call: Call, out: Tensor) -> Tensor:
    return _Tap.apply(record, call, out, *record.params.values())
