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
"""

from __future__ import annotations

import logging
import os
import warnings

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
