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

import os
import re
import zlib

from aisec_train.errors import ConfigError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER_STAGES = ("data", "backdoor_poison", "train")  # what ranks other than 0 run: they only train


def under_torchrun() -> bool:
    """True in a process torch's elastic agent started (torchrun, or train.distributed.nproc's launcher), or one
    task of a several-task submitit job (its env:// variables are derived first: :func:`adopt_submitit`)."""
    adopt_submitit()
    return all(os.environ.get(name) for name in ENV)


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


def check_same_run_dir(run_dir: str) -> None:
    """Every rank's run directory, compared once the process group is up: refused in one line when they differ
    (a checkpoint written by rank 0 would not be the one the others resume from)."""
    import torch.distributed as dist

    dirs: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, os.path.abspath(run_dir))
    if len(set(dirs)) > 1:
        raise ConfigError(
            f"hydra.run.dir={dirs[dist.get_rank()]!r} is not allowed: the ranks of this torchrun job disagree "
            f"({sorted(set(dirs))}); give every node the same hydra.run.dir on shared storage"
        )
