"""No import cycles in aisec_train, between files or between packages (issue 25).

The graph is read from the source with ``ast`` (nothing is imported), so the test is fast and sees imports that
only run on some paths:

- **Files:** every ``import`` of an aisec_train module, wherever it sits (module level, ``TYPE_CHECKING``, inside
  a function). A cycle between two files is a cycle even when one side defers its import.
- **Packages:** module-level imports only (``TYPE_CHECKING`` ones included). An import inside a function may point
  upward when a comment there says why (e.g. ``aisec_train/trainers.py`` loads Flower only for a federated run).
  The nodes are the packages (``aisec_train.train``, ...) and the root modules, with the layers below.

Dependency direction, bottom to top (docs/architecture.md):

    errors, hashing, components, store -> config (config.py and every */config.py) -> data -> models -> crypto
    -> privacy (ledger, accounting, randomness, claims, spend, budget store) -> train (loop, callbacks, bk, the
    DP engine) -> robust, backdoor, audit, federated (+ privacy/federated_budget.py) -> report -> tracking
    -> trainers.py (the trainer registry) -> run_state -> stages (*/stage.py) -> pipeline -> api, cli, sweep
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "aisec_train"

# Modules that sit in another layer than their package, and why. A package keeps its concept's files together
# (issue 25: stages in their packages, one privacy package); the layer says what they may import.
LAYER = {
    # Configs are plain dataclasses that aisec_train/config.py composes: one layer below every package.
    "aisec_train.robust.sampling": "aisec_train.config",  # the parser robust/config.py validates with (numpy only)
    # Stages read and fill the Run (run_state.py): they sit above every package, next to the pipeline.
    "aisec_train.train.resume": "stages",  # the train stage's resume identity
    "aisec_train.privacy.admission": "stages",  # the data stage's budget admission
    # The privacy package spans the layers it serves.
    "aisec_train.privacy.engine": "aisec_train.train",  # wraps the loop's model and optimizer (Opacus, train/bk*.py)
    "aisec_train.privacy.federated_budget": "aisec_train.federated",  # charges the federated run's ledgers
    "aisec_train.privacy.report": "aisec_train.report",  # the one writer of the report's privacy section
    # The report's container and file writers sit below the packages that add to them; the security report,
    # which renders the audit's evidence, above them.
    "aisec_train.report.report": "report_base",
    "aisec_train.report.criteria": "report_base",
    "aisec_train.report.budget_text": "report_base",
    "aisec_train.report.outputs": "report_base",
}

# File-level cycles not yet removed, each with its owner. Remove the entry with the cycle; add none without one.
ALLOWED_FILE_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known) -> list[str]:
    """The aisec_train modules an import names (``from pkg import mod`` names ``pkg.mod``; a symbol, its module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    targets = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("aisec_train") and name != module:
            targets.append(name)
    return targets


def imports(module: str, source: str, is_package: bool = False, known=MODULES) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside a function) of ``module``, as aisec_train module names. Module level
    includes ``if TYPE_CHECKING:`` and ``try:`` blocks: a type-only import is still a dependency."""
    top: set[str] = set()
    deferred: set[str] = set()

    def visit(nodes: list[ast.stmt], in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                (deferred if in_function else top).update(_targets(node, module, is_package, known))
                continue
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], inner)
                elif isinstance(child, ast.ExceptHandler):
                    visit(child.body, inner)

    visit(ast.parse(source).body, False)
    return top, deferred


GRAPH = {m: imports(m, p.read_text(), p.name == "__init__.py") for m, p in MODULES.items()}


def layer(module: str) -> str:
    """The node a module belongs to in the package graph."""
    if module in LAYER:
        return LAYER[module]
    parts = module.split(".")
    if len(parts) >= 3 and parts[2] == "config":
        return "aisec_train.config"
    if len(parts) >= 3 and parts[2] == "stage":
        return "stages"
    return ".".join(parts[:2])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _explain(component: list[str], edges: dict[str, set[str]], why) -> str:
    inside = set(component)
    lines = [f"{a} -> {b}: {why(a, b)}" for a in component for b in sorted(edges.get(a, ())) if b in inside]
    return "import cycle between " + ", ".join(component) + "\n  " + "\n  ".join(lines)


def file_edges() -> dict[str, set[str]]:
    edges = {m: (top | deferred) for m, (top, deferred) in GRAPH.items()}
    for a, b in ALLOWED_FILE_EDGES:
        edges.get(a, set()).discard(b)
    return edges


def package_edges() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    edges: dict[str, set[str]] = defaultdict(set)
    because: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, (top, _) in GRAPH.items():
        for target in top:
            a, b = layer(module), layer(target)
            if a != b:
                edges[a].add(b)
                because[a, b].append(f"{module} imports {target}")
    return edges, because


def test_no_import_cycle_between_files():
    edges = file_edges()
    found = cycles(edges)
    assert not found, "\n".join(_explain(c, edges, lambda a, b: "") for c in found)


def test_no_import_cycle_between_packages():
    edges, because = package_edges()
    found = cycles(edges)
    assert not found, "\n".join(_explain(c, edges, lambda a, b: "; ".join(because[a, b][:3])) for c in found)


def test_train_does_not_import_federated_and_the_registry_lists_all_three_trainers():
    """The trainer registry sits above both packages: train/ names no federated module, even inside a function."""
    reaching = {
        (m, t)
        for m, (top, deferred) in GRAPH.items()
        if layer(m) == "aisec_train.train"
        for t in top | deferred
        if layer(t) == "aisec_train.federated"
    }
    assert not reaching, reaching
    from aisec_train.trainers import TRAINERS

    assert sorted(TRAINERS) == ["central", "data_parallel", "federated"]


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        ({"a": "from aisec_train.b import x", "b": "import aisec_train.a"}, ["a", "b"]),
        ({"a": "def f():\n    from aisec_train.b import x",
          "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aisec_train import a"}, ["a", "b"]),
        ({"a": "class A:\n    def f(self):\n        from .b import x",
          "b": "try:\n    from .a import A\nexcept ImportError:\n    pass"}, ["a", "b"]),
        ({"a": "from aisec_train.b import x", "b": "import aisec_train.c", "c": "import os"}, None),
    ],
)  # fmt: skip
def test_the_reader_sees_deferred_typing_and_relative_imports(sources, cycle):
    """The checker itself: a cycle through a function-level, TYPE_CHECKING, relative or try import is found."""
    known = {f"aisec_train.{name}" for name in sources}
    edges = {}
    for name, text in sources.items():
        top, deferred = imports(f"aisec_train.{name}", text, known=known)
        edges[f"aisec_train.{name}"] = top | deferred
    assert cycles(edges) == ([[f"aisec_train.{n}" for n in cycle]] if cycle else [])
