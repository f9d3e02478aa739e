"""One safe-write path: every file aisec_train writes goes through aisec_train/store/files.py.

The first test reads the package's source with ``ast`` and fails on any direct write outside store/files.py:
``write_text``/``write_bytes``, ``open``/``.open``/``os.fdopen`` with a writing mode, ``os.open`` with a
creating or writing flag, ``shutil`` copies, ``Path.touch``, ``os.link``/``os.symlink``/``os.replace``/
``os.rename``, and ``savefig``/``np.save*``/``torch.save``/``to_csv``/``tofile`` given anything but a file
object from a store helper (or an in-memory ``BytesIO``). The allowlist holds only writes a library makes to its
own files, each with its reason. The other tests check the helpers and the writers moved onto them.
"""

from __future__ import annotations

import ast
import json
import os
import stat

import pytest

from aisec_train.audit import monitor
from aisec_train.store import IntegrityError, atomic_write, create_exclusive, open_in_place, open_live, shred
from aisec_train.store.files import read_nofollow
from tests.conftest import REPO

PACKAGE = REPO / "aisec_train"
OWNER = "aisec_train/store/files.py"

# (file, rule) -> why a library, not our code, decides how that file is written.
ALLOWED = {
    ("aisec_train/tracking/mlflow_logger.py", "os.replace"): (
        "MLflow's SqlAlchemyStore creates the empty store's schema itself, in a staged sqlite file of its own; "
        "we only rename that whole file into the user's cache (sqlite, not we, wrote its bytes)"
    ),
    ("aisec_train/errors.py", "os.open for writing"): (
        "os.devnull, put under stdout after the reader closed the pipe (`list | head`), so the interpreter's exit "
        "flush has somewhere to go; no file is written"
    ),
}

# Calls whose ``as`` target (or assigned name) is a file object that a store helper opened safely.
SAFE_OPENERS = {"safe_open_for_write", "staged_file", "open_live", "BytesIO"}
WRITE_FLAGS = {"O_CREAT", "O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND"}
DIRECT = {
    "write_text": "write_text",
    "write_bytes": "write_bytes",
    "touch": "Path.touch",
}
MODULE_CALLS = {
    ("shutil", "copy"),
    ("shutil", "copy2"),
    ("shutil", "copyfile"),
    ("shutil", "copytree"),
    ("shutil", "move"),
    ("os", "link"),
    ("os", "symlink"),
    ("os", "replace"),
    ("os", "rename"),
    ("os", "mknod"),
}
# call name -> index of the positional argument that is the destination (a keyword of the same meaning too).
DESTINATION = {
    "savefig": (0, "fname"),
    "save": (1, "f"),  # torch.save(obj, f); np.save(file, arr) is handled below
    "tofile": (0, "fid"),
    "to_csv": (0, "path_or_buf"),
}
NUMPY = {"np", "numpy"}


def _name(func: ast.expr) -> tuple[str | None, str | None]:
    """(owner, name) of a call: ``np.savez`` -> ("np", "savez"), ``open`` -> (None, "open")."""
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    if isinstance(func, ast.Name):
        return None, func.id
    return None, None


def _mode(call: ast.Call, position: int) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value
    return call.args[position] if len(call.args) > position else None


