"""Library output that says nothing about the run, silenced; what matters said once, in our words.

Opacus' PRV accountant takes log(1 - q): at sample rate q = 1 (the batch is the whole training set) numpy warns
"divide by zero" several times per epsilon. The number is still right; what matters is that q = 1 gets no
amplification by subsampling, and the end-of-run summary says that in one line (report/summary.py). The filter
is also put in PYTHONWARNINGS so that Flower's Ray workers, separate processes, inherit it.

Flower's console output, once per line and without library noise:

Flower's logger ("flwr") has its own console handler and also propagates to the root logger, where the CLI's
Hydra handler prints (and writes cli.log): every Flower line appeared twice. When the root logger has a handler,
Flower's own is removed, so each line is printed once, in our format, and kept in the run's log; without one
(a bare Python API session) Flower keeps its handler and stops propagating. Its DEBUG chatter, blank lines, the
`run_simulation` deprecation notice, alembic's plugin registrations and Ray's accelerator tip say nothing about
the run and are dropped.

Under client-level DP (``federated.dp=client``) a crashing client's failure is said in one line that names no
client: Flower's simulation logs the ClientApp's exception, its text and its traceback, which name the client when
they do (the crash drill's "client 1: ...", a path under ``client_state/client_<id>/``), while the release keeps
cohorts secret (federated/cohorts.py). The line keeps the reason's type (``RuntimeError``); other runs keep it all.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message prefix, category, module) as PYTHONWARNINGS writes them: only the accountant's own log(1 - q).
LIBRARY_WARNINGS = (("divide by zero encountered in log", RuntimeWarning, "opacus.accountants.analysis.prv.prvs"),)

NOISE = ("DEPRECATED FEATURE",)  # Flower records dropped by their text


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return bool(text.strip()) and not any(n in text for n in NOISE)


def quiet_flower() -> None:
    """Idempotent: call after importing flwr (its handler is attached at import)."""
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    FLOWER_LOGGER.setLevel(logging.INFO)
    if not any(isinstance(f, _DropNoise) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_DropNoise())
    if logging.getLogger().handlers:
        FLOWER_LOGGER.removeHandler(console_handler)
        FLOWER_LOGGER.propagate = True
    else:
        FLOWER_LOGGER.propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database registers its plugins at INFO
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def quiet_library_warnings() -> None:
    """Idempotent; in this process and in the child processes it starts (PYTHONWARNINGS)."""
    specs = []
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        specs.append(f"ignore:{message}:{category.__name__}:{module}")
    present = [s for s in os.environ.get("PYTHONWARNINGS", "").split(",") if s]
    os.environ["PYTHONWARNINGS"] = ",".join(present + [s for s in specs if s not in present])


# Flower's simulation transport, where a ClientApp's failure is logged (vce_api.py's worker, the Ray backend, its pool)
CLIENT_TRANSPORT = ("/superlink/fleet/vce/", "/simulation/ray_transport/")
WRAPPERS = {"ClientAppException", "RayTaskError", "RayActorError", "ActorDiedError"}  # around the client's own error
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?:\([\w.]+\))?:", re.M)  # "RuntimeError: ...", "x.RayTaskError(Y):"


def _reason_type(record: logging.LogRecord, text: str) -> str:
    """The type of the client's own exception in Flower's text of it (the first in the chain), else its wrapper's."""
    names = [m.rsplit(".", 1)[-1] for m in EXCEPTION_LINE.findall(text)]
    own = [n for n in names if n not in WRAPPERS]
    if isinstance(record.msg, BaseException):
        names.append(type(record.msg).__name__)
    return (own or names or ["an exception"])[0]


class _WithholdClientDetail(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        if record.levelno < logging.ERROR or not any(part in path for part in CLIENT_TRANSPORT):
            return True
        text = record.getMessage()
        if text.startswith(("Traceback (most recent call last)", "An exception was raised when processing")):
            return False  # the same failure's traceback, and a line that only announces it
        failure = isinstance(record.msg, BaseException) or "\n" in text
        if not failure and not any(isinstance(a, BaseException) for a in record.args or ()):
            if "client" in str(record.msg).lower() and record.args:  # "The VirtualClient %s got result from client %s"
                record.args = tuple("<withheld>" for _ in record.args)
            return True
        record.msg = (
            f"a client failed: {_reason_type(record, text)} (its message and traceback are withheld under "
            "federated.dp=client: they can name the client, and cohorts are secret)"
        )
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextmanager
def withheld_client_detail(active: bool) -> Iterator[None]:
    """While a client-level DP simulation runs: Flower's log of a crashing client in one line naming none."""
    if not active:
        yield
        return
    from flwr.common.logger import FLOWER_LOGGER

    guard = _WithholdClientDetail()
    FLOWER_LOGGER.addFilter(guard)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(guard)
