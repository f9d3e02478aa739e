"""Components by instantiation: ``_target_`` configs checked before any work, then built with Hydra.

``model``, ``optimizer``, ``scheduler`` and a custom ``dataset.train`` / ``dataset.test`` are Hydra ``_target_``
nodes. :func:`check_target` imports the target and holds the node's keys against its signature, so an
unimportable class, a misspelt argument or a missing required one is refused in one line naming the key and the
target, before any data is read or anything is trained. Arguments the run itself supplies (the model's shape, the
optimizer's parameters, the scheduler's optimizer and horizon) are named in ``supplied``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from hydra.utils import get_object, instantiate

from aisec_train.errors import ConfigError


def target_of(node: Any, key: str) -> Callable[..., Any]:
    """The callable ``node['_target_']`` names, imported; a missing or unimportable target is a ConfigError."""
    if not isinstance(node, dict) or not node.get("_target_"):
        raise ConfigError(f"{key}._target_={None if not isinstance(node, dict) else node.get('_target_')!r} is not "
                          f"allowed: {key} needs a _target_ naming an importable class or function")  # fmt: skip
    target = node["_target_"]
    try:
        found = get_object(str(target))
    except Exception as err:  # noqa: BLE001 - any import failure is the user's target, reported in one line
        reason = " ".join(str(err).split()).split(" Are you sure")[0]
        raise ConfigError(f"{key}._target_={target!r} cannot be imported ({reason})") from err
    if not callable(found):
        raise ConfigError(f"{key}._target_={target!r} is not callable")
    return found


def parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The named parameters of ``fn`` (a class: its ``__init__``); None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n: p for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_target(node: Any, key: str, supplied: Iterable[str] = ()) -> Callable[..., Any]:
    """Import ``node``'s target and check its keys against the signature; return the target."""
    fn = target_of(node, key)
    params = parameters(fn)
    if params is None:
        return fn
    args = {k for k in node if not k.startswith("_")}
    supplied = set(supplied)
    unknown = sorted(args - set(params))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}={node[unknown[0]]!r} is not allowed: {node['_target_']} takes "
            f"({', '.join(p for p in params if p != 'self') or 'no arguments'})"
        )
    for name, param in params.items():
        required = param.default is inspect.Parameter.empty and param.kind is not inspect.Parameter.VAR_POSITIONAL
        if required and name not in args and name not in supplied and name != "self":
            raise ConfigError(f"{key}.{name} is missing: {node['_target_']} requires it; add +{key}.{name}=VALUE")
    return fn


def accepted(fn: Callable[..., Any], names: Iterable[str]) -> set[str]:
    """Which of ``names`` ``fn`` accepts as keyword arguments (all of them when it takes ``**kwargs``)."""
    params = parameters(fn)
    return set(names) if params is None else {n for n in names if n in params}


def build(node: dict[str, Any], key: str, **supplied: Any) -> Any:
    """``instantiate(node, **supplied)``, with a failing constructor reported as one ConfigError line."""
    try:
        return instantiate(node, **supplied)
    except Exception as err:  # noqa: BLE001 - the user's constructor raised: name it, do not dump a traceback
        cause = err.__cause__ or err
        raise ConfigError(
            f"{key}._target_={node.get('_target_')!r} failed to build: {' '.join(str(cause).split())}"
        ) from err


def instantiate_dataset(node: Any, key: str) -> Any:
    """A user's map-style Dataset from ``dataset.train`` / ``dataset.test``; None for a null target."""
    if node is None or (isinstance(node, dict) and node.get("_target_") is None):
        return None
    check_target(node, key)
    return build(node, key)