def _safe_file_names(scope: ast.AST) -> set[str]:
    """Names bound in ``scope`` to a file object from a store helper (or an in-memory buffer)."""
    names: set[str] = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.withitem) and isinstance(node.context_expr, ast.Call):
            if _name(node.context_expr.func)[1] in SAFE_OPENERS and node.optional_vars is not None:
                targets = node.optional_vars
                elts = targets.elts if isinstance(targets, ast.Tuple) else [targets]
                names |= {e.id for e in elts[:1] if isinstance(e, ast.Name)}  # staged_file yields (fh, tmp)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if _name(node.value.func)[1] in SAFE_OPENERS:
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _destination(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if len(call.args) > position else None


def _rule(call: ast.Call, safe: set[str]) -> str | None:
    """The rule ``call`` breaks, if it writes a file directly; ``safe``: this scope's helper file objects."""
    owner, name = _name(call.func)
    if name in DIRECT:
        return DIRECT[name]
    if (owner, name) in MODULE_CALLS:
        return f"{owner}.{name}"
    if name == "open" and owner == "os":
        flags = call.args[1] if len(call.args) > 1 else None
        used = {n.attr for n in ast.walk(flags) if isinstance(n, ast.Attribute)} if flags is not None else set()
        unknown = flags is not None and not used  # flags built elsewhere (a variable) may create or write
        return "os.open for writing" if unknown or used & WRITE_FLAGS else None
    if name in ("open", "fdopen"):
        builtin = isinstance(call.func, ast.Name) or name == "fdopen"  # open(path, mode) vs path.open(mode)
        mode = _mode(call, 1 if builtin else 0)
        text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else None
        unknown = builtin and mode is not None and text is None  # a computed mode may write
        return f"{name}() for writing" if unknown or (text and set(text) & set("wax+")) else None
    if owner in NUMPY and name in ("save", "savez", "savez_compressed", "savetxt"):
        target, rule = _destination(call, 0, "file"), f"np.{name} to a path"
    elif name in DESTINATION and (name != "save" or owner == "torch"):
        target, rule = _destination(call, *DESTINATION[name]), f"{name} to a path"
    else:
        return None
    return None if isinstance(target, ast.Name) and target.id in safe else rule


def violations(source: str) -> list[tuple[int, str]]:
    """(line, rule) of every direct write in ``source``."""
    tree = ast.parse(source)
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
    scope_of: dict[ast.AST, ast.AST] = {}
    for scope in scopes:  # breadth-first: an inner function is walked after the one holding it, so it wins
        scope_of.update((node, scope) for node in ast.walk(scope))
    safe = {scope: _safe_file_names(scope) for scope in scopes}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (rule := _rule(node, safe[scope_of[node]])) is not None:
            found.append((node.lineno, rule))
    return found


def test_every_write_in_the_package_goes_through_store_files():
    unexplained, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == OWNER:
            continue
        for line, rule in violations(path.read_text()):
            if (rel, rule) in ALLOWED:
                used.add((rel, rule))
            else:
                unexplained.append(f"{rel}:{line}: {rule}")
    assert not unexplained, "write through aisec_train/store/files.py instead:\n" + "\n".join(unexplained)
    assert used == set(ALLOWED), f"stale allowlist entries: {set(ALLOWED) - used}"


@pytest.mark.parametrize(
    "snippet",
    [
        "Path(p).write_text('x')",
        "p.write_bytes(b'x')",
        "open(p, 'w')",
        "open(p, mode='ab')",
        "open(p, 'x')",
        "open(p, 'r+b')",
        "open(p, m)",
        "p.open('w')",
        "(d / 'x.log').open('a')",
        "os.fdopen(fd, 'wb')",
        "os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)",
        "os.open(p, os.O_RDWR)",
        "os.open(p, flags, 0o666)",
        "fig.savefig(p, dpi=100)",
        "fig.savefig(fname=p)",
        "np.savez(p, a=a)",
        "np.save(p, a)",
        "torch.save(state, p)",
        "torch.save(state, f=p)",
        "shutil.copyfile(a, b)",
        "p.touch()",
        "os.replace(a, b)",
        "df.to_csv('x.csv')",
        "def f(p):\n    with open_live(p, root=r) as fh:\n        pass\n    fig.savefig(p)",
    ],
)
def test_the_checker_catches_each_kind_of_direct_write(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "open(p)",
        "open(p, 'rb')",
        "Image.open(p)",
        "store.open(ds, wait=60.0)",
        "os.open(p, os.O_RDONLY | os.O_NOFOLLOW)",
        "def f(p):\n    with safe_open_for_write(p, root=r) as fh:\n        fig.savefig(fh, format='png')",
        "def f(p):\n    with safe_open_for_write(p, root=r) as fh:\n        np.savez(fh, a=a)",
        "def f():\n    buffer = io.BytesIO()\n    torch.save(state, buffer)",
        "def f(d, n):\n    with staged_file(d, n) as (fh, tmp):\n        torch.save(state, fh)",
        "s.replace('a', 'b')",
        "dataclasses.replace(cfg, seed=1)",
    ],
)
def test_the_checker_accepts_reads_and_helper_file_objects(snippet):
    assert violations(snippet) == [], snippet


# ---- the helpers ------------------------------------------------------------------------------------------------
def test_create_exclusive_keeps_the_first_file_private_and_leaves_no_temp(tmp_path):
    key = tmp_path / "keys" / "hmac.key"
    assert create_exclusive(key, b"first\n", root=tmp_path, perms=0o600) is True
    assert create_exclusive(key, b"second\n", root=tmp_path, perms=0o600) is False  # the race's loser
    assert key.read_bytes() == b"first\n" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert os.listdir(key.parent) == ["hmac.key"]


