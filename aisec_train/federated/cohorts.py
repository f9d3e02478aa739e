"""What a round's record may say about its cohort under client-level DP: counts, never who.

DP-FedAvg's epsilon counts on amplification by sampling: nobody outside the server may know whether a client was in
a round's Poisson cohort. The server needs the ids while the round runs (screening replies, the drill tally), so
``SecureFedAvg`` keeps its full rows in memory only; what it saves (``federated/server/state.pt``, which data owners
are handed to decrypt the last aggregate) and everything the report, the trackers and the logs take from it is
``public_row``: how many clients were sampled, accepted, dropped and refused (with the refusals' reasons), the
uploads' total size, and means of data-independent timings. No client id, no per-client figure (norm, loss, example
count, training time, error text) and no list whose order or length per client could name one. Without client-level
DP nothing is promised about cohorts and the rows keep every client's detail.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

# What privacy.not_covered still lists under client-level DP (privacy/report.py writes it): the cohorts' members are in
# no file the run releases, but the clients' own state folders and logs can name them, and the counts are functions of
# the draw. Flower's log of a client's crash in simulation names none (aisec_train/quiet.py).
NOT_COVERED = (
    "which clients each round's Poisson cohort drew is in no released file (federated.per_round, "
    "federated/server/state.pt, metrics.csv, the trackers, the logs and the checklist give counts only), but "
    "client_state/client_<id>/state.pt, each client's own ledger (written once it trained, counting its rounds), "
    "names them: in simulation every client's sits in the run folder, like client_keys/, and is not for release; "
    "the clients' own logs (Ray's worker logs, a SuperNode's) can name them too (in simulation the run's console "
    "and cli.log say a client failed and its exception's type, never which client); "
    "the per-round counts (sampled, accepted, dropped, refused) depend on the draw and the accountant does not charge "
    "them (it charges the released models)"
)

# Round-level figures that name no client: the sampled count is what the server tells every sampled client, the
# evaluators are a seeded draw over all clients (not the cohort), the timings are the server's own.
ROUND_KEYS = (
    "round", "sampled", "dropped", "failed", "aggregate_s", "train_round_s", "test_accuracy", "evaluated_examples",
    "evaluated_clients", "decrypt_s", "round_s",
)  # fmt: skip


def is_public(row: dict[str, Any]) -> bool:
    """Whether ``row`` is already a client-level DP run's public record (counts, no ids)."""
    return isinstance(row.get("accepted"), int)


def count(value: Any) -> int:
    """How many clients a row's ``accepted`` or ``refused`` holds: a count, or the length of the id list."""
    return value if isinstance(value, int) else len(value)


def public_row(row: dict[str, Any], faulty: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The counts of a round's full row (idempotent). ``faulty``: the clients the fault drills corrupted in this
    round (``task.faulty_clients``), tallied here, where the ids still are, for the checklist."""
    if is_public(row):
        return row
    sent = [c for c in row.get("clients", []) if c.get("upload_bytes")]
    out = {k: row[k] for k in ROUND_KEYS if k in row}
    out.update(
        accepted=len(row["accepted"]),
        refused=len(row["refused"]),
        refused_reasons=dict(Counter(f"{x.get('reason')} (by {x.get('by')})" for x in row["refused"])),
        faulty_accepted=len(faulty & set(row["accepted"])),
        uploads=len(sent),
        upload_bytes=sum(int(c["upload_bytes"]) for c in sent),
        encrypt_s=_mean([c.get("encrypt_s") for c in sent]),
        client_decrypt_s=_mean([c.get("decrypt_s") for c in row.get("clients", [])]),
    )
    return out


def upload_sizes(row: dict[str, Any]) -> list[float]:
    """One size per upload the server received: a full row's per client, a public row's mean per upload (the
    figures built on them, sums and means and their linear maps, come out the same)."""
    if is_public(row):
        n = row.get("uploads", 0)
        return [row["upload_bytes"] / n] * n if n else []
    return list(row["upload_bytes_per_client"].values())


def _mean(values: list[Any]) -> float | None:
    values = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(values) / len(values) if values else None
