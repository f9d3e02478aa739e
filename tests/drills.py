"""Integrity drills on the real ``aisec-train`` command line: kill at random instants, concurrent jobs, forgeries.

Shared by tests/test_integrity_drills.py (each drill as a test, fast and slow sizes) and
scripts/figures/integrity.py (the figures). Every job is a real subprocess of ``python -m aisec_train``; a
:class:`Lab` holds the ledger store and registry its jobs use (the key and anchors come from the environment).

    lab = Lab(Path("/tmp/drill"))
    result = kill_drill(lab, kills=3, epochs=6, seed=0)   # {'kills': 3, 'ledger_steps': ..., 'report_steps': ...}
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# DP-SGD on the embedded digits, no audits: a job of a few seconds whose every step is charged.
JOB = ("experiment=smoke", "audit=off", "robustness.evaluate=false")
ERROR = "aisec-train: error: "


def screen_lines(err: str) -> list[str]:
    """The non-empty lines stderr leaves on a terminal: a progress bar redrawn with carriage returns and then
    replaced by the error message counts as that message only."""
    shown = (line.split("\r")[-1].strip() for line in err.split("\n"))
    return [line for line in shown if line]


@dataclass
class Outcome:
    """What one finished job left: exit status and its stderr (stdout goes to a file beside it)."""

    rc: int
    err: str
    out: str = ""

    @property
    def lines(self) -> list[str]:
        return screen_lines(self.err)

    @property
    def last(self) -> str:
        return self.lines[-1] if self.lines else ""

    def refused(self, *words: str) -> bool:
        """Exit 2 with exactly one stderr line, ours, naming ``words``, and no traceback."""
        lines = self.lines
        return (
            self.rc == 2
            and len(lines) == 1
            and lines[0].startswith(ERROR)
            and "Traceback" not in self.err
            and all(w in lines[0] for w in words)
        )


@dataclass
class Lab:
    """A folder for one drill: the ledger store and the registry its jobs use, and their logs."""

    root: Path
    store: Path | None = None
    registry: Path | None = None
    launched: int = field(default=0)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.store = Path(self.store or self.root / "privacy_ledgers")
        self.registry = Path(self.registry or self.root / "registry.json")
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.update(AISEC_TRAIN_LEDGER_STORE=str(self.store), AISEC_TRAIN_REGISTRY=str(self.registry))
        env.pop("HYDRA_FULL_ERROR", None)
        return env

    def launch(self, run_dir: Path, *overrides: str, job: tuple[str, ...] = JOB) -> subprocess.Popen:
        """Start ``aisec-train JOB OVERRIDES hydra.run.dir=RUN_DIR`` (stderr kept in a file for :meth:`outcome`)."""
        self.launched += 1
        log = self.root / "logs" / f"job{self.launched}"
        cmd = [sys.executable, "-m", "aisec_train", *job, *overrides, f"hydra.run.dir={run_dir}"]
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:  # the child keeps its own copies
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=out, stderr=err)
        proc.log = log  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def outcome(proc: subprocess.Popen, timeout: float = 900) -> Outcome:
        rc = proc.wait(timeout)
        with open(f"{proc.log}.err", newline="") as fh:  # type: ignore[attr-defined] - keep progress bars' \r
            return Outcome(rc, fh.read())

    def run(self, run_dir: Path, *overrides: str, job: tuple[str, ...] = JOB, timeout: float = 900) -> Outcome:
        return self.outcome(self.launch(run_dir, *overrides, job=job), timeout)

    def tool(self, name: str, *args: object) -> Outcome:
        """``aisec-train-ledger`` / ``aisec-train-registry`` (their modules, as the console scripts run them)."""
        module = {"ledger": "aisec_train.privacy.ledger_cli", "registry": "aisec_train.audit.registry_cli"}[name]
        proc = subprocess.run(
            [sys.executable, "-c", f"from {module} import main; main()", *map(str, args)],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            timeout=300,
        )
        err = proc.stderr.decode(errors="replace").replace(f"aisec-train-{name}: error: ", ERROR)
        return Outcome(proc.returncode, err, proc.stdout.decode(errors="replace"))

    # -- reading what the jobs left ---------------------------------------------------------------------------
    def ledger(self):
        """The one dataset ledger in this lab's store (verified), or None before any DP job."""
        from aisec_train.privacy import LedgerStore

        store = LedgerStore(self.store)
        datasets = store.datasets()
        assert len(datasets) <= 1, datasets
        return store.view(datasets[0]) if datasets else None

    def ledger_steps(self, run_dir: Path | None = None) -> int:
        led = self.ledger()
        return 0 if led is None else led.steps(None if run_dir is None else str(Path(run_dir).resolve()))

    def clone(self, name: str) -> Lab:
        """A lab with a copy of this one's ledger store (anchors copied too, so the copy is anchored like the
        original) and an empty registry: a scenario may tamper with it without touching the original."""
        other = Lab(self.root / name)
        if self.store.is_dir():
            shutil.copytree(self.store, other.store, ignore=shutil.ignore_patterns("*.lock"))
            from aisec_train.store import anchors

            for ledger in [*other.store.glob("*.json"), *other.store.glob("records/*.digests")]:  # record sets too
                source = anchors.anchor_path(self.store / ledger.relative_to(other.store))
                if source.exists():
                    shutil.copy2(source, anchors.anchor_path(ledger))
        return other


