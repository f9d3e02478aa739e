"""``train.keep_freed_memory``: on the CPU, keep freed memory in the process instead of handing it back each step.

A training step allocates and frees the same few tens of megabytes every time (activations, gradients; the private
step also its per-sample norms' Gram matrices and kept per-sample gradients). glibc's malloc serves blocks above its
mmap threshold (at most 32 MB, and 128 KB until it has seen such a block freed) with fresh ``mmap`` pages and returns
them on ``free``; it also trims the top of its heap whenever more than twice that threshold lies free there. The
next step then page-faults every one of those pages back in, zero-filled by the kernel: on one core, 55k minor
faults per non-private step of the benchmark's 32x32 CNN at batch 256 (215 MB) and 26k per private MLP-Mixer step.
Kept, the same steps ran 16-30% faster on both small CNNs, private and not, 0-6% on ResNet-18 and the mixer
(``benchmarks/dpsgd.py`` and its ``--system-malloc``, back to back: ``benchmarks/results/cpu/dpsgd_system_malloc.json``
then ``dpsgd_kept_pair_check.json``). PyTorch's CPU performance guide suggests preloading jemalloc or tcmalloc for
the same reason; neither is a pip dependency, while glibc's ``mallopt`` does the job in two calls (so it is written
here, through ``ctypes``).

The price: the process keeps its peak resident memory rather than shrinking between steps, and torch's 64-byte
aligned blocks leave holes in the heap, so the resident peak over five steps was 1.0-1.6x a single step's peak under
the defaults (``peak_mb_kept`` against ``peak_mb`` in the benchmark's JSON). ``train.keep_freed_memory=false``
leaves malloc as it was. Other C libraries (musl, macOS) are left alone. The report's ``train.keep_freed_memory``
says whether freed memory is kept in the process that trained: a setting cannot be taken back, so a job with
``false`` that follows one with ``true`` in the same process (a Hydra multirun, several API calls) finds it kept,
says so in its report, and logs a warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, whose freed pages stay mapped
TRIM_THRESHOLD = (1 << 31) - 1  # never trim the heap's top (mallopt takes an int)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks mapped (see the module doc). True where it took effect.

    Idempotent and process-wide; a forked child inherits the setting."""
    global _applied
    if _applied is None:
        _applied = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _applied


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process (earlier, or in a parent before a fork)."""
    return _applied is True


def _mallopt(param: int, value: int) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1