def test_live_and_in_place_opens_refuse_a_symlink_and_leave_its_target(tmp_path):
    target = tmp_path / "bashrc"
    target.write_text("keep\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").symlink_to(target)
    (run / "sub").symlink_to(tmp_path, target_is_directory=True)
    for path in (run / "metrics.csv", run / "sub" / "bashrc"):
        with pytest.raises(IntegrityError, match="is a symlink"):
            open_live(path, root=run, mode="a")
        with pytest.raises(IntegrityError, match="is a symlink"):
            open_in_place(path, root=run)
    assert target.read_text() == "keep\n"
    with open_live(run / "log.txt", root=run, mode="w") as fh:
        fh.write("a\n")
    with open_live(run / "log.txt", root=run, mode="a") as fh:
        fh.write("b\n")
    assert (run / "log.txt").read_text() == "a\nb\n"
    os.link(target, run / "hard.log")  # "w" starts a new file: a planted hard link's target is not truncated
    with open_live(run / "hard.log", root=run, mode="w") as fh:
        fh.write("new\n")
    assert target.read_text() == "keep\n" and (run / "hard.log").read_text() == "new\n"


def test_a_root_that_is_itself_a_symlink_is_refused_for_writing_but_not_a_folder_above_it(tmp_path):
    """``outputs -> /elsewhere``, a ledger store or registry folder that is a link: nothing is written through it
    (the ledger and registry commands write with that folder as their root). A link further up stays allowed."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(IntegrityError, match="link is a symlink; refusing to write through it"):
        atomic_write(tmp_path / "link" / "registry.json", "{}", root=tmp_path / "link")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(IntegrityError, match="dangling is a symlink"):
        atomic_write(tmp_path / "dangling" / "x.json", "{}", root=tmp_path / "dangling")
    assert list(target.iterdir()) == [] and not (tmp_path / "nowhere").exists()
    atomic_write(tmp_path / "link" / "run" / "report.json", "{}", root=tmp_path / "link" / "run")
    assert (target / "run" / "report.json").read_text() == "{}"
    assert read_nofollow(tmp_path / "link" / "run" / "report.json", root=tmp_path / "link") == b"{}"  # reads may


def test_shred_destroys_a_file_and_refuses_to_follow_a_link(tmp_path):
    secret = tmp_path / "epoch_00000" / "secret.ctx"
    secret.parent.mkdir()
    secret.write_bytes(b"s" * 64)
    assert shred(secret, root=tmp_path) is True and not secret.exists()
    assert shred(secret, root=tmp_path) is False  # already gone
    target = tmp_path / "precious"
    target.write_bytes(b"p" * 64)
    secret.symlink_to(target)
    with pytest.raises(IntegrityError, match="symlink"):
        shred(secret, root=tmp_path)
    assert target.read_bytes() == b"p" * 64


# ---- writers moved onto the helpers -----------------------------------------------------------------------------
def test_monitor_json_refuses_a_symlink_in_one_line_before_any_work(tmp_path, capsys):
    target = tmp_path / "bashrc"
    target.write_text("keep\n")
    link = tmp_path / "verdict.json"
    link.symlink_to(target)
    # The run folder and the batch do not even exist: the --json path is checked first, so nothing is loaded.
    with pytest.raises(SystemExit) as exit_:
        monitor.main([str(tmp_path / "no_run"), str(tmp_path / "no.npz"), "--json", str(link)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("aisec-train-monitor: error:") and "symlink" in err and err.count("\n") == 1
    assert target.read_text() == "keep\n" and link.is_symlink()


def test_retire_refuses_a_symlinked_secret_and_key_ids_are_written_safely(tmp_path):
    from aisec_train.crypto.ckks import SECRET_FILE, CkksParams
    from aisec_train.crypto.rotation import KEY_ID_FILE, epochs, retire, rotate_keys

    client, server = tmp_path / "client_keys", tmp_path / "server_keys"
    key = rotate_keys(CkksParams(), client, server, 0)
    for folder in (client / "epoch_00000", server / "epoch_00000"):  # the key id, whole, and no temp left
        assert (folder / KEY_ID_FILE).read_text() == key.key_id + "\n"
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert epochs(client) == epochs(server) == {key.key_id: 0}
    target = tmp_path / "precious"
    target.write_bytes(b"p" * 32)
    planted = client / "epoch_00001"
    planted.mkdir()
    (planted / SECRET_FILE).symlink_to(target)
    with pytest.raises(IntegrityError, match="symlink"):
        retire(client, before_epoch=2)
    assert target.read_bytes() == b"p" * 32


def test_the_federated_job_file_is_written_atomically_and_never_through_a_symlink(tmp_path):
    import aisec_train
    from aisec_train.federated.task import load_job, write_job

    cfg = aisec_train.compose(["federated=fedavg", "federated.clients=2"])
    path, digest = write_job(cfg, tmp_path / "fed" / "job.json", manifest_sha256="abc")
    assert load_job(str(path), digest)[1]["manifest_sha256"] == "abc"
    assert os.listdir(path.parent) == ["job.json"]  # no fixed ".tmp" name left for a second job to collide on
    target = tmp_path / "elsewhere.json"
    target.write_text("keep")
    link = tmp_path / "fed" / "linked.json"
    link.symlink_to(target)
    with pytest.raises(IntegrityError, match="symlink"):
        write_job(cfg, link, manifest_sha256="abc")
    assert target.read_text() == "keep"


def test_an_edited_or_unpinned_federated_job_file_is_refused(tmp_path):
    """Every SuperNode rebuilds its privacy mode, defences and model from job.json: the settings both sides get
    (node and run config) pin its SHA-256, so switching off the clients' DP in the file is refused, not obeyed."""
    import aisec_train
    from aisec_train.federated.settings import ClientSettings, ServerSettings
    from aisec_train.federated.task import load_job, write_job

    cfg = aisec_train.compose(["federated=fedavg", "federated.clients=2"])
    path, digest = write_job(cfg, tmp_path / "fed" / "job.json", manifest_sha256="abc")
    assert load_job(str(path), digest)[0].privacy.mode.value == "dpsgd"
    both = (ServerSettings(str(path), "s", job_sha256=digest), ClientSettings(str(path), "c", job_sha256=digest))
    for settings in both:
        assert type(settings).from_map(settings.to_map()).job_sha256 == digest  # what a SuperNode is told
    edited = json.loads(path.read_text())
    edited["config"]["privacy"]["mode"] = "none"
    path.write_text(json.dumps(edited, indent=1))
    load_job.cache_clear()  # a process keeps the config it verified; a fresh SuperNode reads the file again
    with pytest.raises(IntegrityError, match="refusing an edited job file"):
        load_job(str(path), digest)
    with pytest.raises(IntegrityError, match="no job-sha256 pins it"):
        load_job(str(path), "")


