"""The refusals every package raises, and the one way every console script answers them.

A refusal is bad input, not a bug: one line on stderr, ``PROG: error: ...``, naming the key, the value and what
is allowed, then exit status 2, before any work; tracebacks are kept for real bugs. ``refuse`` is that line,
``RefusingParser`` routes argparse's usage errors through it and ``refusing`` answers a chosen set of exception
classes with it. Each console script (``aisec-train``, ``-ledger``, ``-registry``, ``-monitor``, ``-sweep``) uses
these three, so the format and the exit status cannot drift between them. This module imports neither torch nor
the heavy packages: a bad override is refused in about a second.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn


class Refusal(Exception):
    """Base of every error that means bad input rather than a bug: a console script answers it with ``refuse``.

    An error class says so itself by deriving from ``Refusal`` (``ConfigError``, ``DataError``, ``StoreError``,
    ``BudgetExhausted``, ``NonFiniteError``...), so a CLI classifies errors by their class and no module has to
    re-raise another package's error under a refusal's name just to reach the one-line answer."""


class ConfigError(Refusal, ValueError):
    """A configuration value outside its allowed range, or a combination that cannot run honestly."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def one_line(message: object) -> str:
    """``message`` with its white space folded: a refusal stays one line whatever the error's text held."""
    return " ".join(str(message).split())


def refuse(prog: str, message: object) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line of stderr and exit with status 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


class RefusingParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are refusals: one line and exit 2 (argparse prints the usage too).
    Its subparsers are of the same class (argparse's default ``parser_class`` is the parent's type)."""

    def error(self, message: str) -> NoReturn:
        refuse(self.prog.split()[0], message)  # a subparser's prog is "PROG COMMAND"


@contextmanager
def refusing(
    prog: str, *errors: type[BaseException], message: Callable[[BaseException], object] = one_line
) -> Iterator[None]:
    """Answer any of ``errors`` raised inside the block with ``refuse(prog, message(err))``; others propagate.

    A reader that closed the pipe (``aisec-train-ledger list | head -1``) is not bad input: the command ends quietly
    with the status of a process SIGPIPE killed (141), as ``ls | head`` does, instead of "error: [Errno 32]"."""
    try:
        yield
        sys.stdout.flush()  # inside the block: a closed pipe met at exit would print "Exception ignored ..."
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(128 + signal.SIGPIPE)
    except errors as err:
        refuse(prog, message(err))


class Stopped(BaseException):
    """A signal asked the run to stop: Ctrl-C's SIGINT, the SIGTERM a cluster scheduler sends before it kills a job,
    or the SIGHUP of a terminal or SSH session that closed. A BaseException, as KeyboardInterrupt is, so no ``except
    Exception`` on the way swallows it; the training loop charges every step taken before it lets it pass
    (train/loop.py) and fills in ``where``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.where = ""  # " in epoch E with N private step(s) taken in all, all charged ...", or " in stage S"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Deferral:
    """Inside :func:`stops_deferred`, a stop signal is held (``pending``) instead of raised."""

    depth = 0
    pending: int | None = None


@contextmanager
def stops_deferred() -> Iterator[None]:
    """Hold a stop signal until the block is done, then raise its :class:`Stopped`. For a write and the
    bookkeeping that records it (the dataset ledger's charge and its count): a Stopped between the two left the
    count behind the ledger, and the stop's own charge then charged the same steps again."""
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if _Deferral.depth == 0 and _Deferral.pending is not None:
            signum, _Deferral.pending = _Deferral.pending, None
            raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Stopped` inside the block; each one's default would kill the
    process with the steps since the last checkpoint uncharged. All are ignored after the first: a second Ctrl-C
    must not cut short the charge of the steps already taken (the ledger would fall behind what was spent). A signal
    the process was started ignoring stays ignored: ``nohup`` (SIGHUP) and a shell's background job (SIGINT) mean
    the run goes on when the terminal goes."""
    caught = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]

    def stop(signum: int, frame: Any) -> None:
        for sig in caught:
            signal.signal(sig, signal.SIG_IGN)
        if _Deferral.depth:  # inside a write and its bookkeeping: raised once both are done
            _Deferral.pending = signum
            return
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped(prog: str, err: Stopped) -> NoReturn:
    """Say in one line where the run stopped and what it charged, then exit as the signal would have (128 + N)."""
    where = err.where or " outside the training loop"
    try:
        print(
            f"{prog}: stopped by {err}{where}; run the same command with the same hydra.run.dir to resume from the "
            "last checkpoint",
            file=sys.stderr,
        )
    except OSError:  # SIGHUP: the terminal that would show the line is gone (EIO); the charge is already made
        pass
    sys.exit(128 + err.signum)
