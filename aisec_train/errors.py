"""The refusals every package raises: one line naming the key, the value and what is allowed.

The CLI turns each of them into that one line on stderr and exit status 2 (``aisec_train.cli.refusals()``).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value outside its allowed range, or a combination that cannot run honestly."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
