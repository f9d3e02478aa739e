"""FedAvg whose aggregation is plaintext or CKKS ciphertext addition, with refusals, a quorum and round state.

On the CKKS path the server holds a public context (parameters only, no key) and can only add: it never
sees a weight, a norm or a model. Each reply's ``arrays`` holds one ``Array`` of serialized ciphertexts
(``stype="ckks"``); the sum goes back to the clients, who decrypt it at the start of the next round.
Nothing in this module (or in ``server_app.py``) imports a function that reads the clients' secret context;
``tests/test_federated_keys.py`` holds it to that.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aisec_train.crypto.ckks import EncryptedUpdate, InvalidCiphertextError, aggregate, load_public_context
from aisec_train.federated.task import REFUSAL_CODES, check_update, flatten
from aisec_train.train import checkpoint

log = logging.getLogger("aisec_train.federated")
CKKS_KEY = "ckks"
REASONS = {code: name for name, code in REFUSAL_CODES.items()}
CLIENT_KEYS = (
    "partition-id",
    "num-examples",
    "epsilon",
    "steps",
    "train-s",
    "encrypt-s",
    "decrypt-s",
    "upload-bytes",
    "refused",
    "train-loss",
    "train-accuracy",
)


def ckks_record(update: EncryptedUpdate) -> ArrayRecord:
    data = update.to_bytes()
    return ArrayRecord({CKKS_KEY: Array(dtype="bytes", shape=(len(data),), stype=CKKS_KEY, data=data)})


def ckks_payload(record: ArrayRecord) -> bytes | None:
    """The serialized ciphertexts in ``record``, or None when it holds plaintext weights."""
    return bytes(record[CKKS_KEY].data) if CKKS_KEY in record else None


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / "state.pt"


def record_to_state(arrays: ArrayRecord) -> dict[str, Any]:
    payload = ckks_payload(arrays)
    if payload is not None:
        return {"kind": CKKS_KEY, "data": payload}
    return {"kind": "plaintext", "tensors": {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}}


def state_to_record(state: dict[str, Any]) -> ArrayRecord:
    if state["kind"] == CKKS_KEY:
        return ckks_record(EncryptedUpdate.from_bytes(state["data"]))
    return ArrayRecord(state["tensors"])


def load_state(state_dir: Path) -> dict[str, Any] | None:
    """The last saved round (hash-verified, ``weights_only`` load), or None before the first one."""
    path = state_path(state_dir)
    return checkpoint.load(path) if path.exists() else None


def wait_for_nodes(grid: Grid, wanted: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """Give the federation up to ``timeout_s`` to connect ``wanted`` nodes; return how many did.

    Flower's sampler starts a round as soon as its minimum is connected, so without this a deployment's
    first round would train on whichever SuperNodes happened to connect first.
    """
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(poll_s)
    return connected


class SecureFedAvg(FedAvg):
    """FedAvg over all connected clients; ``ckks`` adds ciphertexts only, ``plaintext`` checks each update first."""

    def __init__(
        self,
        *,
        aggregation: str,
        min_clients: int,
        max_update_norm: float,
        state_dir: Path,
        public_context: str = "",
        public_sha256: str = "",
        evaluate: bool = True,
        round_offset: int = 0,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            fraction_evaluate=1.0 if evaluate else 0.0,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients if evaluate else 0,
            min_available_nodes=min_clients,
        )
        self.aggregation, self.min_clients, self.max_update_norm = aggregation, min_clients, max_update_norm
        self.state_dir, self.round_offset = Path(state_dir), round_offset
        # The server's context: parameters only. load_public_context refuses one that holds a secret key.
        self.public_ctx = load_public_context(Path(public_context), public_sha256 or None) if public_context else None
        if aggregation == CKKS_KEY and self.public_ctx is None:
            raise ValueError("ckks aggregation needs the public context path")
        self.history = history or []
        self._global: ArrayRecord | None = None
        self._sampled: dict[int, int] = {}  # round -> number of clients asked
        self._started: dict[int, float] = {}  # round -> when its training messages were configured

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = server_round + self.round_offset
        self._global, self._started[rnd] = arrays, time.perf_counter()
        config = ConfigRecord({**config, "server-round": rnd})
        messages = list(super().configure_train(rnd, arrays, config, grid))
        self._sampled[rnd] = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = server_round + self.round_offset
        return super().configure_evaluate(rnd, arrays, ConfigRecord({**config, "server-round": rnd}), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # 1. Who answered: missing replies are clients that crashed or passed the round timeout.
        rnd = server_round + self.round_offset
        replies = list(replies)
        answered = [m for m in replies if not m.has_error()]
        row: dict[str, Any] = {"round": rnd, "sampled": self._sampled.get(rnd, len(replies))}
        row["dropped"] = row["sampled"] - len(answered)
        row["errors"] = [_reason(m.error.reason) for m in replies if m.has_error()]
        # 2. Refusals: the clients' own (before encryption) and, on plaintext, the server's check.
        accepted, row["refused"] = self._screen(answered)
        row["clients"] = [_client_row(m.content["metrics"]) for m in answered]
        row["accepted"] = sorted(int(m.content["metrics"]["partition-id"]) for m in accepted)
        # 3. Aggregate a quorum, or keep the global model.
        arrays = None
        if len(accepted) < self.min_clients:
            row["failed"] = f"{len(accepted)} usable update(s) < federated.min_clients={self.min_clients}"
            log.warning("round %d failed: %s; the global model is kept", rnd, row["failed"])
        else:
            started = time.perf_counter()
            arrays = self._aggregate(accepted)
            row["aggregate_s"], row["failed"] = time.perf_counter() - started, None
        row["train_round_s"] = time.perf_counter() - self._started.get(rnd, time.perf_counter())
        self.history.append(row)
        # 4. Persist the round before anything else can fail: a resumed run continues after it.
        self._save(arrays if arrays is not None else self._global, rnd)
        summary = {"accepted": len(accepted), "dropped": row["dropped"], "refused": len(row["refused"])}
        return arrays, MetricRecord(summary)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        rows = [m.content["metrics"] for m in replies if not m.has_error()]
        total = sum(int(r["num-examples"]) for r in rows)
        if not rows or total == 0:
            return None
        acc = sum(float(r["accuracy"]) * int(r["num-examples"]) for r in rows) / total
        row = next(h for h in reversed(self.history) if h["round"] == rnd)
        row["test_accuracy"], row["evaluated_examples"] = acc, total
        row["decrypt_s"] = [float(r["decrypt-s"]) for r in rows]
        row["round_s"] = time.perf_counter() - self._started.get(rnd, time.perf_counter())
        self._save(None, rnd)
        return MetricRecord({"accuracy": acc, "num-examples": total})

    # -- helpers -------------------------------------------------------------------------------------------
    def _screen(self, answered: list[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
        """Split answered clients into usable updates and refusals (theirs, or the server's on plaintext)."""
        accepted, refused = [], []
        base = None if self.aggregation == CKKS_KEY else flatten(self._global.to_torch_state_dict())
        for msg in answered:
            metrics = msg.content["metrics"]
            pid, code = int(metrics["partition-id"]), int(metrics["refused"])
            if code:
                refused.append({"client": pid, "reason": REASONS[code], "by": "client"})
                continue
            if base is not None:
                reason = check_update(flatten(msg.content["arrays"].to_torch_state_dict()) - base, self.max_update_norm)
                if reason:
                    refused.append({"client": pid, "reason": reason, "by": "server"})
                    continue
            accepted.append(msg)
        return accepted, refused

    def _aggregate(self, accepted: list[Message]) -> ArrayRecord:
        if self.aggregation == CKKS_KEY:
            try:
                return ckks_record(aggregate([ckks_payload(m.content["arrays"]) for m in accepted], self.public_ctx))
            except InvalidCiphertextError as err:
                raise RuntimeError(f"an encrypted update was malformed: {err}") from err
        weights = np.array([float(m.content["metrics"]["num-examples"]) for m in accepted])
        states = [m.content["arrays"].to_torch_state_dict() for m in accepted]
        mean = {
            k: torch.as_tensor(sum(w * s[k].double() for w, s in zip(weights, states, strict=True)) / weights.sum()).to(
                states[0][k].dtype
            )
            for k in states[0]
        }
        return ArrayRecord(mean)

    def _save(self, arrays: ArrayRecord | None, rnd: int) -> None:
        """Atomic per-round state (``arrays=None`` keeps the saved model and updates the history only)."""
        path = state_path(self.state_dir)
        previous = checkpoint.load(path) if path.exists() and arrays is None else None
        model = previous["model"] if previous else record_to_state(arrays)
        checkpoint.save({"round": rnd, "model": model, "history": self.history}, path)


def _reason(text: str) -> str:
    """The last line of a client's error (Ray and the SuperNode wrap it in tracebacks and colour codes)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(text)).splitlines() if line.strip()]
    return (lines[-1] if lines else "no reason given")[-300:]


def _client_row(metrics: MetricRecord) -> dict[str, Any]:
    return {k.replace("-", "_"): metrics[k] for k in CLIENT_KEYS if k in metrics}
