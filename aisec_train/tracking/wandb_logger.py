"""``logger=wandb``: offline by default (a local run under ``<run dir>/wandb``, uploaded later by ``wandb sync``).

Each axis has its own x-axis metric (``step``, ``epoch``, ``round``), so per-epoch values are not forced onto
wandb's one monotonic step; a multirun's jobs share a group named after the sweep directory. Runs in the tracking
child process (tracking/sidecar.py): wandb's import and its service's start-up (seconds) never hold up training.
wandb 0.31 has no service-less mode any more (``x_disable_service`` is gone), hence the child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from aisec_train.errors import ConfigError
from aisec_train.store import validate_output_path
from aisec_train.tracking.base import RunInfo, check_output_path
from aisec_train.tracking.config import WandbLoggerConfig
from aisec_train.tracking.sidecar import CHILD_ENV, TrackingError

# Run by WandbBackend.check in a child: argv = project, mode; prints what wandb would refuse.
_CHECK = """
import json, sys
from wandb.errors import UsageError
from wandb.sdk import wandb_setup
from wandb.sdk.lib.wbauth import authenticate
from wandb.sdk.wandb_settings import Settings

project, mode = sys.argv[1] or None, sys.argv[2]
verdict = {"project": None, "no_credentials_for": None}
try:
    Settings(project=project)
except UsageError as err:
    verdict["project"] = str(err)
if mode == "online":
    host = wandb_setup.singleton().settings.base_url
    if not authenticate.authenticate_session(host=host, source="aisec-train", prompt=False, update_session=False):
        verdict["no_credentials_for"] = host
print(json.dumps(verdict))
"""


CHECK_TIMEOUT_S = 120  # the check takes about a second (wandb's import and auth lookup); a hung one, far longer


def SETTINGS():  # noqa: N802 - a constant, built late (wandb imports lazily)
    import wandb

    # symlink=False: no latest-run / debug.log links in the run directory (aisec-train refuses any symlink there);
    # silent, console off: the job's own end-of-run summary stays the last thing printed.
    return wandb.Settings(symlink=False, silent=True, console="off", x_disable_stats=True, disable_git=True)


class WandbBackend:
    name = "wandb"
    package = "wandb"

    @staticmethod
    def check(cfg: WandbLoggerConfig, info: RunInfo) -> None:
        """Before any work, creating nothing (the folder is made when the first figure is written).

        What wandb refuses only in the tracking child, once the run had trained, charged its budget and written its
        model, is asked of wandb's own code here, in a short child process (about a second; wandb is never imported
        into the training process): the project name (``Settings``' validator) and, online, whether credentials
        are configured (its auth lookup: no prompt, no network)."""
        check_output_path(info.run_dir / "wandb" / "run", info.run_dir, "logger.wandb")
        args = [sys.executable, "-c", _CHECK, cfg.project or "", cfg.mode]
        try:
            out = subprocess.run(
                args, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env={**os.environ, **CHILD_ENV}
            )
        except subprocess.TimeoutExpired:  # a hung credential helper or file system: it was a traceback
            raise TrackingError(
                f"logger=wandb failed: its settings and credential check took over {CHECK_TIMEOUT_S} s (a hung "
                "credential helper or network file system?); allowed: logger.wandb.mode=offline or disabled, or "
                "fix what wandb waits for"
            ) from None
        if out.returncode != 0:  # wandb itself failed to load: the tracking child would fail the same way, later
            raise TrackingError(f"logger=wandb failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        verdict = json.loads(out.stdout)
        if verdict["project"]:
            allowed = "at most 128 characters, none of / \\ # ? % :"
            raise ConfigError(f"logger.wandb.project={cfg.project!r} is not allowed: {allowed} ({verdict['project']})")
        if host := verdict["no_credentials_for"]:
            raise ConfigError(
                f"logger.wandb.mode='online' is not allowed here: no W&B credentials for {host} (WANDB_API_KEY, "
                "`wandb login` or an identity token file), and wandb would only say so after training; allowed: "
                "offline (a local run that `wandb sync` uploads later), disabled, or online after `wandb login`"
            )

    def __init__(self, cfg: WandbLoggerConfig, info: RunInfo):
        import wandb

        validate_output_path(info.run_dir / "wandb" / "run", root=info.run_dir, what="logger.wandb")  # made here
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or info.group, name=info.run_name,
            dir=str(info.run_dir), mode=cfg.mode, job_type=info.experiment, tags=list(info.tags.values()),
            reinit="create_new", settings=SETTINGS(),
        )  # fmt: skip
        self.axes: set[str] = set()

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int, axis: str, wall_time: float | None = None) -> None:
        # wall_time unused: wandb stamps each row itself and has no public way to back-date one
        if axis not in self.axes:
            self.axes.add(axis)
            self.run.define_metric(axis)
            self.run.define_metric(f"{axis}/*", step_metric=axis)
        self.run.log({**values, axis: step})

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        self.run.summary.update(headline)

    def close(self, ok: bool) -> None:
        sync_dir = Path(self.run.settings.sync_dir)
        self.run.finish(exit_code=0 if ok else 1)
        for path in sync_dir.rglob("*"):  # wandb links logs/debug-core.log to its cache even with symlink=False
            if path.is_symlink():
                path.unlink()
