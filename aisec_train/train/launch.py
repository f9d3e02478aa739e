"""torchrun as the engine: this process's place in a ``torch.distributed`` job, read from the ``env://`` variables
torch's elastic agent sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``TORCHELASTIC_RUN_ID``), whether ``torchrun`` started every process of the job or ``train.distributed.nproc``
started them through the same elastic launcher (train/distributed.py), or Hydra's submitit launcher started each
of them as one task of a several-task job (:func:`adopt_submitit` derives the variables).

    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB \\
        -m aisec_train hydra.run.dir=/shared/runs/JOB ...

Every rank runs the CLI: all of them load the data and train; rank 0 alone holds the run directory's lock,
charges the dataset ledger, writes checkpoints, logs to trackers and runs the stages after training. All ranks
must agree on the run directory: an explicit ``hydra.run.dir``, or ``outputs/torchrun/<rendezvous id>``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Any

from aisec_train.errors import ConfigError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER_STAGES = ("data", "backdoor_poison", "train")  # what ranks other than 0 run: they only train


def under_torchrun() -> bool:
    """True in a process torch's elastic agent started (torchrun, or train.distributed.nproc's launcher), or one
    task of a several-task submitit job (its env:// variables are derived first: :func:`adopt_submitit`)."""
    adopt_submitit()
    if not all(os.environ.get(name) for name in ENV):
        return False
    check_env()
    return True


def check_env() -> None:
    """The ``env://`` variables an outer launcher (or a stale shell) set, refused in one line before any work when
    torch could not use them: a name that is not a whole number was a traceback once the data was loaded, and a
    ``RANK`` outside ``[0, WORLD_SIZE)`` waited at the rendezvous for a peer that never comes."""
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            numbers[name] = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not allowed: a whole number (torchrun's env:// variables)") from None
    world, rank = numbers["WORLD_SIZE"], numbers["RANK"]
    local, local_world = numbers.get("LOCAL_RANK", 0), numbers.get("LOCAL_WORLD_SIZE", world)
    refusals = [
        ("WORLD_SIZE", world, world >= 1, "at least 1"),
        ("RANK", rank, 0 <= rank < world, f"0 to {world - 1} with WORLD_SIZE={world}"),
        ("LOCAL_RANK", local, 0 <= local < max(1, local_world), f"0 to {local_world - 1} (LOCAL_WORLD_SIZE)"),
        ("MASTER_PORT", numbers["MASTER_PORT"], 0 < numbers["MASTER_PORT"] < 65536, "1 to 65535"),
    ]
    for name, value, ok, allowed in refusals:
        if not ok:
            raise ConfigError(
                f"{name}={value} is not allowed: {allowed} (an outer launcher or the shell set torchrun's env:// "
                "variables; unset RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to train in one process)"
            )


def check_launch(cfg: Any) -> None:
    """Under torchrun or a several-task submitit job the outer launcher started every rank; a
    ``train.distributed.nproc`` above 1 was ignored there (the report said the launcher's world size), so it is
    refused in one line with the rest of the config."""
    nproc = cfg.train.distributed.nproc
    if not under_torchrun():
        return
    if nproc > 1:
        raise ConfigError(
            f"train.distributed.nproc={nproc} is not allowed under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
            "the launcher already started the ranks; allowed: 1 (set the ranks with torchrun --nproc-per-node)"
        )
    # Rank 0 takes the run directory's and the dataset ledger's locks (up to train.lock_wait_s each) before it joins
    # the rendezvous, while the other ranks already wait there: a shorter timeout gave up on a rank that was coming.
    timeout, wait = cfg.train.distributed.timeout, cfg.train.lock_wait_s
    if timeout <= wait:
        raise ConfigError(
            f"train.distributed.timeout={timeout:g} is not allowed with train.lock_wait_s={wait:g} under torchrun: "
            "the other ranks wait at the rendezvous while rank 0 waits for the run directory's and the ledger's "
            "locks; allowed: a timeout above train.lock_wait_s (docs/cluster.md)"
        )


def adopt_submitit() -> None:
    """Under Hydra's submitit launcher with several tasks (``hydra.launcher.nodes``, ``tasks_per_node``), each task
    is one rank: set the ``env://`` variables torchrun would, from submitit's JobEnvironment (SLURM_PROCID,
    SLURM_LOCALID, SLURM_NTASKS, the job's node list; the local executor's own variables), so the job takes the
    same path as torchrun. The rendezvous is the job's first node; the port is derived from the job id, so every
    task agrees on it without talking (a requeued job keeps its id, hence its port). Variables already set win."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or all(os.environ.get(name) for name in ENV):
        return
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks < 2:
        return  # one task: a plain job (train.distributed.nproc may still launch local ranks)
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
    os.environ["LOCAL_WORLD_SIZE"] = str(job.num_tasks // max(1, job.num_nodes))
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port(job.job_id)))


def rendezvous_port(job_id: str) -> int:
    """A port in [29500, 49500) every task of the job derives alike (CRC-32 of the job id: no salted hash)."""
    return 29500 + zlib.crc32(job_id.encode()) % 20000


def env_rank() -> int:
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def cli_overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides a torchrun rank adds to its command line: the shared run directory when none is given
    (derived from the rendezvous id), and, on ranks other than 0, no .hydra/ or log file of their own (rank 0
    writes them; several processes would race on the same files)."""
    if not under_torchrun() or any(a.lstrip("+").startswith("-m") or a == "--multirun" for a in argv):
        return []
    extra = []
    if not any(a.lstrip("+").startswith("hydra.run.dir=") for a in argv):
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if not run_id or run_id == "none" or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_id):
            raise ConfigError(
                f"TORCHELASTIC_RUN_ID={run_id!r} is not allowed as a run directory: under torchrun give "
                "hydra.run.dir=DIR (the same on every node) or torchrun --rdzv-id=ID (letters, digits, . _ -)"
            )
        extra.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    if env_rank() != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


# Worker ranks run the data, backdoor-poison and train stages only: the audit and logger sections are rank 0's.
# Where a node finds the data is its own affair; what it read is compared through the data's manifest hash. How
# long a rank waits for the others (train.distributed.timeout) is its own too: it changes no weight, noise or charge,
# only when this rank gives up, and a node that starts slowly may need longer than the rest.
RANK0_SECTIONS = ("audit", "logger")
NODE_LOCAL = (
    "dataset.path", "dataset.test_path", "dataset.root", "dataset.tokenizer", "dataset.workers",
    "train.distributed.timeout",
)  # fmt: skip


def job_view(cfg: Any, data_sha256: str) -> dict[str, str]:
    """What a rank trains, flattened to ``key: value``: every config section a worker rank reads and the data's
    manifest hash. The ranks must agree on all of it: rank 0 alone charges the ledger and writes the report, from
    its own settings, while each rank clips and samples with its own (a rank with a larger
    ``privacy.max_grad_norm`` broke the noise's calibration under a report of the rank 0 epsilon; another
    ``train.batch_size`` took another number of steps and hung the all-reduce)."""
    flat: dict[str, str] = {"data.manifest_sha256": data_sha256}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif prefix not in NODE_LOCAL:
            flat[prefix] = str(getattr(node, "value", node))  # an Enum by its config spelling

    walk("", {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RANK0_SECTIONS})
    return flat


def check_same_job(run_dir: str, view: dict[str, str]) -> None:
    """Every rank's run directory and :func:`job_view`, compared once the process group is up and before a step or
    a charge: refused in one line, on every rank alike, when they differ (a checkpoint written by rank 0 would not
    be the one the others resume from; a config rank 0 did not report would train)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (os.path.abspath(run_dir), view))
    check_agreement(gathered, dist.get_rank())


def check_agreement(gathered: list[tuple[str, dict[str, str]]], rank: int) -> None:
    """Every rank's (run directory, job view) as gathered; ConfigError, as ``rank`` words it, where they differ."""
    dirs = [entry[0] for entry in gathered]
    if len(set(dirs)) > 1:
        raise ConfigError(
            f"hydra.run.dir={dirs[rank]!r} is not allowed: the ranks of this torchrun job disagree "
            f"({sorted(set(dirs))}); give every node the same hydra.run.dir on shared storage"
        )
    views = [entry[1] for entry in gathered]
    for key in sorted(set().union(*views)):
        values = [v.get(key, "<unset>") for v in views]
        if len(set(values)) > 1:
            seen = "; ".join(f"rank {r}: {value}" for r, value in enumerate(values) if r == 0 or value != values[0])
            raise ConfigError(
                f"{key}={values[rank]} is not allowed: the ranks of this torchrun job disagree ({seen}), and rank 0 "
                "alone charges the privacy budget and reports its own; give every node the same overrides and data"
            )