def checkpoint_payload(run_dir: Path) -> dict[str, Any] | None:
    """``RUN_DIR/checkpoints/last.pt``, verified and loaded (a refusal here is a failed drill); None if absent."""
    from aisec_train.train import checkpoint

    path = Path(run_dir) / "checkpoints" / "last.pt"
    return checkpoint.load(path, root=run_dir) if path.exists() else None


def checkpoint_steps(run_dir: Path) -> int | None:
    """The run-ledger steps held by ``RUN_DIR/checkpoints/last.pt`` (verified first), None when there is none."""
    payload = checkpoint_payload(run_dir)
    if payload is None:
        return None
    return sum(int(e[2]) for e in (payload.get("ledger") or {}).get("history", []))


def report(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "report.json").read_text())


# ---- kill at random instants ---------------------------------------------------------------------------------
def _ledger_stamp(lab: Lab) -> tuple:
    stamps = []
    for f in sorted(lab.store.glob("*.json")):
        try:
            st = f.stat()
            stamps.append((f.name, st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            pass
    return tuple(stamps)


def _wait_for(proc: subprocess.Popen, ready, timeout: float, poll: float = 0.002) -> bool:
    """Poll until ``ready()`` or the process ends; True when ready while it still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(poll)
    return False


def _file_stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
        return ()


def kill_drill(lab: Lab, *, kills: int, epochs: int, seed: int = 0, run_dir: Path | None = None) -> dict[str, Any]:
    """SIGKILL one run at ``kills`` random instants (each in a new process resuming the same run directory), then
    let it finish. Three kinds of instant, in turn: anywhere from launch (start-up, data, lock, noise calibration,
    training, outputs); during the epochs, at a random time after the launch's first checkpoint (charges and
    checkpoint commits included); and right after a ledger commit (between a charge and the checkpoint that holds
    the charged steps: the window where the ledger runs ahead).

    After every kill the checkpoint must load (verified) and the dataset ledger must verify and hold at least the
    checkpoint's steps; a job that ends on its own must exit 0, and so must the last one. A launch "resumed" when
    it got past every check into training (its ledger or checkpoint moved) or finished. Returns the tallies.
    """
    rng = random.Random(seed)
    run_dir = Path(run_dir or lab.root / "run")
    overrides = (f"train.epochs={epochs}",)
    ckpt = run_dir / "checkpoints" / "last.pt"
    events: list[dict[str, Any]] = []
    startup, epoch_s = 10.0, 1.0  # seconds to the first checkpoint of a launch, and per epoch: re-measured
    while sum(e["killed"] for e in events) < kills:
        assert len(events) < 6 * kills, "the drill stopped landing kills"
        # Training kinds first: an early "anywhere" kill can land after a short job's last epoch, and a finished
        # run leaves no training instant for the other two.
        kind = ("training", "after_charge", "anywhere")[len(events) % 3]
        before = (_file_stamp(ckpt), _ledger_stamp(lab), lab.ledger_steps(run_dir), checkpoint_steps(run_dir))
        launched = time.monotonic()
        proc = lab.launch(run_dir, *overrides)
        # A launch trains at most a few epochs, so that every kind of instant keeps coming up.
        if kind == "anywhere":
            killed = not _wait_for(proc, lambda: False, rng.uniform(0.0, startup + 2 * epoch_s))
        elif kind == "training":
            killed = _wait_for(proc, lambda b=before: _file_stamp(ckpt) != b[0], 600)
            if killed:
                startup = time.monotonic() - launched
                epoch_s = _epoch_seconds(run_dir, epoch_s)  # this launch's first epoch: a short job has few left
                killed = not _wait_for(proc, lambda: False, rng.uniform(0.0, 2 * epoch_s))
        else:
            killed = _wait_for(proc, lambda b=before: _ledger_stamp(lab) != b[1], 600, poll=0.0005)
        if killed:
            proc.send_signal(signal.SIGKILL)
        outcome = lab.outcome(proc)
        event = {"kind": kind, "killed": killed and outcome.rc == -signal.SIGKILL, "rc": outcome.rc}
        event["seconds"] = round(time.monotonic() - launched, 2)
        if not event["killed"]:
            assert outcome.rc == 0, f"a resume failed on its own (exit {outcome.rc}): {outcome.last}"
        event["checkpoint_steps"] = checkpoint_steps(run_dir)
        event["ledger_steps"] = lab.ledger_steps(run_dir)  # verifies tags, chain and anchor
        assert event["ledger_steps"] >= (event["checkpoint_steps"] or 0), event
        event["resumed"] = not event["killed"] or (event["ledger_steps"], event["checkpoint_steps"]) != before[2:]
        events.append(event)
        epoch_s = _epoch_seconds(run_dir, epoch_s)
    final = lab.run(run_dir, *overrides)
    assert final.rc == 0, final.err[-2000:]
    rep = report(run_dir)
    observed = [e["checkpoint_steps"] or 0 for e in events] + [checkpoint_steps(run_dir) or 0]
    led = lab.ledger()
    kinds = ("anywhere", "training", "after_charge")
    return {
        "kills": sum(e["killed"] for e in events),
        "kills_by_kind": {k: sum(e["killed"] and e["kind"] == k for e in events) for k in kinds},
        "launches": len(events) + 1,
        "resumes": sum(e["resumed"] for e in events[1:]) + 1,  # every launch after the first, and the final one
        "ledger_ahead_after_kill": sum(e["ledger_steps"] > (e["checkpoint_steps"] or 0) for e in events),
        "ledger_steps": lab.ledger_steps(run_dir),
        "report_steps": rep["privacy"]["steps"],
        "max_checkpoint_steps": max(observed),
        "final_checkpoint_steps": checkpoint_steps(run_dir),
        "epsilon": rep["privacy"]["epsilon"],
        "dataset_epsilon": led.total_epsilon(),
        "target_epsilon": led.target_epsilon,
        "stopped_by_budget": rep["train"]["stopped_by_budget"],
        "events": events,
    }


def _epoch_seconds(run_dir: Path, default: float) -> float:
    """Seconds per epoch, as the checkpointed epochs took them (``default`` before any checkpoint)."""
    try:
        history = (checkpoint_payload(run_dir) or {}).get("history") or []
    except Exception:  # a checkpoint being replaced at this instant: keep the last estimate
        return default
    if not history:
        return default
    return max(0.02, min(10.0, sum(r["seconds"] for r in history) / len(history)))


# ---- concurrent jobs -------------------------------------------------------------------------------------------
def concurrent(lab: Lab, run_dirs: list[Path], *overrides: str) -> list[Outcome]:
    """Start one job per entry of ``run_dirs`` at once (repeat a folder for jobs on one run directory)."""
    procs = [lab.launch(d, *overrides) for d in run_dirs]
    return [lab.outcome(p) for p in procs]


def same_run_dir(lab: Lab, jobs: int, *, wait: bool, epochs: int = 3) -> dict[str, Any]:
    """``jobs`` jobs on ONE run directory: all but one refuse naming the holder, or (``wait``) run in turn."""
    run_dir = lab.root / f"one_run_{jobs}_{'wait' if wait else 'refuse'}"
    outs = concurrent(lab, [run_dir] * jobs, f"train.epochs={epochs}", f"train.lock_wait_s={600 if wait else 0}")
    led = lab.ledger()
    return {
        "jobs": jobs,
        "wait": wait,
        "exit_codes": sorted(o.rc for o in outs),
        "refusals": [o.last for o in outs if o.rc != 0],
        "refused_naming_holder": sum(o.refused("is locked by pid", "since") for o in outs),
        "ledger_steps": lab.ledger_steps(run_dir),
        "report_steps": report(run_dir)["privacy"]["steps"] if (run_dir / "report.json").exists() else None,
        "dataset_epsilon": led.total_epsilon() if led else 0.0,
        "target_epsilon": led.target_epsilon if led else None,
        "outcomes": outs,
    }


def same_dataset(lab: Lab, jobs: int, *, wait: bool, noise: float = 2.0, epochs: int = 3) -> dict[str, Any]:
    """``jobs`` jobs on one DATASET from different run directories, each asking for more than its share of the
    budget (fixed noise): with ``wait`` they run in turn and the later ones stop at the budget or refuse it;
    without, all but one refuse naming the ledger's holder. The composed spend never passes the target."""
    dirs = [lab.root / f"data_{jobs}_{'wait' if wait else 'refuse'}_{i}" for i in range(jobs)]
    outs = concurrent(
        lab,
        dirs,
        f"train.epochs={epochs}",
        f"privacy.noise_multiplier={noise}",
        f"train.lock_wait_s={600 if wait else 0}",
    )
    led = lab.ledger()
    reports = [report(d) for d, o in zip(dirs, outs, strict=True) if o.rc == 0]
    return {
        "jobs": jobs,
        "wait": wait,
        "exit_codes": [o.rc for o in outs],
        "refusals": [o.last for o in outs if o.rc != 0],
        "refused_locked": sum(o.refused("privacy ledger of dataset", "is locked by pid") for o in outs),
        "refused_exhausted": sum(o.refused("privacy budget exhausted") for o in outs),
        # refused before any step because the planned spend does not fit what is left (never stopped part-way)
        "refused_budget": sum(o.refused("privacy budget", "nothing was trained", "choices:") for o in outs),
        "stopped_by_budget": sum(r["train"]["stopped_by_budget"] for r in reports),
        "run_epsilons": [r["privacy"]["epsilon"] for r in reports],
        "run_steps": [r["privacy"]["steps"] for r in reports],
        "ledger_steps": lab.ledger_steps(),
        "dataset_epsilon": led.total_epsilon(),
        "target_epsilon": led.target_epsilon,
        "outcomes": outs,
    }
