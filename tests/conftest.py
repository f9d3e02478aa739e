"""Shared fixtures: run the real console script in a subprocess, exactly as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LEDGER_ENV = "AISEC_TRAIN_LEDGER_STORE"

# Triton decorates its own library (tl.zeros, tl.rand, ...) at `import triton`, in the mode TRITON_INTERPRET
# names then. On a CPU-only machine, import it here, before any test module, under the interpreter
# (aisec_kernels itself never imports triton early), then put the variable back so the tests keep the torch
# backend unless they ask for the interpreter (tests/test_kernels.py's `interpret` fixture).
if "triton" not in sys.modules and not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        os.environ.pop("TRITON_INTERPRET") if _saved is None else os.environ.__setitem__("TRITON_INTERPRET", _saved)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "aisec_train", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dig(report: dict, dotted: str):
    """``report["a"]["b"]`` for ``"a.b"``: the brief's dotted report keys."""
    node = report
    for part in dotted.split("."):
        node = node[part]
    return node


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="session", autouse=True)
def private_keys(tmp_path_factory):
    """The HMAC key and the ledger anchors of the test session live in a throwaway folder, never in ~/.config;
    the user data folder too (the default ledger store and scratch stores live there), never ~/.local/share."""
    folder = tmp_path_factory.mktemp("keys")
    saved = {k: os.environ.get(k) for k in ("AISEC_TRAIN_KEY_FILE", "AISEC_TRAIN_ANCHOR_DIR", "XDG_DATA_HOME")}
    os.environ["AISEC_TRAIN_KEY_FILE"] = str(folder / "hmac.key")
    os.environ["AISEC_TRAIN_ANCHOR_DIR"] = str(folder / "anchors")
    os.environ["XDG_DATA_HOME"] = str(folder / "user_data")
    yield folder
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module", autouse=True)
def module_ledgers(tmp_path_factory):
    """Module-scoped fixtures (one shared CLI run, say) spend privacy on their module's own ledger store.

    Autouse fixtures are set up first within their scope, so this runs before any module fixture that trains;
    the per-test store below then takes over inside each test."""
    saved = os.environ.get(LEDGER_ENV)
    os.environ[LEDGER_ENV] = str(tmp_path_factory.mktemp("module_ledgers"))
    yield
    os.environ.pop(LEDGER_ENV) if saved is None else os.environ.__setitem__(LEDGER_ENV, saved)


@pytest.fixture(autouse=True)
def private_ledgers(tmp_path, monkeypatch):
    """Each test spends privacy on its own ledger store: the dataset-level budget must not leak between tests."""
    monkeypatch.setenv(LEDGER_ENV, str(tmp_path / "privacy_ledgers"))


@pytest.fixture(scope="session", autouse=True)
def private_registry(tmp_path_factory):
    """Runs launched by the tests register into a throwaway registry, not the project's outputs/registry.json."""
    path = tmp_path_factory.mktemp("registry") / "registry.json"
    saved = os.environ.get("AISEC_TRAIN_REGISTRY")
    os.environ["AISEC_TRAIN_REGISTRY"] = str(path)
    yield path
    os.environ.pop("AISEC_TRAIN_REGISTRY") if saved is None else os.environ.__setitem__("AISEC_TRAIN_REGISTRY", saved)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One real `aisec-train experiment=smoke` run shared by the end-to-end tests."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    # A session fixture is built inside whichever test first asks for it: give it a store of its own.
    ledgers = {LEDGER_ENV: str(tmp_path_factory.mktemp("smoke_ledgers"))}
    proc = run_cli("experiment=smoke", f"hydra.run.dir={run_dir}", env=ledgers)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
