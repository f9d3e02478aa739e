"""Book-keeping rules: the rule interface, and Linear (any number of leading dims).

Sample ``i``'s weight gradient is ``G_i = g_i^T a_i`` with ``a_i: (T, Da)`` the input rows and ``g_i: (T, Dg)``
the output gradients (:mod:`~aisec_train.train.bk_conv` does the same for convolutions, on their patches).
:func:`~aisec_train.train.bk_cost.choose` picks ghost norms or instantiation per layer and shape; the fused
kernels of :mod:`aisec_kernels.per_sample_norms` compute the norms. The clipped sum ``sum_i c_i G_i`` is then
either a weighted reduce of the kept per-sample gradients or the layer's ordinary weight-gradient op run once
on ``c * g``: the non-private weight gradient itself is never computed. Several forward calls of one layer
(TRADES) are concatenated along ``T``, so the norms include the cross terms between calls exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from aisec_kernels.per_sample_norms import ghost_norm_sq, instantiated_norm_sq
from torch import Tensor, nn

from aisec_train.train.bk_call import Call
from aisec_train.train.bk_cost import choose

_CHUNK = 1 << 22  # floats of unfolded patches processed at once (bounds the private step's transient memory)


@dataclass
class Processed:
    """A layer's per-sample squared norms (unscaled: of the captured, loss-averaged gradients) and state."""

    norm_sq: Tensor  # (B,) float32
    method: str
    why: str
    keep_calls: bool  # the clipped sum reads the calls' inputs and output gradients
    stored: dict[str, Tensor] = field(default_factory=dict)  # per-sample gradients (B, *param.shape)


class Rule:
    """How one layer type runs in book-keeping mode. Subclasses fill in the four steps."""

    static_method: str | None = None  # the report's method when it does not depend on shapes
    # The op's kernels read the output gradient row-contiguous: make it so once, and keep that copy for the norms
    # (the kernel would otherwise copy it inside, and the norms would read the strided original).
    contiguous_grad: bool = False

    def prepare(self, module: nn.Module, x: Tensor) -> Tensor:
        """Ordinary autograd ops applied to the input before the layer's op (default: none)."""
        return x

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple]:
        raise NotImplementedError

    def input_grad(self, module: nn.Module, saved: tuple, grad: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, module: nn.Module, call: Call, grad: Tensor, needs_input_grad: bool) -> Tensor | None:
        """The op's backward: the input gradient (a rule may also stash per-sample results in ``call.extra``)."""
        return self.input_grad(module, call.saved, grad) if needs_input_grad else None

    def norms(self, module: nn.Module, params: dict[str, nn.Parameter], calls: list[Call]) -> Processed:
        raise NotImplementedError

    def clipped(self, module, params, processed: Processed, calls: list[Call], weights: Tensor) -> dict:
        """``{param: sum_i weights_i * per-sample grad_i}`` for the trainable parameters."""
        return {p: _weighted(weights, processed.stored[k]).view_as(p) for k, p in params.items()}


def _weighted(weights: Tensor, per_sample: Tensor) -> Tensor:
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return (weights.to(flat.dtype) @ flat).view(per_sample.shape[1:])


def _sq(t: Tensor) -> Tensor:
    """Per-sample squared norms of a (B, ...) tensor, accumulated in float32 without a squared copy."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=torch.float32).square()


# ------------------------------------------------------------------------------------------------- Linear
class LinearRule(Rule):
    def forward(self, module, x):
        return F.linear(x, module.weight, module.bias), (x.detach(),)

    def input_grad(self, module, saved, grad):
        return grad @ module.weight.to(grad.dtype)

    @staticmethod
    def _rows(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def norms(self, module, params, calls):
        a = _cat([self._rows(c.saved[0]) for c in calls], 1)
        g = _cat([self._rows(c.grad) for c in calls], 1)
        (b, t, da), dg = a.shape, g.shape[2]
        out = Processed(torch.zeros(b, device=g.device), "ghost", "", False)
        if "bias" in params:
            out.stored["bias"] = g.sum(1)
            out.norm_sq += _sq(out.stored["bias"])
        if "weight" in params:
            pick = choose(t=t, da=da, dg=dg, groups=1, kept=t * (da + dg))
            out.method, out.why, out.keep_calls = pick.method, pick.why, not pick.store
            if pick.store:
                out.stored["weight"] = torch.bmm(g.transpose(1, 2), a.to(g.dtype))
                out.norm_sq += _sq(out.stored["weight"])
            else:
                out.norm_sq += (ghost_norm_sq if pick.method == "ghost" else instantiated_norm_sq)(a, g)
        return out

    def clipped(self, module, params, processed, calls, weights):
        grads = {}
        if "bias" in params:
            grads[module.bias] = _weighted(weights, processed.stored["bias"])
        if "weight" in params and "weight" in processed.stored:
            grads[module.weight] = _weighted(weights, processed.stored["weight"])
        elif "weight" in params:  # book-keeping: the weight-gradient matmul, once, on the clipped rows
            grads[module.weight] = sum(_reweighted_matmul(self._rows(c.grad), self._rows(c.saved[0]), weights)
                                       for c in calls)  # fmt: skip
        return grads


def _reweighted_matmul(g: Tensor, a: Tensor, weights: Tensor) -> Tensor:
    """``sum_i weights_i g_i^T a_i`` for ``g: (B, T, Dg)``, ``a: (B, T, Da)``: one matmul over all rows.

    The per-sample weight goes on the narrower of the two operands: the elementwise pass that applies it reads
    and writes every element it scales, and on the MLP-Mixer's channel layers (``Dg = 2 Da``) scaling ``g`` took
    as long as a fifth of the matmul."""
    a = a.to(g.dtype)
    if a.shape[2] < g.shape[2]:
        a = a * _bcast(weights, a)
    else:
        g = g * _bcast(weights, g)
    return g.flatten(0, 1).T @ a.flatten(0, 1)


def _bcast(weights: Tensor, like: Tensor) -> Tensor:
    return weights.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
