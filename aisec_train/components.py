"""Components by instantiation: ``_target_`` configs resolved and checked before anything is called, then built.

``model``, ``optimizer``, ``scheduler`` and a custom ``dataset.train`` / ``dataset.test`` are Hydra ``_target_``
nodes. :func:`check_target` imports the target, checks that it builds what its slot needs (allow-by-type: a
subclass of the slot's base class, or a function whose return annotation names one; anything else, such as
``builtins.print`` or ``pathlib.Path.unlink``, is refused without being called) and holds the node's keys against
its signature, so a wrong, unimportable or misspelt target is refused in one line naming the key, before any data
is read or anything is trained. Arguments the run itself supplies (the model's shape, the optimizer's parameters,
the scheduler's optimizer and horizon) are named in ``supplied``. :func:`build` checks again, so no caller can
instantiate an unchecked target; nested ``_target_`` nodes (which Hydra would call recursively) are refused.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

from hydra._internal.utils import _locate
from hydra.utils import instantiate

from aisec_train.errors import ConfigError

# slot (the key's first part) -> (module, class name, what the slot accepts, in words). Imported lazily: a bad
# override is refused without importing torch only when the target itself does not import it.
SLOTS: dict[str, tuple[str, str, str]] = {
    "model": ("torch.nn", "Module", "a torch.nn.Module subclass, or a function annotated '-> nn.Module'"),
    "optimizer": ("torch.optim", "Optimizer",
                  "a torch.optim.Optimizer subclass, or a function annotated to return one"),
    "scheduler": ("torch.optim.lr_scheduler", "LRScheduler",
                  "a torch.optim.lr_scheduler.LRScheduler subclass, or a function annotated to return one"),
    "dataset": ("torch.utils.data", "Dataset",
                "a torch.utils.data.Dataset subclass, or a function annotated to return one"),
    "hydra.callbacks": ("hydra.experimental.callback", "Callback", "a hydra.experimental.callback.Callback subclass"),
}  # fmt: skip
RESERVED = {"_target_", "_convert_"}  # Hydra keys a node may carry; _args_, _partial_, _recursive_ bypass the checks


def slot_of(key: str) -> str:
    """The slot a key fills: ``dataset.train`` -> ``dataset``, ``hydra.callbacks.x`` -> ``hydra.callbacks``."""
    return next((s for s in SLOTS if key == s or key.startswith(s + ".")), key.split(".")[0])


def _base(slot: str) -> tuple[type, str]:
    import importlib

    module, name, words = SLOTS[slot]
    return getattr(importlib.import_module(module), name), words


def builds(found: Any, base: type) -> bool:
    """True when ``found`` is a subclass of ``base``, or a plain function whose resolved return annotation is."""
    if inspect.isclass(found):
        return issubclass(found, base)
    if not (inspect.isfunction(found) or inspect.ismethod(found)):
        return False  # builtins (print, open), callable objects, partials: no annotation to trust
    if inspect.ismethod(found) and not inspect.isclass(found.__self__):
        return False  # a method bound to an object: calling it acts on that object, it does not build one
    try:
        returned = typing.get_type_hints(found).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve says nothing we can trust
        return False
    return inspect.isclass(returned) and issubclass(returned, base)


def check_kind(found: Any, key: str, target: Any) -> None:
    """Refuse ``found`` (``key._target_=target``) unless it builds what ``key``'s slot needs; it is never called."""
    slot = slot_of(key)
    if slot not in SLOTS:
        raise ConfigError(f"{key}._target_={target!r} is not allowed: only {', '.join(SLOTS)} take a _target_")
    base, words = _base(slot)
    if not builds(found, base):
        raise ConfigError(f"{key}._target_={target!r} is not allowed: {key} accepts {words}")


def _nested_targets(value: Any, where: str) -> Iterable[str]:
    if isinstance(value, dict):
        if "_target_" in value:
            yield where
        for k, v in value.items():
            yield from _nested_targets(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nested_targets(v, f"{where}.{i}")


def check_node(node: dict[str, Any], key: str) -> None:
    """Only the node's own ``_target_`` is ever called: no reserved keys that skip the checks, no nested targets."""
    for name in node:
        if str(name).startswith("_") and name not in RESERVED:
            raise ConfigError(f"{key}.{name} is not allowed: a {key} node takes _target_ and its arguments only")
    for name, value in node.items():
        for where in _nested_targets(value, f"{key}.{name}"):
            raise ConfigError(
                f"{where}._target_ is not allowed: only {key}._target_ is instantiated; pass plain values"
            )


def target_of(node: Any, key: str) -> Callable[..., Any]:
    """The callable ``node['_target_']`` names, imported and checked for ``key``'s slot (never called here)."""
    if not isinstance(node, dict) or not node.get("_target_"):
        raise ConfigError(f"{key}._target_={None if not isinstance(node, dict) else node.get('_target_')!r} is not "
                          f"allowed: {key} needs a _target_ naming an importable class or function")  # fmt: skip
    target = node["_target_"]
    check_node(node, key)
    found = locate(str(target), f"{key}._target_")
    check_kind(found, key, target)
    return found


def locate(target: str, key: str) -> Any:
    """What ``target`` names, imported but not called; an import failure is one ConfigError line naming ``key``.
    Hydra's ``_locate`` rather than ``hydra.utils.get_object``, which logs three lines of ERROR before raising (the
    refusal printed beside them), and ``from None``: the line already holds the cause, which a chained error prints
    a second time."""
    try:
        return _locate(target)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's target, reported in one line
        reason = " ".join(str(err).split()).split(" Are you sure")[0]
        hint = "" if "." in target else "; give module.name"
        raise ConfigError(f"{key}={target!r} cannot be imported ({reason}){hint}{cwd_hint(target)}") from None


def cwd_hint(target: Any) -> str:
    """How to make a module in the current directory importable, when it is there but not on sys.path."""
    import os
    import sys

    top = str(target).split(".")[0]
    here = os.getcwd()
    if (os.path.exists(os.path.join(here, top + ".py")) or os.path.isdir(os.path.join(here, top))) and not any(
        os.path.abspath(p or ".") == here for p in sys.path
    ):
        return f"; {top} is in {here} but not importable: run from there with PYTHONPATH=. or pip install -e ."
    return ""


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
    """``instantiate(node, **supplied)`` once the target is checked for ``key``'s slot, with a failing
    constructor reported as one ConfigError line."""
    target_of(node, key)
    try:
        return instantiate(node, **supplied)
    except Exception as err:  # noqa: BLE001 - the user's constructor raised: name it, do not dump a traceback
        cause = err.__cause__ or err
        # from None: the line already holds the constructor's message; chained, the CLI would print it twice
        raise ConfigError(
            f"{key}._target_={node.get('_target_')!r} failed to build: {' '.join(str(cause).split())}"
        ) from None


def instantiate_dataset(node: Any, key: str) -> Any:
    """A user's map-style Dataset from ``dataset.train`` / ``dataset.test``; None for a null target."""
    if node is None or (isinstance(node, dict) and node.get("_target_") is None):
        return None
    check_target(node, key)
    return build(node, key)
