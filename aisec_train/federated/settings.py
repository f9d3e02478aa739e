"""What each side of the federation is told: the server gets the public context only, clients the secret one.

Both come from plain string maps, so the same apps read them from a closure (simulation), from
``context.run_config`` (the server in deployment) or ``context.node_config`` (each SuperNode).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServerSettings:
    job: str  # job.json: the config and the model's shape
    state_dir: str  # the server's per-round state (global model or encrypted aggregate)
    public_context: str = ""  # CKKS public context (no keys); empty for plaintext FedAvg
    public_sha256: str = ""
    public_root: str = ""  # federated.ckks.rotate_every > 0: epoch_<e>/ folders of public contexts and key ids
    job_sha256: str = ""  # job.json's SHA-256 (federated/task.py: load_job refuses a file that differs)

    @classmethod
    def from_map(cls, values: Any) -> ServerSettings:
        return cls(**{k: str(values.get(k.replace("_", "-"), "")) for k in cls.__dataclass_fields__})

    def to_map(self) -> dict[str, str]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ClientSettings:
    job: str
    state_dir: str  # client-only folder for the privacy ledgers
    secret_context: str = ""  # CKKS secret context (mode 0600); empty for plaintext FedAvg
    secret_sha256: str = ""
    secret_root: str = ""  # federated.ckks.rotate_every > 0: epoch_<e>/ folders of secret contexts (0600)
    job_sha256: str = ""

    @classmethod
    def from_map(cls, values: Any) -> ClientSettings:
        return cls(**{k: str(values.get(k.replace("_", "-"), "")) for k in cls.__dataclass_fields__})

    def to_map(self) -> dict[str, str]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)
