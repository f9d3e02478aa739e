"""FedAvg whose aggregation is plaintext or CKKS ciphertext addition, with refusals, a quorum and round state.

Per round: sample the cohort (seeded; Poisson at rate ``fraction_train`` under client-level DP, charged to the
client-level ledger first, else a fixed ``max(fraction_train N, min_clients)``), tell the clients its size,
screen the replies, release only a quorum (and, under client-level DP, enough noise shares), aggregate with
the configured defence on plaintext (``robust_aggregation.aggregate`` over ``local - global``) or by
ciphertext addition under CKKS (only ``fedavg``; ``norm_bound`` is then the clients' own clip), and persist.
Under client-level DP what is persisted or handed on about a round names no client (``cohorts.public_row``).

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aisec_train.crypto.ckks import (
    EncryptedUpdate,
    InvalidCiphertextError,
    aggregate,
    check_upload,
    load_public_context,
)
from aisec_train.crypto.rotation import epoch_of, is_tagged, key_id_of, load_epoch_public, tag, untag
from aisec_train.errors import ConfigError
from aisec_train.federated import robust_aggregation
from aisec_train.federated.client_dp import poisson_sample
from aisec_train.federated.client_level import EXTRA, EXTRA_KEYS, ClientDPPlan, ClientLedger, tolerance
from aisec_train.federated.cohorts import public_row
from aisec_train.federated.task import REFUSAL_CODES, check_update, flatten, unflatten
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


def ckks_record(update: EncryptedUpdate | bytes) -> ArrayRecord:
    """Serialized ciphertexts (tagged with their key id under rotation) as one ``Array``."""
    data = update.to_bytes() if isinstance(update, EncryptedUpdate) else bytes(update)
    return ArrayRecord({CKKS_KEY: Array(dtype="bytes", shape=(len(data),), stype=CKKS_KEY, data=data)})


def ckks_payload(record: ArrayRecord) -> bytes | None:
    """The serialized ciphertexts in ``record``, or None when it holds plaintext weights."""
    return bytes(record[CKKS_KEY].data) if CKKS_KEY in record else None


def example_caps(train_parts, test_parts) -> dict[int, tuple[int, int]]:
    """partition id -> (training, test) examples: the most a client can honestly claim (its shards' sizes)."""
    return {pid: (len(train), len(test)) for pid, (train, test) in enumerate(zip(train_parts, test_parts, strict=True))}


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / "state.pt"


def record_to_state(arrays: ArrayRecord) -> dict[str, Any]:
    payload = ckks_payload(arrays)
    if payload is not None:
        return {"kind": CKKS_KEY, "data": payload}
    return {"kind": "plaintext", "tensors": {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}}


def state_to_record(state: dict[str, Any]) -> ArrayRecord:
    if state["kind"] == CKKS_KEY:
        return ckks_record(state["data"])
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


def partition_map(grid: Grid, timeout_s: float) -> dict[int, int]:
    """node id -> partition id, asked once of every connected node (one QUERY message each).

    Flower gives nodes random ids in every run (simulation and deployment alike), so a seeded draw over sorted
    node ids would pick different clients each time; the strategy samples over partition ids instead.
    """
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    return {m.metadata.src_node_id: _partition_id(m) for m in replies if not m.has_error()}


class SecureFedAvg(FedAvg):
    """FedAvg over a sampled cohort; ``ckks`` adds ciphertexts only, ``plaintext`` checks each update first."""

    def __init__(
        self,
        *,
        aggregation: str,
        min_clients: int,
        max_update_norm: float,
        state_dir: Path,
        public_context: str = "",
        public_sha256: str = "",
        public_root: str = "",
        rotate_every: int = 0,
        evaluate: bool = True,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        dp: ClientDPPlan | None = None,
        secret_sampling: bool = False,
        defence: dict[str, Any] | None = None,
        example_caps: dict[int, tuple[int, int]] | None = None,
        round_offset: int = 0,
        history: list[dict[str, Any]] | None = None,
        on_round: Callable[[dict[str, Any], float | None, float], None] | None = None,
        faulty: Callable[[int], frozenset[int]] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate if evaluate else 0.0,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients if evaluate else 0,
            min_available_nodes=min_clients,
        )
        self.aggregation, self.min_clients, self.max_update_norm = aggregation, min_clients, max_update_norm
        self.state_dir, self.round_offset, self.seed = Path(state_dir), round_offset, seed
        # The server's context: parameters only. load_public_context refuses one that holds a secret key.
        self.public_ctx = load_public_context(Path(public_context), public_sha256 or None) if public_context else None
        self.public_root, self.rotate_every = public_root, rotate_every
        if aggregation == CKKS_KEY and self.public_ctx is None and not public_root:
            raise ValueError("ckks aggregation needs the public context path")
        self.dp = dp
        # Under client-level DP the accountant's amplification assumes nobody can predict the cohort: the run's
        # server draws it from OS entropy (secret_sampling); seeded only for replayable experiments.
        self.secret_sampling = secret_sampling and dp is not None
        self.ledger = ClientLedger(self.state_dir, dp) if dp else None
        self.defence = {"name": "fedavg", **(defence or {})}
        # A claimed count weighs a reply (FedAvg, norm_bound, the test accuracy): without a cap one client claiming
        # 10^15 examples takes the whole step, or zeroes a CKKS aggregate. None: counts are checked for >= 1 only.
        self.example_caps = example_caps
        self.history = history or []
        # Called as each round completes with (history row, client-level epsilon or None, round seconds): the
        # simulation's job process logs it to the experiment trackers then, not at the federation's end.
        self.on_round = on_round
        # The clients the fault drills corrupt in a round (task.faulty_clients): under client-level DP the saved
        # rows name nobody, so the checklist's tally of such updates accepted is taken here, from the ids in memory.
        self.faulty = faulty or (lambda rnd: frozenset())
        self._global: ArrayRecord | None = None
        self._sampled: dict[int, int] = {}  # round -> number of clients asked
        self._started: dict[int, float] = {}  # round -> when its training messages were configured
        self.partitions: dict[int, int] = {}  # node id -> partition id (partition_map), for reproducible samples

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = server_round + self.round_offset
        self._global, self._started[rnd] = arrays, time.perf_counter()
        nodes = self._ordered_nodes(grid)
        rng = np.random.default_rng() if self.secret_sampling else np.random.default_rng([self.seed, rnd])
        if self.ledger is not None:
            if not self.ledger.fits_one_more():
                log.warning("round %d not started: the client-level privacy budget is spent", rnd)
                self._sampled[rnd] = 0
                return []
            chosen = poisson_sample(nodes, self.fraction_train, rng)
            self.ledger.charge(rnd)  # every configured round is charged, whatever happens to it
        else:
            size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_clients))
            # Positions, not ids: node ids are uint64 and numpy would round them through float64.
            chosen = [nodes[i] for i in sorted(rng.choice(len(nodes), size, replace=False))]
        self._sampled[rnd] = len(chosen)
        config = ConfigRecord({**config, "server-round": rnd, "cohort": len(chosen)})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Flower's FedAvg draws evaluators with ``random.sample``; here a seeded draw over partitions."""
        rnd = server_round + self.round_offset
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._ordered_nodes(grid)
        size = min(len(nodes), max(int(len(nodes) * self.fraction_evaluate), self.min_evaluate_nodes))
        rng = np.random.default_rng([self.seed, rnd, 1])
        chosen = [nodes[i] for i in sorted(rng.choice(len(nodes), size, replace=False))]
        config = ConfigRecord({**config, "server-round": rnd})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.EVALUATE)

    def _ordered_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes in partition order (nodes that did not say theirs last, by id): the seeded draws pick
        positions in this list, so a run with the same seed trains and evaluates the same clients."""
        known = self.partitions
        return sorted(grid.get_node_ids(), key=lambda n: (known.get(n, len(known) + n), n))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # 1. Who answered: missing replies are clients that crashed or passed the round timeout.
        rnd = server_round + self.round_offset
        replies = list(replies)
        # In client order, not arrival order: float sums depend on their order, and a run is replayable by its seed.
        answered = sorted((m for m in replies if not m.has_error()), key=_partition_id)
        row: dict[str, Any] = {"round": rnd, "sampled": self._sampled.get(rnd, len(replies))}
        row["dropped"] = row["sampled"] - len(answered)
        row["errors"] = [_reason(m.error.reason) for m in replies if m.has_error()]
        # 2. Refusals: the clients' own (before encryption) and, on plaintext, the server's check.
        accepted, row["refused"], norms = self._screen(answered, rnd)
        # upload_bytes as received, not as claimed: the report's bytes per parameter is measured on it
        received = [(m.content["metrics"], _nbytes(m)) for m in answered if "metrics" in m.content]
        row["clients"] = [{**_client_row(metrics), "upload_bytes": size} for metrics, size in received]
        row["accepted"] = sorted(int(m.content["metrics"]["partition-id"]) for m in accepted)
        if norms:
            row["update_norms"] = norms  # plaintext only: what the server measured
        # 3. Aggregate a quorum (and, under client-level DP, enough noise shares), or keep the global model.
        arrays, row["failed"] = None, self._release_refused(len(accepted), row["sampled"])
        if not row["failed"]:
            started = time.perf_counter()
            try:
                arrays = self._aggregate(accepted, rnd)
            except ConfigError as err:  # a defence that cannot tolerate its attackers among this few updates
                row["failed"] = str(err)
            except InvalidCiphertextError as err:  # screened one by one above; a sum that still fails keeps the model
                row["failed"] = f"the encrypted updates could not be added: {err}"
            if arrays is not None and ckks_payload(arrays) is None and not _finite(arrays):
                arrays, row["failed"] = None, "the aggregate holds NaN or inf (never released)"
            row["aggregate_s"] = time.perf_counter() - started
        if row["failed"]:
            log.warning("round %d failed: %s; the global model is kept", rnd, row["failed"])
        row["train_round_s"] = time.perf_counter() - self._started.get(rnd, time.perf_counter())
        self.history.append(row)
        # 4. Persist the round before anything else can fail: a resumed run continues after it.
        self._save(arrays if arrays is not None else self._global, rnd)
        summary = {"accepted": len(accepted), "dropped": row["dropped"], "refused": len(row["refused"])}
        return arrays, MetricRecord(summary)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower calls this every round, evaluators or none, after training: the round is complete here."""
        rnd = server_round + self.round_offset
        metrics = self._evaluate(rnd, replies)
        if self.on_round is not None:
            row = self._released(next(h for h in reversed(self.history) if h["round"] == rnd))
            epsilon = self.ledger.ledger.epsilon() if self.ledger is not None else None
            self.on_round(row, epsilon, time.perf_counter() - self._started.get(rnd, time.perf_counter()))
        return metrics

    def _evaluate(self, rnd: int, replies: Iterable[Message]) -> MetricRecord | None:
        # A peer's metrics are input: a reply without a count in [1, ...) or an accuracy in [0, 1] is left out.
        rows = [r for m in replies if not m.has_error() and (r := self._evaluation(m)) is not None]
        total = sum(int(r["num-examples"]) for r in rows)
        if not rows or total == 0:
            return None
        acc = sum(float(r["accuracy"]) * int(r["num-examples"]) for r in rows) / total
        row = next(h for h in reversed(self.history) if h["round"] == rnd)
        row["test_accuracy"], row["evaluated_examples"] = acc, total
        row["evaluated_clients"] = len(rows)
        row["decrypt_s"] = [float(r.get("decrypt-s", 0.0)) for r in rows]
        row["round_s"] = time.perf_counter() - self._started.get(rnd, time.perf_counter())
        self._save(None, rnd)
        return MetricRecord({"accuracy": acc, "num-examples": total})

    # -- helpers -------------------------------------------------------------------------------------------
    def _release_refused(self, accepted: int, sampled: int) -> str | None:
        if accepted < self.min_clients:
            return f"{accepted} usable update(s) < federated.min_clients={self.min_clients}"
        needed = sampled - tolerance(self.dp, sampled) if self.dp is not None else 0
        if accepted < needed:
            return (
                f"{accepted} noise share(s) of {sampled} sampled, fewer than the {needed} needed "
                "(federated.client_dp.dropout_tolerance): the sum would carry less noise than accounted"
            )
        return None

    def _screen(self, answered: list[Message], rnd: int) -> tuple[list[Message], list[dict[str, Any]], dict]:
        """Split answered clients into usable updates and refusals (theirs, or the server's).

        A reply is a peer's input (a SuperNode may be malicious): metrics that are missing, of the wrong type, a
        partition id other than the node's, a count below 1, or arrays of another shape are refused as
        ``malformed`` one reply at a time, instead of crashing the round (and the run) or weighing by a negative
        count."""
        accepted, refused, norms = [], [], {}
        plaintext = self.aggregation != CKKS_KEY
        template = self._global.to_torch_state_dict() if plaintext else None
        base = flatten(template) if plaintext else None
        # Client-level DP: each reply carries a noise share of norm ~ z C sqrt(params / k), so only NaN is refused.
        bound = np.inf if self.dp is not None else self.max_update_norm
        claims = [self._claimed(msg) for msg in answered]
        # Two replies naming one partition: the server cannot tell which one holds it, so neither counts (one would
        # be reported, weighed and capped as the other).
        twice = {pid for pid, _ in claims if pid is not None and sum(p == pid for p, _ in claims) > 1}
        for msg, (pid, code) in zip(answered, claims, strict=True):
            if code is None or pid in twice:
                reason = "malformed"
            elif code:
                refused.append({"client": pid, "reason": REASONS[code], "by": "client"})
                continue
            elif not self._count_ok(pid, msg.content["metrics"]["num-examples"]):
                reason = "count"
            elif plaintext and not self._plain_shape_ok(msg, template):
                reason = "malformed"
            elif plaintext:
                flat = flatten(_arrays(msg).to_torch_state_dict())
                delta = flat[: base.size] - base
                norms[str(pid)] = float(np.linalg.norm(delta)) if np.isfinite(delta).all() else None
                # the DP extras (count share, C) are released with the weights: a NaN there is a NaN model too
                reason = check_update(delta, bound) or (None if np.isfinite(flat).all() else "nan")
            else:
                reason = self._key_check(msg, rnd) or self._ckks_check(msg, rnd)
            if reason:
                who = "an" if self.dp is not None else f"client {pid}'s"  # dp=client: the log names no cohort member
                log.warning("round %d: the server refused %s update (%s)", rnd, who, reason)
                refused.append({"client": pid, "reason": reason, "by": "server"})
                continue
            accepted.append(msg)
        return accepted, refused, norms

    def _claimed(self, msg: Message) -> tuple[int | None, int | None]:
        """The reply's partition id and refusal code; code None when the metrics are malformed."""
        try:
            metrics = msg.content["metrics"]
            pid, code, n = (metrics[k] for k in ("partition-id", "refused", "num-examples"))
        except (KeyError, TypeError):
            return self.partitions.get(msg.metadata.src_node_id), None
        known = self.partitions.get(msg.metadata.src_node_id)
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, code, n))
        if not ints or (known is not None and pid != known) or (code != 0 and code not in REASONS):
            return known if known is not None else (pid if isinstance(pid, int) else None), None
        if code == 0 and n < 1:  # a count of 0 divides FedAvg by zero, a negative one flips its step
            return pid, None
        return pid, code

    def _count_ok(self, pid: int, n: int) -> bool:
        """More examples than the partition holds bid for the whole weighted step; under dp=client every share
        counts once (weight 1: under CKKS the headers' weights are the divisor, and a weight of 300 shrank the
        released model 300-fold)."""
        return n == 1 if self.dp is not None else self._within_cap(pid, n, 0)

    def _within_cap(self, pid: int, n: int, split: int) -> bool:
        """Whether ``n`` examples fit partition ``pid``'s training (split 0) or test (1) shard; no caps: any."""
        if self.example_caps is None:
            return True
        return isinstance(pid, int) and pid in self.example_caps and n <= self.example_caps[pid][split]

    def _evaluation(self, msg: Message) -> MetricRecord | None:
        """An evaluator's metrics, if they hold a count within its test shard and an accuracy in [0, 1]."""
        metrics = _evaluation(msg)
        if metrics is None:
            return None
        pid = self.partitions.get(msg.metadata.src_node_id, metrics.get("partition-id"))
        return metrics if self._within_cap(pid, int(metrics["num-examples"]), 1) else None

    def _plain_shape_ok(self, msg: Message, template: dict[str, Any]) -> bool:
        """A plaintext reply holds the global model's tensors, in its shapes and dtypes (and, under client-level DP,
        the two one-value float64 extras), nothing else. The declared shapes are checked before any bytes are read,
        and a load that fails is a refusal: numpy allocates whatever an array's own header claims (745 GiB raised
        MemoryError out of the round)."""
        record = _arrays(msg)
        want = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in template.items()}
        if self.dp is not None:
            want.update({k: ((1,), "float64") for k in EXTRA_KEYS})
        if record is None or list(record) != list(want):
            return False
        if any((tuple(a.shape), a.dtype) != want[k] for k, a in record.items()):
            return False
        try:
            state = record.to_torch_state_dict()
        except (KeyError, TypeError, ValueError, RuntimeError, MemoryError):
            return False
        return all((tuple(v.shape), str(v.dtype).removeprefix("torch.")) == want[k] for k, v in state.items())

    def _expected_length(self, rnd: int) -> int | None:
        """Values in this round's uploads: the global model's (plaintext in round 1, else the aggregate's), plus
        the DP extras on top of a plaintext initial model."""
        payload = ckks_payload(self._global)
        if payload is None:
            n = sum(v.numel() for v in self._global.to_torch_state_dict().values())
            return n + (EXTRA if self.dp is not None else 0) if n else None  # no model to measure: any one length
        try:
            agg = untag(payload, key_id_of(payload)) if is_tagged(payload) else EncryptedUpdate.from_bytes(payload)
        except InvalidCiphertextError:
            return None
        return agg.length

    def _ckks_check(self, msg: Message, rnd: int) -> str | None:
        """An upload that is not well-formed ciphertext of this round's context and the model's length."""
        ctx, key_id = self._round_key(rnd)
        payload = _upload(msg)
        if payload is None:
            return "malformed"
        try:
            update = untag(payload, key_id) if key_id is not None else EncryptedUpdate.from_bytes(payload)
            check_upload(update, ctx, self._expected_length(rnd) or update.length)
        except InvalidCiphertextError:
            return "malformed"
        # The header's weight is what the sum divides by: it must be the count the client claims (and _claimed
        # capped), or one header of 10^15 would shrink everyone's model towards zero.
        return None if update.weight == msg.content["metrics"]["num-examples"] else "count"

    def _round_key(self, rnd: int):
        """This round's public context and key id (rotation), or the run's context and no id."""
        if not self.public_root:
            return self.public_ctx, None
        return load_epoch_public(Path(self.public_root), epoch_of(rnd, self.rotate_every))

    def _key_check(self, msg: Message, rnd: int) -> str | None:
        """Under rotation, an upload under another epoch's key (stale or foreign) is refused, not summed."""
        _, key_id = self._round_key(rnd)
        payload = _upload(msg)
        if key_id is None or payload is None:  # no ciphertext at all: _ckks_check refuses it as malformed
            return None
        try:
            untag(payload, key_id)
        except InvalidCiphertextError:
            return "key"
        return None

    def _aggregate(self, accepted: list[Message], rnd: int) -> ArrayRecord:
        if self.aggregation == CKKS_KEY:
            ctx, key_id = self._round_key(rnd)
            payloads = [ckks_payload(m.content["arrays"]) for m in accepted]
            try:
                if key_id is None:
                    return ckks_record(aggregate(payloads, ctx))
                return ckks_record(tag(aggregate([untag(p, key_id) for p in payloads], ctx), key_id))
            except InvalidCiphertextError as err:
                raise InvalidCiphertextError(f"an encrypted update was malformed: {err}") from err
        template = self._global.to_torch_state_dict()
        if self.dp is not None:  # DP-FedAvg: every share counts once; the extras (count, C) are averaged too
            states = [m.content["arrays"].to_torch_state_dict() for m in accepted]
            mean = {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}
            # the model's own dtypes (float64 extras), not whichever dtype the first reply chose
            dtypes = {k: template[k].dtype if k in template else torch.float64 for k in mean}
            return ArrayRecord({k: v.to(dtypes[k]) for k, v in mean.items()})
        base = flatten(template)
        deltas = [_weights(m, base.size) - base for m in accepted]
        weights = [float(m.content["metrics"]["num-examples"]) for m in accepted]
        d = self.defence
        step = robust_aggregation.aggregate(
            d["name"], deltas, weights, num_malicious=d.get("num_malicious", 0),
            trim_fraction=d.get("trim_fraction", 0.2), norm_bound=d.get("norm_bound"),
            krum_select=min(d.get("krum_select", 1), len(deltas)),
        )  # fmt: skip
        return ArrayRecord(unflatten(base + step, template))

    def _released(self, row: dict[str, Any]) -> dict[str, Any]:
        """A history row as it leaves this object: under client-level DP its counts only (cohorts.py), the ids
        and per-client figures staying in this process's memory; otherwise the full row."""
        return public_row(row, self.faulty(row["round"])) if self.dp is not None else row

    def _save(self, arrays: ArrayRecord | None, rnd: int) -> None:
        """Atomic per-round state (``arrays=None`` keeps the saved model and updates the history only). Under
        client-level DP the saved history names no client: data owners are handed this file (docs/federated.md)."""
        path = state_path(self.state_dir)
        previous = checkpoint.load(path) if path.exists() and arrays is None else None
        model = previous["model"] if previous else record_to_state(arrays)
        history = [self._released(row) for row in self.history]
        checkpoint.save({"round": rnd, "model": model, "history": history}, path)


