"""Book-keeping rules for GroupNorm, LayerNorm, Embedding, and Opacus' grad samplers for every other layer.

Normalisation layers have one weight and one bias entry per channel, so their per-sample gradients are small
(``B x C``) and are always instantiated: ``dW_i = sum over positions of xhat_i * g_i``, ``db_i = sum g_i``,
with ``xhat`` rebuilt from the input and the mean and inverse std the forward kept anyway. An embedding's
per-sample gradient is sparse: one row per distinct token of a sample, so it is instantiated as those rows
(``torch.unique`` over (sample, token) keys), never as a ``B x V x d`` tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import Tensor, nn

from aisec_train.train.bk_conv import ConvRule
from aisec_train.train.bk_layers import LinearRule, Processed, Rule, _sq


class GroupNormRule(Rule):
    static_method = "instantiate"
    contiguous_grad = True

    def forward(self, module, x):
        n, c = x.shape[:2]
        y, mean, rstd = torch.ops.aten.native_group_norm(
            x, module.weight, module.bias, n, c, x[0, 0].numel() if n else 0, module.num_groups, module.eps
        )
        return y, (x.detach(), mean, rstd)

    def backward(self, module, call, grad, needs_input_grad):
        # One native backward on the batch folded into channels, (1, B*C, HW) with B*G groups: the same
        # groups, so the same input gradient, and its "batch-summed" dW, db are now per sample (B*C,).
        x, mean, rstd = call.saved
        n, c = x.shape[:2]
        wants = [
            module.weight is not None and module.weight.requires_grad,
            module.bias is not None and module.bias.requires_grad,
        ]
        weight = module.weight.repeat(n) if module.weight is not None else None
        grad_x, dw, db = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, weight, 1, n * c, x[0, 0].numel(), n * module.num_groups,
            [needs_input_grad, *wants],
        )  # fmt: skip
        call.extra = (dw.view(n, c) if wants[0] else None, db.view(n, c) if wants[1] else None)
        return grad_x

    def norms(self, module, params, calls):
        weight = sum(c.extra[0] for c in calls) if "weight" in params else None
        bias = sum(c.extra[1] for c in calls) if "bias" in params else None
        return _normalisation(params, weight, bias, f"{module.num_groups} groups")


class LayerNormRule(Rule):
    static_method = "instantiate"
    contiguous_grad = True

    def forward(self, module, x):
        # Saved row-contiguous: PyTorch's kernels copy a strided input in the forward and again in the backward,
        # and a transformer's or mixer's residual stream is often strided (``patches.flatten(2).transpose(1, 2)``
        # keeps the (B, C, T) layout through every residual add). On the MLP-Mixer's (256, 64, 128) stream the
        # input gradient took 11.7 ms from the strided input against 0.9 ms from the contiguous one, and the
        # per-sample sums below read x and g in one layout.
        x = x.contiguous()
        y, mean, rstd = torch.ops.aten.native_layer_norm(
            x, module.normalized_shape, module.weight, module.bias, module.eps
        )
        return y, (x.detach(), mean, rstd)

    def input_grad(self, module, saved, grad):
        x, mean, rstd = saved
        return torch.ops.aten.native_layer_norm_backward(
            grad, x, module.normalized_shape, mean, rstd, module.weight, module.bias, [True, False, False]
        )[0]

    def norms(self, module, params, calls):
        # dW_i = sum_t xhat_t g_t = sum_t rstd_t (x_t g_t) - sum_t (mean_t rstd_t) g_t and db_i = sum_t g_t: sums over
        # a sample's rows t, each a batched (1 x T) @ (T x C) matmul. No xhat tensor, one product x * g, and g read
        # once for both of its sums (elementwise passes with strided row sums took 3x as long on the MLP-Mixer).
        width = math.prod(module.normalized_shape)
        weight = bias = 0
        for call in calls:
            x, mean, rstd = call.saved
            n = x.shape[0]
            g = call.grad.reshape(n, -1, width)
            rstd = rstd.reshape(n, 1, -1).to(g.dtype)
            coefficients = []  # rows of the one matmul over g: -mean * rstd for the weight, ones for the bias
            if "weight" in params:
                weight = weight + torch.bmm(rstd, x.reshape(n, -1, width).to(g.dtype) * g).squeeze(1)
                coefficients.append(-mean.reshape(n, 1, -1).to(g.dtype) * rstd)
            if "bias" in params:
                coefficients.append(torch.ones_like(rstd))
            sums = torch.bmm(torch.cat(coefficients, 1), g) if coefficients else None
            if "weight" in params:
                weight = weight + sums[:, 0]
            if "bias" in params:
                bias = bias + sums[:, -1]
        return _normalisation(params, weight, bias, f"normalized_shape={tuple(module.normalized_shape)}")


def _normalisation(params: dict, weight: Tensor, bias: Tensor, shape: str) -> Processed:
    stored = {k: v for k, v in (("weight", weight), ("bias", bias)) if k in params}
    norm = sum(_sq(v) for v in stored.values())
    return Processed(norm, "instantiate", f"{shape}: per-sample gradients are B x C", False, stored)


class EmbeddingRule(Rule):
    static_method = "instantiate"

    def forward(self, module, x):
        return F.embedding(x, module.weight, module.padding_idx), (x.detach(),)

    def input_grad(self, module, saved, grad):
        return None  # indices have no gradient

    def norms(self, module, params, calls):
        n, vocab, width = calls[0].grad.shape[0], module.num_embeddings, module.embedding_dim
        idx = torch.cat([c.saved[0].reshape(n, -1) for c in calls], 1)
        g = torch.cat([c.grad.reshape(n, -1, width) for c in calls], 1).reshape(-1, width)
        keys = (torch.arange(n, device=idx.device)[:, None] * vocab + idx).flatten()
        if module.padding_idx is not None:  # the padding row never receives a gradient
            keep = idx.flatten() != module.padding_idx
            keys, g = keys[keep], g[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(len(unique), width, dtype=g.dtype, device=g.device).index_add_(0, inverse, g)
        sample = unique // vocab
        norm = torch.zeros(n, device=g.device).index_add_(0, sample, rows.float().square().sum(1))
        stored = {"rows": rows, "sample": sample, "token": unique % vocab}
        return Processed(norm, "instantiate", "sparse per-sample rows: one per distinct token", False, stored)

    def clipped(self, module, params, processed, calls, weights):
        rows, sample, token = (processed.stored[k] for k in ("rows", "sample", "token"))
        scaled = rows * weights.to(rows.dtype)[sample, None]
        return {module.weight: torch.zeros_like(module.weight).index_add_(0, token, scaled)}


class OpacusRule(Rule):
    """A layer book-keeping has no rule for: Opacus' registered grad sampler gives per-sample gradients."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.label = self.static_method = f"opacus:{sampler.__name__}"

    def norms(self, module, params, calls):
        names = {id(p): k for k, p in params.items()}
        stored: dict[str, Tensor] = {}
        for call in calls:
            for p, gs in self.sampler(module, list(call.saved), call.grad).items():
                if id(p) in names:
                    k = names[id(p)]
                    stored[k] = stored[k] + gs if k in stored else gs
        norm = sum(_sq(v) for v in stored.values())
        why = f"no book-keeping rule for {type(module).__name__}: Opacus' grad sampler instantiates"
        return Processed(norm, self.label, why, False, stored)


def _plain_forward(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def rule_for(module: nn.Module) -> Rule | None:
    """The book-keeping rule of ``module``, Opacus' grad sampler for its type, or None (not supported)."""
    if _plain_forward(module, nn.Linear):
        return LinearRule()
    if _plain_forward(module, nn.Conv1d) or _plain_forward(module, nn.Conv2d):
        return ConvRule()
    if _plain_forward(module, nn.GroupNorm):
        return GroupNormRule()
    if _plain_forward(module, nn.LayerNorm):
        return LayerNormRule()
    if _plain_forward(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        if not module.sparse:
            return EmbeddingRule()
    sampler = GradSampleModule.GRAD_SAMPLERS.get(type(module))
    return OpacusRule(sampler) if sampler is not None else None
