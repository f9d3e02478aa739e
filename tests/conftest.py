"""Shared fixtures: run the real console script in a subprocess, exactly as a user would."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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


def signal_past_first_checkpoint(proc: subprocess.Popen, run: Path, sig: int, settle: float = 1.5) -> None:
    """Wait for ``run``'s first checkpoint, let a few steps pass (``settle`` seconds), then send ``sig`` to ``proc``:
    a stop part-way, between two checkpoints, as a scheduler or Ctrl-C would make it."""
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(settle)
    assert proc.poll() is None, "the job ended before the signal"
    proc.send_signal(sig)


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
    the user data folder too (the default ledger store and scratch stores live there), never ~/.local/share, and
    the user cache (the empty MLflow store tracking copies), never ~/.cache."""
    folder = tmp_path_factory.mktemp("keys")
    names = ("AISEC_TRAIN_KEY_FILE", "AISEC_TRAIN_ANCHOR_DIR", "XDG_DATA_HOME", "XDG_CACHE_HOME")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["AISEC_TRAIN_KEY_FILE"] = str(folder / "hmac.key")
    os.environ["AISEC_TRAIN_ANCHOR_DIR"] = str(folder / "anchors")
    os.environ["XDG_DATA_HOME"] = str(folder / "user_data")
    os.environ["XDG_CACHE_HOME"] = str(folder / "user_cache")
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


@pytest.fixture(autouse=True)
def stop_signal_handlers_restored() -> Iterator[None]:
    """Each test leaves the worker's SIGINT/SIGTERM/SIGHUP handlers as it found them: an in-process Flower
    simulation starts Ray, whose ``ray.init`` installs a SIGTERM handler of its own (``sys.exit``) and left it in the
    pytest worker for every later test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One real `aisec-train experiment=smoke` run shared by the end-to-end tests."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    # A session fixture is built inside whichever test first asks for it: give it a store of its own.
    ledgers = {LEDGER_ENV: str(tmp_path_factory.mktemp("smoke_ledgers"))}
    proc = run_cli("experiment=smoke", f"hydra.run.dir={run_dir}", env=ledgers)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def keyed(tmp_path, monkeypatch) -> Path:
    """A project key and anchor folder for this test alone (``tmp_path/keys``), not the session's, old keys
    forgotten: for tests that rotate, forge or delete keys. Returns the key file. A module that wants it for every
    test: ``pytestmark = pytest.mark.usefixtures("keyed")``."""
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "keys" / "hmac.key"))
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "keys" / "anchors"))
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES", raising=False)
    return tmp_path / "keys" / "hmac.key"


# ---- CPU seconds per test, beside pytest's wall-clock --durations ---------------------------------------------
# On a shared machine a test's wall time mostly measures the others' load; the CPU seconds it and the processes it
# waited for (CLI runs, torchrun, Flower) used do not, so they say what CI's two cores will need. Processes nobody
# waited for (a Ray worker orphaned at shutdown) are not counted. Shown with --durations. Measured in the process
# that runs the test and carried on its tear-down report, so it also reaches the summary from pytest-xdist workers.
_CPU_SECONDS: dict[str, float] = {}
_CPU_STARTED: dict[str, float] = {}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CPU_STARTED[item.nodeid] = _cpu_seconds()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "teardown" and item.nodeid in _CPU_STARTED:  # set-up (fixtures), call and tear-down
        spent = _cpu_seconds() - _CPU_STARTED.pop(item.nodeid)
        outcome.get_result().user_properties.append(("cpu_seconds", spent))


def pytest_runtest_logreport(report):
    for name, value in report.user_properties if report.when == "teardown" else ():
        if name == "cpu_seconds":
            _CPU_SECONDS[report.nodeid] = value


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = config.getoption("durations")
    if count is None or not _CPU_SECONDS:
        return
    rows = sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1])[: count or None]
    total = sum(_CPU_SECONDS.values())
    terminalreporter.write_sep("=", f"CPU seconds: {total:.0f} over {len(_CPU_SECONDS)} tests, the most first")
    for nodeid, seconds in rows:
        terminalreporter.write_line(f"{seconds:8.1f}s cpu  {nodeid}")


# ---- a small CNN trained on scikit-learn's digits: the attacks' and evaluations' target -----------------------
DIGITS_TRAIN = 1400  # the first 1,400 of sklearn's 1,797 digits train the CNN; the other 397 are held out


@pytest.fixture(scope="session")
def _digits_cnn_trained() -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Trained once per session (a few seconds): its weights and the held-out digits."""
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    from aisec_train.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation (and noise on a shared box)
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        perm = torch.randperm(DIGITS_TRAIN)
        for i in range(0, DIGITS_TRAIN, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}, x[DIGITS_TRAIN:], y[DIGITS_TRAIN:]


@pytest.fixture(scope="module")
def digits_cnn(_digits_cnn_trained) -> Iterator[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(model in eval mode, 397 held-out digits x / 16 as (N, 1, 8, 8), labels): the ``cnn`` of the model zoo
    trained with plain Adam, clean accuracy about 0.94. Each module gets its own copy of the weights, so a test
    that changes the model cannot change another module's; torch runs on one thread for the module."""
    from aisec_train.models import build_model

    state, x, y = _digits_cnn_trained
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    model.load_state_dict(state)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model.eval(), x, y
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cnn_checkpoint(tmp_path_factory) -> Path:
    """A SmallCNN 'pretrained' on 10 digit classes, saved as ``{"model": state_dict}`` (how trainers nest it), for
    fine-tuning from ``model.checkpoint_path``: its weights matter, not their quality. Read it, never write it."""
    from aisec_train.models import SmallCNN

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pretrained") / "cnn10.pt"
    torch.save({"model": SmallCNN(in_channels=1, num_classes=10, image_size=8).state_dict()}, path)
    return path


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Each example's perturbation size in ``norm`` ("linf" or "l2")."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


# ---- Flower's server side without a SuperLink ---------------------------------------------------------------
class NodeGrid:
    """The part of a Flower Grid that a strategy's ``configure_*`` reads: which SuperNodes are connected. A real
    Grid needs a running SuperLink; node ids start at ``first`` (Flower's are random: pass another start to show
    that nothing takes a node id for a partition id)."""

    def __init__(self, n: int, first: int = 1) -> None:
        self.ids = list(range(first, first + n))

    def get_node_ids(self) -> list[int]:
        return self.ids


@pytest.fixture
def server_identity() -> Iterator[None]:
    """What a ServerApp process has set before it creates messages (Flower's task identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