def _weights(msg: Message, n: int) -> np.ndarray:
    """A plaintext reply's model weights, flat (a DP contribution's extras are not weights)."""
    return flatten(msg.content["arrays"].to_torch_state_dict())[:n]


def _arrays(msg: Message) -> ArrayRecord | None:
    """A reply's ``arrays``, if it has them as an ArrayRecord (a peer may send none, or a record of another type)."""
    record = msg.content["arrays"] if "arrays" in msg.content else None
    return record if isinstance(record, ArrayRecord) else None


def _upload(msg: Message) -> bytes | None:
    """A CKKS reply's serialized ciphertexts; None for no arrays or plaintext ones."""
    record = _arrays(msg)
    return ckks_payload(record) if record is not None else None


def _nbytes(msg: Message) -> int:
    record = _arrays(msg)
    return sum(len(a.data) for a in record.values()) if record is not None else 0


def _finite(arrays: ArrayRecord) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in arrays.to_torch_state_dict().values())


def _reason(text: str) -> str:
    """The last line of a client's error (Ray and the SuperNode wrap it in tracebacks and colour codes)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(text)).splitlines() if line.strip()]
    return (lines[-1] if lines else "no reason given")[-300:]


def _client_row(metrics: MetricRecord) -> dict[str, Any]:
    """The report's view of a reply's metrics: numbers only (a peer's lists or strings would bloat the state)."""
    ok = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    return {k.replace("-", "_"): metrics[k] for k in CLIENT_KEYS if k in metrics and ok(metrics[k])}


def _partition_id(msg: Message) -> int:
    """The partition a reply names, for ordering (a malformed one sorts last; the screen refuses it)."""
    try:
        pid = msg.content["metrics"]["partition-id"]
    except (KeyError, TypeError):
        return 2**62
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else 2**62


def _evaluation(msg: Message) -> MetricRecord | None:
    """An evaluator's metrics, if they hold a count >= 1 and an accuracy in [0, 1]."""
    try:
        metrics = msg.content["metrics"]
        n, acc = metrics["num-examples"], metrics["accuracy"]
    except (KeyError, TypeError):
        return None
    ok = isinstance(n, int) and not isinstance(n, bool) and n >= 1 and isinstance(acc, int | float) and 0 <= acc <= 1
    return metrics if ok else None