def test_the_sweep_summary_is_written_safely_and_a_planted_link_is_one_line(tmp_path, capsys):
    from aisec_train import sweep

    for i, eps in enumerate((1.0, None)):
        run = tmp_path / str(i)
        run.mkdir()
        report = {"metrics": {"clean_accuracy": 0.5 + i / 10}, "privacy": {"epsilon": eps}, "run": {"timings": {}}}
        (run / "report.json").write_text(json.dumps(report))
    rows = sweep.summarize(tmp_path)
    assert len(rows) == 2 and "| 1 |" in (tmp_path / "sweep_summary.md").read_text()
    assert (tmp_path / "sweep_summary.csv").read_text().startswith("run,overrides,")  # csv's own \r\n, untranslated
    assert (tmp_path / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    target = tmp_path / "bashrc"
    target.write_text("keep\n")
    (tmp_path / "sweep_summary.md").unlink()
    (tmp_path / "sweep_summary.md").symlink_to(target)
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "symlink" in err and err.count("\n") == 1
    assert target.read_text() == "keep\n"


def test_figures_are_saved_through_the_helper(tmp_path):
    from aisec_train.backdoor.plot import pruning_curve
    from aisec_train.federated.report import plot_accuracy

    curve = [{"fraction": f, "test_accuracy": 0.9, "trusted_accuracy": 0.9, "asr": 1 - f} for f in (0.0, 0.5)]
    pruning_curve(curve, 0.5, {"clean_accuracy": 0.9, "asr": 0.1}, tmp_path / "backdoor" / "pruning.png")
    plot_accuracy([{"round": 1, "failed": False, "test_accuracy": 0.5}], tmp_path / "federated_accuracy.png")
    for png in (tmp_path / "backdoor" / "pruning.png", tmp_path / "federated_accuracy.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "linked.png").symlink_to(tmp_path / "federated_accuracy.png")
    with pytest.raises(IntegrityError, match="symlink"):
        plot_accuracy([{"round": 1, "failed": False, "test_accuracy": 0.5}], tmp_path / "linked.png")
