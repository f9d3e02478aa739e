"""Book-keeping for Conv1d / Conv2d: any stride, dilation, groups, and every padding mode.

Per group, sample ``i``'s weight gradient is ``g_i^T a_i`` with ``a_i: (T, Da)`` its unfolded input patches
(``Da = C_in/groups * prod(kernel)``) and ``g_i: (T, Dg)`` the output gradients at the ``T`` output positions.
Norms come from :func:`~aisec_train.train.bk_cost.choose`'s pick:

* instantiate, on the CPU: the convolution's own weight-gradient op with the samples folded into the groups
  (``(1, N*C, H, W)`` input, ``N*groups`` groups), in calls of :func:`fold_size` samples (past ``FOLD_FLOATS``
  gradient floats per call the op slows down up to 6x): as fast as the batch's weight gradient and with no patch
  copy; kept gradients stay in those chunks, and a folded layer may keep up to ``FOLDED_MEM_FACTOR`` times its
  kept tensors; on CUDA: the patches (a strided view of the padded input, copied once) times ``g`` in one
  ``bmm``, or the fused Triton norm when the gradients are not kept;
* ghost, on CUDA: the fused Triton ghost-norm kernel on the patches;
* ghost, on the CPU, when cheaper: the patch Gram ``a_i a_i^T`` assembled from the Gram of the input's *pixels*
  (``P x P``, contracted over channels only) by gathering the ``prod(kernel)`` shifted entries and summing
  them, which skips the ``prod(kernel)``-fold patch copy that otherwise costs more than the convolution.

The clipped sum of ghost layers is the convolution's own weight-gradient op run once on ``c * g``.
Non-zero padding modes and string paddings are applied by :meth:`ConvRule.prepare`, outside the op, so the
op itself always pads with symmetric zeros.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from aisec_kernels import resolve_backend
from aisec_kernels.per_sample_norms import ghost_norm_sq, instantiated_norm_sq
from torch import Tensor

from aisec_train.train.bk_cost import MEM_FACTOR, choose
from aisec_train.train.bk_layers import _CHUNK, Processed, Rule, _bcast, _cat, _sq, _weighted


def _geometry(module, x: Tensor, padding: list[int]) -> tuple[Tensor, list[int], list[int], list[int]]:
    """The zero-padded input as (B, C, H, W) and kernel, dilation, stride as 2-D lists (Conv1d is 1 x k)."""
    k, d, s = list(module.kernel_size), list(module.dilation), list(module.stride)
    if x.dim() == 3:
        x, k, d, s, padding = x.unsqueeze(2), [1, *k], [1, *d], [1, *s], [0, *padding]
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    return x, k, d, s


def _out_size(h: int, w: int, k, d, s) -> tuple[int, int]:
    return (h - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w - d[1] * (k[1] - 1) - 1) // s[1] + 1


def _unpadded(x: Tensor, padding: list[int]) -> tuple[int, int, int, int]:
    """An input's (H, W) before padding and its (ph, pw) zero padding, Conv1d as height 1."""
    if x.dim() == 3:
        return 1, x.shape[2], 0, padding[0]
    return x.shape[2], x.shape[3], padding[0], padding[1]


