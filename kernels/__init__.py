"""Triton kernels of aisec-train, each beside its torch reference (installed as ``aisec_kernels``)."""

from .channel_stats import ChannelStats, channel_stats
from .dispatch import resolve_backend
from .per_sample_norms import ghost_norm_sq, instantiated_norm_sq
from .pgd_update import pgd_update, random_start

__all__ = [
    "ChannelStats",
    "channel_stats",
    "ghost_norm_sq",
    "instantiated_norm_sq",
    "pgd_update",
    "random_start",
    "resolve_backend",
]
