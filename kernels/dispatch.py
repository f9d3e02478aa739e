"""The one place that decides between a Triton kernel and its torch reference.

``auto`` picks Triton when a tensor lives on CUDA, or when ``TRITON_INTERPRET=1`` makes Triton run kernels
on the CPU (that is how tests hold each kernel equal to its reference); otherwise it picks torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Literal

import torch

Backend = Literal["triton", "torch"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> Backend:
    """Map ``"auto" | "triton" | "torch"`` to the implementation that will run on ``tensors``."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r}: choose 'auto', 'triton' or 'torch'")
    if backend == "torch":
        return "torch"
    runnable = interpret_mode() or any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if runnable and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install 'aisec-train[gpu]')")
    if not runnable:
        raise ValueError(
            "backend='triton' got CPU tensors: move them to CUDA, set TRITON_INTERPRET=1 to run the kernel "
            "in Triton's CPU interpreter, or use backend='torch'"
        )
    return "triton"


def jit(fn: Callable) -> Callable:
    """``triton.jit(fn)``, built on first launch rather than at import.

    Triton reads ``TRITON_INTERPRET`` when it decorates a function, its own library (``tl.zeros``,
    ``tl.rand``) included, which it decorates at ``import triton``. So this package never imports triton at
    import time: the first launch does, and binds ``tl`` in the kernel's module. Importing aisec_kernels (or
    aisec_train) therefore never fixes the interpreter mode for a later test, and the package works where
    triton is not installed.
    """
    return _jit_for_mode(fn, interpret_mode())


@functools.cache
def _jit_for_mode(fn: Callable, interpret: bool) -> Callable:
    import triton
    import triton.language as tl

    fn.__globals__["tl"] = tl  # the kernel module's placeholder ``tl = None`` becomes the real module
    return triton.jit(fn)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
