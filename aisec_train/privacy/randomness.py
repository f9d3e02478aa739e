"""Where DP-SGD's randomness comes from: the Gaussian noise and the Poisson batch draws from OS entropy.

The accountant's epsilon holds only if nobody can predict the noise or the batches. ``train.seed`` is in
``report.json``, so under DP neither may follow it: :func:`secret_generator` fills a torch generator's whole state
from ``os.urandom``. The seed keeps governing what may be public (initial weights, the split, augmentation,
canaries). ``privacy.reproducible_noise=true`` makes both follow the seed again, for debugging only: the report, the
model card and the DP checklist item then say that no DP guarantee holds (docs/privacy.md, "What the randomness
protects against").

    >>> noise = secret_generator("cpu")
    >>> torch.normal(0.0, 1.0, (3,), generator=noise)  # differs in every process, whatever train.seed is
"""

from __future__ import annotations

import os
from typing import Any

import torch

# torch's CPU generator is MT19937, and ``manual_seed`` keeps only the low 32 bits of the seed: a 32-bit search
# would replay it. So the 624 state words are written from OS entropy instead (19,968 bits). The state tensor is
# torch's CPUGeneratorImplState: int64 seed, int left, int seeded, uint64 next, then 624 words as uint64 slots.
_MT_WORDS, _MT_OFFSET, _MT_SLOT = 624, 24, 8
_MT_STATE_BYTES = 5056


def _mt_layout_ok(state: torch.Tensor, seed: int) -> bool:
    """Whether ``state`` (of a generator seeded with ``seed``) has the layout this module writes into."""
    first = bytes(state[_MT_OFFSET : _MT_OFFSET + _MT_SLOT].tolist())
    return state.numel() == _MT_STATE_BYTES and first == seed.to_bytes(_MT_SLOT, "little")


def _secret_mt19937() -> torch.Generator:
    generator = torch.Generator()
    seed = 5489  # MT19937's reference seed: only to read the layout, every state word is then overwritten
    state = generator.manual_seed(seed).get_state()
    if not _mt_layout_ok(state, seed):  # a torch release changed the layout: refuse rather than seed weakly
        raise RuntimeError(
            f"torch {torch.__version__}: unknown CPU generator state layout; cannot seed it from OS entropy"
        )
    words = torch.frombuffer(bytearray(os.urandom(4 * _MT_WORDS)), dtype=torch.uint8).view(_MT_WORDS, 4)
    slots = state[_MT_OFFSET : _MT_OFFSET + _MT_WORDS * _MT_SLOT].view(_MT_WORDS, _MT_SLOT)
    slots[:, :4] = words  # little-endian low half of each uint64 slot; the high half stays zero
    generator.set_state(state)
    return generator


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose whole state comes from ``os.urandom``: nobody can replay its draws.

    CPU: MT19937's 624 state words. CUDA: Philox, whose 64-bit key is the seed itself.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return _secret_mt19937()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """``privacy.reproducible_noise=true`` only: a generator anybody who reads the report can replay."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def dp_generators(
    reproducible: bool, seed: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(noise, sampling) generators of one DP training process.

    Each data-parallel rank samples its shard with its own secret generator (independent inclusion coins);
    Opacus' distributed optimizer adds the noise on rank 0 only, once per step, from rank 0's noise generator.
    """
    if reproducible:
        return seeded_generator(seed + 104729, device), seeded_generator(seed + 7919 * rank)
    return secret_generator(device), secret_generator("cpu")  # the Poisson coins are drawn on the CPU


def describe(privacy: Any, seed: int) -> dict[str, Any]:
    """``privacy.randomness`` for the report: where each kind of randomness came from, and what it implies."""
    public = f"train.seed={seed}: initialisation, split, augmentation, canaries"
    if getattr(privacy, "reproducible_noise", False):
        source = f"train.seed={seed} (privacy.reproducible_noise=true: replayable)"
        return {
            "noise": source,
            "sampling": source,
            "public": public,
            "dp_guarantee": False,
            "why": "privacy.reproducible_noise=true: anyone who knows the seed and the other records can replay "
            "training with and without a record, so NO DP guarantee holds",
        }
    return {
        "noise": "os_entropy",
        "sampling": "os_entropy",
        "noise_draw": "secure-mode sum of 4 Gaussian draws per coordinate, halved (Opacus' floating-point attack "
        "mitigation; privacy/noise.py draws it per group of tensors)",
        "public": public,
        "dp_guarantee": True,
    }
