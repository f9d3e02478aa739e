"""Opt-in timing of the integrity operations, to measure what keyed tags, safe writes and locks add to a job.

Off by default: :func:`timed` then returns the function itself and :func:`span` does nothing, so a job pays
nothing. With ``AISEC_TRAIN_STORE_TIMING=FILE`` in the environment, every store operation (tags, verification,
atomic writes, artifact commits and reads, ledger commits and reads, budget composition, lock acquisition and
release) is timed, and each process appends one JSON line of totals to FILE when it exits. Nested operations
count once in ``outermost_seconds`` (an artifact commit includes the tags and writes it makes); ``payload`` is
the serialization of a checkpoint's content (``torch.save``), which a job without integrity does too.

    AISEC_TRAIN_STORE_TIMING=/tmp/t.jsonl aisec-train      # then: scripts/figures/integrity.py reads the line
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

ENV = "AISEC_TRAIN_STORE_TIMING"
ENABLED = bool(os.environ.get(ENV))
F = TypeVar("F", bound=Callable[..., Any])

_local = threading.local()
_lock = threading.Lock()
_totals: dict[str, list[float]] = {}  # name -> [calls, inclusive seconds, outermost seconds]


@contextmanager
def span(name: str) -> Iterator[None]:
    """Time the block under ``name`` (a no-op unless timing is enabled)."""
    if not ENABLED:
        yield
        return
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        _local.depth = depth
        with _lock:
            row = _totals.setdefault(name, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += seconds
            row[2] += seconds if depth == 0 else 0.0


def timed(name: str) -> Callable[[F], F]:
    """Decorator: time every call of the function under ``name`` (the function itself when timing is off)."""

    def decorate(fn: F) -> F:
        if not ENABLED:
            return fn

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with span(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def totals() -> dict[str, dict[str, float]]:
    with _lock:
        return {k: {"calls": int(c), "seconds": s, "outermost_seconds": o} for k, (c, s, o) in _totals.items()}


def exit_line() -> str:
    """This process's totals as the one JSON line appended to ``$AISEC_TRAIN_STORE_TIMING`` at exit (by
    store/files.py, which owns every write: this module cannot import it, since it times it)."""
    return json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "totals": totals()})