def unfold(module, x: Tensor, padding: list[int], ones_row: bool = False) -> Tensor:
    """(B, C_in * prod(k), T) patches, channel-major like the weight's (C_out, C_in/groups, *k) layout.

    A strided view copied once: on the CPU several times faster than ``F.unfold`` (im2col). With ``ones_row``
    each group's rows end with a row of ones, (B, groups * (C_in/groups * prod(k) + 1), T): a product with the
    output gradients then also gives the bias gradient (their sum over positions) in the same pass.
    """
    x, k, d, s = _geometry(module, x, padding)
    b, c, h, w = x.shape
    oh, ow = _out_size(h, w, k, d, s)
    sb, sc, sh, sw = x.stride()
    view = x.as_strided((b, c, *k, oh, ow), (sb, sc, sh * d[0], sw * d[1], sh * s[0], sw * s[1]), x.storage_offset())
    if not ones_row:
        return view.reshape(b, c * k[0] * k[1], oh * ow)
    groups, rows = module.groups, c // module.groups * k[0] * k[1]
    patches = torch.empty(b, groups, rows + 1, oh * ow, dtype=x.dtype, device=x.device)
    patches[:, :, :rows].view(b, groups, c // groups, *k, oh, ow).copy_(view.view(b, groups, c // groups, *k, oh, ow))
    patches[:, :, rows].fill_(1)
    return patches.view(b, groups * (rows + 1), oh * ow)


@functools.lru_cache(maxsize=64)
def _pixel_index(
    calls: tuple[tuple[int, int, int, int], ...], k: tuple, d: tuple, s: tuple, device: torch.device
) -> Tensor:
    """Flat indices into the (P + 1, P + 1) pixel Gram of every (kernel offset, position, position) triple.

    ``calls`` lists each forward call's unpadded (H, W) and zero padding (ph, pw). Their ``P`` pixels are
    concatenated, so a layer run twice before one backward gets the cross terms between its calls; a patch
    entry that falls on the padding points at the Gram's extra zero row and column (index ``P``).
    """
    total = sum(h * w for h, w, _, _ in calls)
    rows, start = [], 0
    for h, w, ph, pw in calls:
        hp, wp = h + 2 * ph, w + 2 * pw
        oh, ow = _out_size(hp, wp, k, d, s)
        r = torch.arange(oh)[:, None] * s[0] + torch.arange(k[0])[None, :] * d[0] - ph  # (oh, kh) unpadded row
        c = torch.arange(ow)[:, None] * s[1] + torch.arange(k[1])[None, :] * d[1] - pw  # (ow, kw) unpadded col
        rr, cc = r.T[:, None, :, None], c.T[None, :, None, :]  # (kh, 1, oh, 1), (1, kw, 1, ow)
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        pix = torch.where(inside, start + rr * w + cc, torch.full_like(rr * cc, total))
        rows.append(pix.reshape(k[0] * k[1], oh * ow))  # (K, T of this call)
        start += h * w
    pix = torch.cat(rows, 1)  # (K, T)
    return (pix[:, :, None] * (total + 1) + pix[:, None, :]).flatten().to(device)


@functools.lru_cache(maxsize=64)
def _pixel_spread(
    calls: tuple[tuple[int, int, int, int], ...], k: tuple, d: tuple, s: tuple, dtype: torch.dtype, device
) -> Tensor:
    """:func:`_pixel_index` as a sparse CSR (T^2, P^2) matrix: row (t1, t2) sums the pixel-Gram entries of its
    kernel offsets. Entries on the padding are dropped (they read zeros), so the Gram needs no padded copy."""
    total = sum(h * w for h, w, _, _ in calls)
    index = _pixel_index(calls, k, d, s, torch.device("cpu"))
    rows = torch.arange(len(index)) % (len(index) // math.prod(k))
    first, second = index // (total + 1), index % (total + 1)
    inside = (first < total) & (second < total)
    cols = first[inside] * total + second[inside]
    shape = (len(index) // math.prod(k), total * total)
    entries = torch.stack([rows[inside], cols])
    # torch warns once that sparse CSR is in beta and that invariant checks are off by default: neither may reach
    # a run's stderr (the CLI's refusals are one line); the checks are on, since this runs once per shape.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ones = torch.ones(len(cols), dtype=dtype)
        coo = torch.sparse_coo_tensor(entries, ones, shape, check_invariants=True)  # built once per shape
        return coo.coalesce().to_sparse_csr().to(device)  # coalesce sums repeated entries


def ghost_by_pixels(module, pixels: int, t: int, grad: Tensor) -> bool:
    """Gram of pixels (P^2 Cg MACs + a K T^2 gather) beats patch copy + patch Gram (T Da + T^2 Da)? CPU only:
    on CUDA the fused Triton kernel reads the patches."""
    k = math.prod(module.kernel_size)
    da = module.in_channels // module.groups * k
    by_pixels = pixels * pixels * (module.in_channels // module.groups) + 2 * k * t * t
    return by_pixels < 3 * t * da + t * t * da and resolve_backend("auto", grad) == "torch"


# At most this many input channels per group: per-sample gradients by patches times output gradients (``bmm``)
# on the CPU too. The folded-group op ran 1.6x slower than the bmm on 3 channels at 32x32 (batch 128, 1 thread)
# and over 10x slower with 2 threads on a loaded machine; on 32 channels it was 4x faster than the bmm.
FEW_CHANNELS = 4


def few_input_channels(module) -> bool:
    return module.in_channels // module.groups <= FEW_CHANNELS


# Per-sample gradients of at most this many floats per folded-group call. mkldnn's weight-gradient op is about as
# fast as the batch's own while the folded gradient stays small, and up to 6x slower past it (1 thread; a one-off
# check on 2 threads showed the same pattern): ResNet-18's blocks.2.conv2 at batch 64 took 1.34x the batch's weight
# gradient in calls of 2 samples and 2.71x in one call of 64; the cnn 32x32's conv2 at batch 256, 1.23x in calls of
# 16 and 1.61x in one (benchmarks/bk_layer_costs.py --only fold, benchmarks/results/cpu/bk_fold.json).
FOLD_FLOATS = 1 << 19


# Per-sample gradients of a folded-group conv may take this many times the layer's kept (input + grad) floats (the
# cost model's MEM_FACTOR elsewhere). Kept, they save a second weight-gradient op at the clipped sum; the layers this
# admits on ResNet-18 at batch 64 (128 channels at 16x16, 2.25x) are stored after the backward's peak has passed:
# its step went from 1.25 to 1.17-1.18x non-private at 1.05-1.11x non-private peak memory (1.10x before;
# benchmarks/results/cpu/dpsgd_chunked_run{1,2}.json).
FOLDED_MEM_FACTOR = 2.5


def fold_size(per_sample: int) -> int:
    """Samples per folded-group call: the largest power of two whose per-sample gradients fit FOLD_FLOATS."""
    n = max(1, FOLD_FLOATS // max(1, per_sample))
    return 1 << (n.bit_length() - 1)


class ConvRule(Rule):
    @staticmethod
    def _prepadded(module) -> bool:
        return module.padding_mode != "zeros" or isinstance(module.padding, str)

    def prepare(self, module, x):
        if module.padding_mode != "zeros":
            return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        if isinstance(module.padding, str):  # 'same' may be asymmetric: the extra pixel goes last, as in torch
            pads = []
            for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
                total = d * (k - 1) if module.padding == "same" else 0
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads)
        return x

    def forward(self, module, x):
        padding = [0] * (x.dim() - 2) if self._prepadded(module) else list(module.padding)
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        out = conv(x, module.weight, module.bias, module.stride, padding, module.dilation, module.groups)
        return out, (x.detach(), padding)

    @staticmethod
    def _backward(module, x, grad, padding, mask, weight=None, groups=None):
        weight = module.weight if weight is None else weight
        return torch.ops.aten.convolution_backward(
            grad, x, weight.to(grad.dtype), None, list(module.stride), padding, list(module.dilation),
            False, [0] * (x.dim() - 2), groups or module.groups, mask,
        )  # fmt: skip

    def input_grad(self, module, saved, grad):
        return self._backward(module, saved[0], grad, saved[1], [True, False, False])[0]

    def norms(self, module, params, calls):
        b, groups = calls[0].grad.shape[0], module.groups
        da = module.in_channels // groups * math.prod(module.kernel_size)
        dg = module.out_channels // groups
        t = sum(c.grad[0].numel() // module.out_channels for c in calls)
        kept = sum(c.saved[0][0].numel() + c.grad[0].numel() for c in calls)
        out = Processed(torch.zeros(b, device=calls[0].grad.device), "ghost", "", False)
        on_cuda = calls[0].grad.is_cuda
        folded = not on_cuda and not few_input_channels(module)  # the CPU folded-group op
        pick = None
        if "weight" in params:
            mem_factor = FOLDED_MEM_FACTOR if folded else MEM_FACTOR
            pick = choose(t=t, da=da, dg=dg, groups=groups, kept=kept, mem_factor=mem_factor)
        # Per-sample gradients by patches x bmm: the bias comes from the same bmm (a row of ones in the patches),
        # as one (C_out, Da + 1) matrix per sample, [weight | bias]: a separate sum over positions re-read the whole
        # output gradient (the cnn 32x32's conv1: 2.5 ms a step), and splitting the matrix cost two copies.
        by_bmm = pick is not None and pick.method == "instantiate" and (pick.store if on_cuda else not folded)
        bias_by_bmm = by_bmm and "bias" in params
        if "bias" in params and not bias_by_bmm:
            out.stored["bias"] = sum(c.grad.flatten(2).sum(2) for c in calls)
            out.norm_sq += _sq(out.stored["bias"])
        if pick is None:
            return out
        out.method, out.why, out.keep_calls = pick.method, pick.why, not pick.store
        self._weight_norms(out, module, calls, pick=pick, t=t, da=da, dg=dg, folded=folded, bias_by_bmm=bias_by_bmm)
        return out

    def _weight_norms(self, out: Processed, module, calls, *, pick, t, da, dg, folded, bias_by_bmm) -> None:
        """Adds the weight's per-sample squared norms to ``out`` (and keeps what the clipped sum needs), chunk by
        chunk of samples so the transient patches and gradients stay under ``_CHUNK`` floats."""
        b, groups = calls[0].grad.shape[0], module.groups
        pixels = sum(c.saved[0][0, 0].numel() for c in calls)  # unpadded: the Gram's padding entries are zeros
        by_pixels = pick.method == "ghost" and ghost_by_pixels(module, pixels, t, calls[0].grad)
        kept_as = "weight_and_bias" if bias_by_bmm else "weight"
        if pick.store:  # per-sample gradients kept in the chunks they are computed in (see _weighted_chunks)
            out.stored[kept_as] = []
        per_sample = groups * (pixels * pixels if by_pixels else da * (t if pick.method == "ghost" else dg))
        cpu_instantiate = pick.method == "instantiate" and not calls[0].grad.is_cuda
        if cpu_instantiate and not folded:
            per_sample = max(per_sample, groups * da * t)  # the patches are copied for the bmm
        step = max(1, _CHUNK // max(1, per_sample))
        repeated = None  # the folded-group op's weight for ``step`` samples, built once for the layer
        if cpu_instantiate and folded:
            step = min(step, fold_size(per_sample))
            repeated = module.weight.detach().repeat(step, *([1] * (module.weight.dim() - 1)))
        biases: list[Tensor] = []  # per-sample bias gradients from the bmm when the weight's are not kept
        for lo in range(0, b, step):
            part = [(c.saved[0][lo : lo + step], c.saved[1], c.grad[lo : lo + step]) for c in calls]
            n = part[0][2].shape[0]
            if pick.method == "ghost":
                if by_pixels:
                    out.norm_sq[lo : lo + n] += self._pixel_ghost(module, part)
                else:
                    out.norm_sq[lo : lo + n] += ghost_norm_sq(*self._patches(module, part)).view(n, groups).sum(1)
                continue
            if part[0][2].is_cuda and not pick.store:  # fused Triton norm on the patches; nothing stored
                out.norm_sq[lo : lo + n] += instantiated_norm_sq(*self._patches(module, part)).view(n, groups).sum(1)
                continue
            ps = self._per_sample_grads(module, part, repeated, with_bias=bias_by_bmm)
            if pick.store:
                out.stored[kept_as].append(ps)
            elif bias_by_bmm:
                biases.append(ps[..., -1])
            out.norm_sq[lo : lo + n] += _sq(ps)  # with the bias column: weight and bias in one pass
        if biases:
            out.stored["bias"] = torch.cat(biases)

    def _per_sample_grads(
        self, module, part: list[tuple[Tensor, list[int], Tensor]], repeated=None, with_bias: bool = False
    ) -> Tensor:
        """(N, *weight.shape) per-sample weight gradients, summed over the calls; with ``with_bias`` (the bmm
        path only) (N, C_out, C_in/groups * prod(k) + 1): each sample's [weight | bias] from one bmm.

        On the CPU, mkldnn's weight-gradient op with the batch folded into the groups (as fast as the batch's
        own weight gradient, and no patch copy), except for a layer with few input channels per group (a
        network's first conv on an image), where that op's groups are too thin and the patch copy is small;
        on CUDA and for those, patches times output gradients in one ``bmm``. ``repeated``: the weight repeated
        for at least ``N`` samples, built once per layer by :meth:`norms` (the op reads only its shape).
        """
        n = part[0][2].shape[0]
        if part[0][2].is_cuda or few_input_channels(module):
            a, g = self._patches(module, part, ones_row=with_bias)
            grads = torch.bmm(g.transpose(1, 2), a.to(g.dtype))  # (N * groups, Dg, Da [+ 1])
            return grads.view(n, module.out_channels, -1) if with_bias else grads.view(n, *module.weight.shape)
        rows = n * module.out_channels
        if repeated is None or repeated.shape[0] < rows:
            repeated = module.weight.detach().repeat(n, *([1] * (module.weight.dim() - 1)))
        grads = [
            self._backward(
                module, x.reshape(1, -1, *x.shape[2:]), grad.reshape(1, -1, *grad.shape[2:]), pad,
                [False, True, False], weight=repeated[:rows], groups=n * module.groups,
            )[1].view(n, *module.weight.shape)
            for x, pad, grad in part
        ]  # fmt: skip
        return grads[0] if len(grads) == 1 else sum(grads)

    @staticmethod
    def _patches(module, part: list[tuple[Tensor, list[int], Tensor]], ones_row: bool = False) -> tuple[Tensor, Tensor]:
        """(N * groups, T, Da) patches (``Da + 1`` with ``ones_row``, see :func:`unfold`) and (N * groups, T, Dg)
        output gradients, calls concatenated along T."""
        groups = module.groups
        a = _cat([unfold(module, x, pad, ones_row) for x, pad, _ in part], 2)
        g = _cat([grad.flatten(2) for _, _, grad in part], 2)
        n, t = a.shape[0], a.shape[2]
        return a.view(n * groups, -1, t).transpose(1, 2), g.reshape(n * groups, -1, t).transpose(1, 2)

    @staticmethod
    def _pixel_ghost(module, part: list[tuple[Tensor, list[int], Tensor]]) -> Tensor:
        """Ghost norms with the patch Gram gathered from the pixel Gram (see the module docstring).

        The Gram is of the unpadded pixels plus one zero row and column for the padding: no padded copy, and
        on a small feature map most of the padded Gram would be zeros (4x4 padded to 6x6: 2.25x the pixels).
        """
        groups = module.groups
        _, k, d, s = _geometry(module, part[0][0][:1, :1], part[0][1])
        n, c = part[0][0].shape[:2]
        pixels = _cat([x.reshape(n * groups, c // groups, -1) for x, *_ in part], 2)  # (N G, Cg, P)
        gram_x = torch.bmm(pixels.transpose(1, 2), pixels)  # (N G, P, P)
        calls = tuple(_unpadded(x, pad) for x, pad, _ in part)
        t = sum(grad[0].numel() for *_, grad in part) // module.out_channels
        g = _cat([grad.reshape(n * groups, module.out_channels // groups, -1) for *_, grad in part], 2)
        gram_g = torch.bmm(g.transpose(1, 2), g).to(gram_x.dtype)  # (N G, T, T)
        if gram_x.dtype in (torch.float32, torch.float64):
            # The gather and sum over kernel offsets as one sparse (T^2 x P^2) matmul: 4x faster than
            # index_select + sum on the cnn's conv2 (batch 512, 1 thread), and no padded Gram copy.
            spread = _pixel_spread(calls, tuple(k), tuple(d), tuple(s), gram_x.dtype, gram_x.device)
            gram_a = spread @ gram_x.flatten(1).T  # (T^2, N G)
            return (gram_a.T * gram_g.flatten(1)).sum(1).view(n, groups).sum(1).float()
        gram_x = F.pad(gram_x, (0, 1, 0, 1))  # (N G, P + 1, P + 1): the zero row and column for the padding
        index = _pixel_index(calls, tuple(k), tuple(d), tuple(s), gram_x.device)
        gram_a = gram_x.flatten(1).index_select(1, index).view(n * groups, -1, t, t).sum(1)
        return (gram_a.mul_(gram_g)).sum((1, 2)).view(n, groups).sum(1).float()

    def clipped(self, module, params, processed, calls, weights):
        if "weight_and_bias" in processed.stored:  # the bmm's [weight | bias] per sample: one weighted reduce
            both = _weighted_chunks(weights, processed.stored["weight_and_bias"])
            # Contiguous copies (C_out x Da floats): a strided column would reach p.grad, Opacus' optimizer and,
            # under torchrun, the gradient all-reduce, which refuses non-contiguous tensors.
            weight, bias = both[:, :-1].reshape(module.weight.shape).contiguous(), both[:, -1].contiguous()
            return {module.weight: weight, module.bias: bias}
        grads = {}
        if "bias" in params:
            grads[module.bias] = _weighted(weights, processed.stored["bias"])
        if "weight" in params and "weight" in processed.stored:
            grads[module.weight] = _weighted_chunks(weights, processed.stored["weight"])
        elif "weight" in params:  # book-keeping: the conv weight-gradient op, once, on the clipped output grads
            # The per-sample weight on the smaller of input and output gradient (linear in both).
            grads[module.weight] = sum(
                self._backward(module, *_scale_smaller(x, c.grad, weights), pad, [False, True, False])[1]
                for c in calls
                for x, pad in [c.saved]
            )
        return grads


def _weighted_chunks(weights: Tensor, chunks: list[Tensor]) -> Tensor:
    """``sum_i weights_i * grad_i`` over per-sample gradients kept as consecutive chunks of samples.

    Not copied into one ``(B, *weight.shape)`` buffer: that copy costs a pass over them, and a buffer over glibc's
    32 MB mmap threshold (ResNet-18's 128-channel layers at batch 64: 38 MB) is fresh pages every step."""
    total, lo = 0, 0
    for chunk in chunks:
        total = total + _weighted(weights[lo : lo + len(chunk)], chunk)
        lo += len(chunk)
    return total


def _scale_smaller(x: Tensor, grad: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, grad)`` with sample ``i`` of the smaller one scaled by ``weights_i``."""
    if x[0].numel() < grad[0].numel():
        return x * _bcast(weights, x), grad
    return x, grad * _bcast(weights, grad)
