"""pyproject.toml against the code: every package is shipped, every import is declared, every dependency is used.

An editable install (scripts/setup.sh, CI) finds any folder on disk, so a package missing from
``[tool.setuptools].packages`` or a third-party import that only arrives through another package's dependencies
breaks a wheel install and nothing else: these checks read the files instead of trusting the venv.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OURS = {"aisec_train", "aisec_kernels", "kernels"}


def _dist(requirement: str) -> str:
    """The normalised distribution name of a requirement line ('flwr[simulation]==1.42.0' -> 'flwr')."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;!~]", requirement, maxsplit=1)[0]).lower()


def _third_party_imports(root: Path) -> dict[str, set[str]]:
    """Top-level module name -> the files under ``root`` that import it (standard library and ours left out)."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules} - OURS - set(sys.stdlib_module_names):
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_package_folder_is_shipped():
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "aisec_train").rglob("__init__.py")}
    assert on_disk - declared == set(), "add these to [tool.setuptools].packages in pyproject.toml"


def test_every_import_is_declared_and_every_core_dependency_is_imported():
    core = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_dist(r) for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs}
    dists = packages_distributions()  # import name -> installed distributions that provide it
    imports = _third_party_imports(REPO / "aisec_train") | _third_party_imports(REPO / "kernels")
    provided = {top: {_dist(d) for d in dists.get(top, [])} for top in imports}
    undeclared = {top: sorted(files)[:3] for top, files in imports.items() if not provided[top] & (core | extras)}
    assert undeclared == {}, "imported but declared in no dependency list of pyproject.toml"
    imported = set().union(*provided.values())
    assert core - imported == set(), "declared dependencies that no module imports: drop them or use them"


# ------------------------------------------------------------------------------------------ the locked environment
def _lock() -> dict[str, str]:
    """constraints.txt as {normalised name: version}; every entry is an exact pin."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_dist(name)] = version
    return pins


def test_the_lock_holds_the_exact_pins_of_pyproject_and_setup():
    lock = _lock()
    optional = PYPROJECT["project"]["optional-dependencies"]
    pinned = [r for r in PYPROJECT["project"]["dependencies"] + sum(optional.values(), []) if "==" in r]
    pinned += re.findall(r'"([A-Za-z0-9_.\-]+==[^"]+)"', (REPO / "scripts" / "setup.sh").read_text())
    assert len(pinned) > 10, pinned
    for requirement in pinned:
        version = re.search(r"==\s*([^\s;,]+)", requirement).group(1)
        assert lock.get(_dist(requirement)) == version, (requirement, lock.get(_dist(requirement)))
    for build in ("pip", "setuptools", "wheel"):  # pip itself and its build environments are locked too
        assert build in lock, build


def test_the_environment_is_the_locked_one():
    """Every installed distribution is in the lock at its version: a dependency added without scripts/relock.sh,
    or a set-up that did not apply the constraints, fails here rather than in somebody else's clean clone."""
    import sysconfig
    from importlib.metadata import distributions

    if (Path(sys.prefix) / ".aisec-unlocked").exists():
        # An unlocked set-up (another platform or Python, or scripts/relock.sh) has no lock to match by design.
        pytest.skip(
            "this .venv was set up with AISEC_TRAIN_UNLOCKED=1 (newest releases, e.g. a platform the lock has no "
            "wheels for), so there is no locked version to compare it with; ./scripts/setup.sh without it re-locks"
        )
    lock = _lock()
    # The environment's own site-packages only: sys.path can gain other folders while the suite runs (a test
    # process saw the base interpreter's site-packages, with a colorama that no set-up installed).
    here = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {_dist(d.metadata["Name"]): d.version for d in distributions(path=here) if d.metadata["Name"]}
    installed.pop("aisec-train", None)  # the project itself: editable, never pinned
    unlocked = {name: version for name, version in installed.items() if lock.get(name) != version}
    assert not unlocked, f"installed but not in constraints.txt at that version (run scripts/relock.sh): {unlocked}"
