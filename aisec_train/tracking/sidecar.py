"""Trackers that are slow to import and start (MLflow, wandb, TensorBoard) run in a child process, so training
never waits for them.

MLflow's and wandb's packages take seconds to import, MLflow's sqlite store seconds more to create its schema and
wandb seconds to start its service; in the training process that was 20-70% of the quick job's wall time. Here
the training process only starts ``python -m aisec_train.tracking.sidecar`` and queues each record; a writer
thread pickles the queue into the child's stdin (a slow child never blocks a step), and the child builds the real
backend and replays the records in order. ``close`` waits until the child has written everything, so the stores
are complete when the run returns, exactly as when the backend ran in-process.

A child that fails (a tracking server refusing, a full disk) raises ``TrackingError`` at the next record or at
close; its whole output is kept in ``<run dir>/tracking/<logger>.log``. Mid-run the fan-out (tracking/base.py)
drops it and the run goes on; the error ends the run, in one line, once its report and model are written.
"""

from __future__ import annotations

import importlib
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aisec_train.errors import Refusal
from aisec_train.store.files import atomic_write
from aisec_train.tracking.base import RunInfo

CLOSE_WAIT_S = 600  # the child's last records (artifacts, wandb's final flush) take seconds, not minutes
BATCH, FLUSH_S = 256, 2.0  # per-step records reach the stores within two seconds (at once for epochs and rounds)


class TrackingError(Refusal, RuntimeError):
    """A tracker's child process failed: the run's tracking data would be incomplete."""


# OMP_NUM_THREADS: the child does no tensor maths, so it leaves the cores to training.
# MLFLOW_DISABLE_TELEMETRY: MLflow would otherwise write ~/.config/mlflow/telemetry.json and try to reach its
# servers from a cluster node; a run directory's tracker has no business doing either (users may override it).
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}


class Sidecar:
    """The parent's side: the :class:`~aisec_train.tracking.base.Backend` protocol, each call a queued record."""

    def __init__(self, name: str, module: str, cls: str, cfg: Any, info: RunInfo, package: str | None = None):
        self.name, self.run_dir = name, info.run_dir
        self.opening = (module, cls, cfg, info)
        self.output = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            # main() imported, not run as ``-m``: the package imports this module first, and runpy's warning
            # about that would be the last line of a killed child's output, the one its failure is named by
            [sys.executable, "-c", "from aisec_train.tracking.sidecar import main; main()"],
            stdin=subprocess.PIPE, stdout=self.output, stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV},
        )  # fmt: skip
        self.error: TrackingError | None = None
        self.pending: list[tuple[str, tuple]] = []  # records not yet handed to the writer thread
        self.handed_at = time.monotonic()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # lists of records, None at the end
        self.writer = threading.Thread(target=self._write, name=f"tracking-{name}", daemon=True)
        self.writer.start()
        # The child imports the backend's package now (the seconds it takes pass while the data loads) and opens
        # the backend only at start(), at the run's first figure: a run refused before then leaves no store.
        self._send("prepare", package or module)

    def start(self) -> None:
        self._send("open", *self.opening)

    def _send(self, method: str, *args: Any) -> None:
        """Per-step records are handed to the writer thread in batches (every BATCH records or FLUSH_S seconds, and
        with any other record): waking a thread per step cost about a millisecond a step on a loaded machine, in
        the GIL hand-off, not in the work."""
        self.pending.append((method, args))
        step = method == "log_metrics" and args[2] == "step"
        if not step or len(self.pending) >= BATCH or time.monotonic() - self.handed_at > FLUSH_S:
            self._hand_over()

    def _hand_over(self) -> None:
        if self.proc.poll() is not None:  # a waitpid: microseconds
            raise self._failure()
        self.queue.put(self.pending)
        self.pending, self.handed_at = [], time.monotonic()

    def _write(self) -> None:
        """Everything queued so far goes in one pickle; a closed pipe (the child died) ends the thread and the next
        record or close reports the child's failure."""
        stream = self.proc.stdin
        while True:
            batches = [self.queue.get()]
            while True:
                try:
                    batches.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            done = batches[-1] is None
            records = [record for batch in batches if batch is not None for record in batch]
            try:
                pickle.dump(records, stream, protocol=pickle.HIGHEST_PROTOCOL)
                stream.flush()
                if done:
                    stream.close()
            except (BrokenPipeError, OSError, ValueError):
                return
            if done:
                return

    def log_params(self, params: dict[str, Any]) -> None:
        self._send("log_params", params)

    def log_metrics(self, values: dict[str, float], step: int, axis: str) -> None:
        # Stamped here, when training measured it: the child writes batched records up to FLUSH_S later.
        self._send("log_metrics", values, step, axis, time.time())

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        self._send("finish", headline, files)

    def close(self, ok: bool) -> None:
        if self.proc.poll() is None:
            self.queue.put([*self.pending, ("close", (ok,))])
        self.queue.put(None)
        self.writer.join()
        try:
            code = self.proc.wait(timeout=CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code != 0:
            raise self._failure()
        self.output.close()

    def _failure(self) -> TrackingError:
        if self.error is not None:
            return self.error
        self.proc.wait()
        self.output.seek(0)
        text = self.output.read().decode(errors="replace")
        self.output.close()
        log = self.run_dir / "tracking" / f"{self.name}.log"
        atomic_write(log, text, root=self.run_dir)
        lines = [line for line in text.splitlines() if line.strip()]
        code = self.proc.returncode
        if code < 0:  # killed (the OOM killer, a kill by hand): its output, if any, does not say why it stopped
            try:
                last = f"its process was killed by {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal has no name
                last = f"its process was killed by signal {-code}"
        else:
            last = lines[-1] if lines else f"exit status {code}"
        self.error = TrackingError(f"logger={self.name} failed: {last} (its whole output: {log})")
        return self.error


def main() -> None:
    """The child: import the backend's package (``prepare``), build the backend at ``open`` (the run's first
    figure), then replay every record in order until ``close``.
    End of input without ``close`` (the training process was killed) closes the run as failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which closes this run as failed
    stream, backend = sys.stdin.buffer, None
    while True:
        try:
            batch = pickle.load(stream)
        except EOFError:
            break
        for method, args in batch:
            if method == "prepare":
                importlib.import_module(args[0])
                continue
            if method == "open":
                module, cls, cfg, info = args
                backend = getattr(importlib.import_module(module), cls)(cfg, info)
                continue
            if backend is not None:  # None: closed before start() (the run ended before its first figure)
                getattr(backend, method)(*args)
            if method == "close":  # everything written: skip the interpreter's teardown of MLflow/TensorBoard
                sys.stdout.flush()  # (about a second of module clean-up the training process would wait for)
                sys.stderr.flush()
                os._exit(0)
    if backend is not None:
        backend.close(False)


if __name__ == "__main__":
    main()
