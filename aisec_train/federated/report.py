"""The federated run's report section, its record-level privacy figures (privacy/report.py writes them), the
accuracy-per-round plot and checklist answers."""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from aisec_train.config import Config
from aisec_train.crypto import ckks
from aisec_train.data.dataset import DataBundle
from aisec_train.federated.cohorts import count, is_public, public_row, upload_sizes
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.federated.task import faulty_clients
from aisec_train.privacy import claims
from aisec_train.privacy.randomness import describe as describe_randomness
from aisec_train.privacy.report import FIGURES, Measured
from aisec_train.store.files import safe_open_for_write

PLOT = "federated_accuracy.png"


@dataclass(frozen=True)
class ReportInputs:
    """What the federated report items (here and in report_scale.py) read: the config, the final model, the run
    folder (the plot), the local objective's name, the data, and ``report``, the federated trainer's own Report,
    whose sections and answers its TrainResult carries to the train stage."""

    cfg: Config
    report: Any  # report/report.py's Report (the trainer's own, not the run's)
    run_dir: Path
    model: nn.Module
    objective: str
    data: DataBundle


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def history_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round in the spine's history shape (``epoch`` = round) for metrics.csv and the curve."""
    rows = []
    for r in rounds:
        # The figures of the updates that were aggregated: not a client's own refusal, nor one the server refused (a
        # peer's metrics are its claims: a malicious one's loss of 1e9 or accuracy of 55 would be the curve).
        # A client-level DP row has no per-client figures (its clients send none: loss and accuracy are NaN).
        by_server = {x.get("client") for x in r["refused"] if x.get("by") == "server"} if not is_public(r) else set()
        clients = [c for c in r.get("clients", []) if not c.get("refused") and c.get("partition_id") not in by_server]
        accuracies = [a for c in clients if (a := c.get("train_accuracy")) is not None and 0 <= a <= 1]
        loss, acc = _mean([c.get("train_loss") for c in clients]), _mean(accuracies)
        rows.append(
            {
                "epoch": r["round"],
                "loss": math.nan if loss is None else loss,
                "train_accuracy": math.nan if acc is None else acc,
                "test_accuracy": r.get("test_accuracy", math.nan),
                "epsilon": max([c.get("epsilon", 0.0) for c in r.get("clients", [])], default=0.0),
            }
        )
    return rows


def round_metrics(row: dict[str, Any], epsilon: float | None, seconds: float) -> dict[str, float]:
    """A completed round as the trackers log it live (axis ``round``): the history row's loss, accuracies and
    epsilon (``epsilon`` replaces the clients' record-level one under client-level DP), the cohort, and the round's
    wall time. NaN (a round nobody evaluated) is left out by the tracker."""
    values = {k: v for k, v in history_rows([row])[0].items() if k != "epoch"}
    if epsilon is not None:
        values["epsilon"] = epsilon
    values.update(sampled=row["sampled"], accepted=count(row["accepted"]), dropped=row["dropped"],
                  refused=count(row["refused"]), failed=float(bool(row["failed"])), round_s=seconds)  # fmt: skip
    return values


def plot_accuracy(rounds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r.get("test_accuracy", math.nan) for r in rounds], "o-", label="global model, test split")
    failed = [r["round"] for r in rounds if r["failed"]]
    if failed:
        ax.scatter(failed, [0.0] * len(failed), marker="x", color="red", label="failed round (model kept)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks(xs)
    ax.set_title("federated accuracy per round")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with safe_open_for_write(path, root=path.parent) as fh:  # atomic, never through a symlink
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def _decrypt_s(rounds: list[dict[str, Any]], i: int) -> float | None:
    """Decryption time of round i's aggregate: at evaluation, else at the start of the next round's training."""
    measured = _mean(rounds[i].get("decrypt_s", []))
    if measured or i + 1 >= len(rounds):
        return measured
    following = rounds[i + 1]
    if is_public(following):
        return following.get("client_decrypt_s")
    return _mean([c.get("decrypt_s") for c in following["clients"]])


def per_round(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's per-round table. A client-level DP run's saved rows hold counts only (cohorts.py), and so does
    its table: how many clients were sampled, accepted, dropped and refused, never which, nor per-client figures."""
    out = []
    for i, r in enumerate(rounds):
        if is_public(r):
            out.append(_public_round(r, _decrypt_s(rounds, i)))
            continue
        sent = [c for c in r["clients"] if c.get("upload_bytes")]
        out.append(
            {
                "round": r["round"],
                "sampled": r.get("sampled"),
                "evaluated_clients": r.get("evaluated_clients"),
                "test_accuracy": r.get("test_accuracy"),
                "accepted": r["accepted"],
                "dropped": r["dropped"],
                "errors": r.get("errors", []),
                "refused": r["refused"],
                "failed": r["failed"],
                "upload_bytes_per_client": {str(c["partition_id"]): c["upload_bytes"] for c in sent},
                "encrypt_s": _mean([c.get("encrypt_s") for c in sent]),
                "aggregate_s": r.get("aggregate_s"),
                "decrypt_s": _decrypt_s(rounds, i),
                "train_round_s": r.get("train_round_s"),
                "round_s": r.get("round_s"),
                "train_s_per_client": {str(c["partition_id"]): c.get("train_s") for c in r["clients"]},
                "examples_per_client": {str(c["partition_id"]): c.get("num_examples") for c in r["clients"]},
                "update_norms": r.get("update_norms"),  # plaintext: measured by the server
            }
        )
    return out


def _public_round(r: dict[str, Any], decrypt_s: float | None) -> dict[str, Any]:
    keys = ("round", "sampled", "evaluated_clients", "test_accuracy", "accepted", "dropped", "refused",
            "refused_reasons", "failed", "uploads", "upload_bytes", "encrypt_s", "aggregate_s")  # fmt: skip
    row = {k: r.get(k) for k in keys}
    row.update(decrypt_s=decrypt_s, train_round_s=r.get("train_round_s"), round_s=r.get("round_s"),
               faulty_accepted=r.get("faulty_accepted", 0))  # fmt: skip
    return row


def add(
    run: ReportInputs,
    state: dict[str, Any],
    eps: dict[int, dict[str, Any]],
    *,
    resumed_from: int,
    seconds: float,
    private: bool,
    server: ServerSettings,
    client: ClientSettings,
    transport: str,
    client_level: bool = False,
) -> Measured | None:
    """Add the ``federated`` section and the confidentiality checklist answers; return the record-level privacy
    figures (None without record-level DP: client-level DP is report_scale.py's) for privacy/report.py."""
    cfg, report = run.cfg, run.report
    fed, rounds = cfg.federated, state["history"]
    if client_level:  # counts only, whatever wrote the rows (a state saved before the strategy released counts)
        rounds = [public_row(r, faulty_clients(fed.inject, r["round"])) for r in rounds]
    num_params = sum(p.numel() for p in run.model.state_dict().values())
    rows = per_round(rounds)
    uploads = [b for row in rows for b in upload_sizes(row)]
    bytes_per_param = sum(uploads) / len(uploads) / num_params if uploads else None
    plot_accuracy(rounds, run.run_dir / PLOT)
    ckks_section = None
    if fed.aggregation.value == "ckks":
        ckks_section = {**vars(fed.ckks), "self_test": _self_test(server, client, num_params)}
    report.add(
        "federated",
        aggregation=fed.aggregation.value,
        engine=fed.engine.value,
        transport=transport,
        rounds=state["round"],
        rounds_planned=fed.rounds,
        clients=fed.clients,
        min_clients=fed.min_clients,
        local_epochs=fed.local_epochs,
        local_objective=run.objective,  # what every client's loop trained on (standard, pgd_at, trades, ...)
        num_params=num_params,
        bytes_per_param=bytes_per_param,
        **_uploads_per_round(rows, client_level),
        encrypt_s_per_round=[row["encrypt_s"] for row in rows],
        aggregate_s_per_round=[row["aggregate_s"] for row in rows],
        decrypt_s_per_round=[row["decrypt_s"] for row in rows],
        train_round_s_per_round=[row["train_round_s"] for row in rows],
        dropped_clients=[
            {"round": row["round"], "count": row["dropped"], **({} if is_public(row) else {"errors": row["errors"]})}
            for row in rows
            if row["dropped"]
        ],
        refused_updates=_refused(rows),
        failed_rounds=[{"round": row["round"], "reason": row["failed"]} for row in rows if row["failed"]],
        accuracy_per_round=[row["test_accuracy"] for row in rows],
        accuracy_plot=PLOT,
        resumed_from_round=resumed_from,
        seconds=seconds,
        per_round=rows,
        ckks=ckks_section,
    )
    _checklist(run, rows, server, client, bytes_per_param, transport)
    return None if client_level else _measured(run, eps, private)  # report_scale.py measures client-level DP


def _uploads_per_round(rows: list[dict[str, Any]], client_level: bool) -> dict[str, Any]:
    """Upload sizes per round: by client id, or under client-level DP the mean upload (ids would name the cohort)."""
    if client_level:
        return {"upload_bytes_mean_per_round": [_mean(upload_sizes(row)) for row in rows]}
    return {"upload_bytes_per_client_per_round": [row["upload_bytes_per_client"] for row in rows]}


def _refused(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each refusal with its client, or under client-level DP each round's count by reason."""
    out = []
    for row in rows:
        if is_public(row):
            if row["refused"]:
                out.append({"round": row["round"], "count": row["refused"], "reasons": row["refused_reasons"]})
        else:
            out.extend(dict(x, round=row["round"]) for x in row["refused"])
    return out


def current_keys(server: ServerSettings, client: ClientSettings) -> tuple[ServerSettings, ClientSettings]:
    """The settings naming one key pair: the run's, or under rotation the last epoch's (the others are retired)."""
    if not client.secret_root:
        return server, client
    folder = max(p.parent for p in Path(client.secret_root).glob(f"epoch_*/{ckks.SECRET_FILE}"))
    secret, public = folder / ckks.SECRET_FILE, Path(server.public_root) / folder.name / ckks.PUBLIC_FILE
    digest = lambda p: p.with_name(p.name + ".sha256").read_text().strip()  # noqa: E731
    return (
        replace(server, public_context=str(public), public_sha256=digest(public)),
        replace(client, secret_context=str(secret), secret_sha256=digest(secret)),
    )


def _self_test(server: ServerSettings, client: ClientSettings, num_params: int) -> dict[str, Any]:
    """Aggregation error of this run's keys against plaintext FedAvg, measured on a model-sized update."""
    server, client = current_keys(server, client)
    secret = ckks.load_secret_context(Path(client.secret_context), client.secret_sha256 or None)
    public = ckks.load_public_context(Path(server.public_context), server.public_sha256 or None)
    return {**ckks.self_test(secret, public, n_values=num_params), "public_context_is_private": public.is_private()}


def _measured(run, eps: dict[int, dict[str, Any]], private: bool) -> Measured | None:
    """Record-level DP: each client's own DP-SGD ledger; the section's epsilon is the worst client's (None: no
    DP). privacy/report.py writes it."""
    cfg = run.cfg.privacy
    if not private or not eps:
        return None
    worst_id = max(eps, key=lambda pid: eps[pid]["epsilon"])
    worst = eps[worst_id]
    # privacy.epsilon is the max over clients: the guarantee every client's data gets.
    details = {
        # The same {"statement": ...} shape the model card reads for any run.
        "scope": {
            "unit": "client",
            "statement": f"each of the {len(eps)} federated clients trains on its own partition with its own DP-SGD "
            f"ledger; the epsilon above is the largest over clients (client {worst_id}) and bounds each client's "
            "examples in the final model, whose aggregation adds no further privacy cost",
        },
        "max_grad_norm": cfg.max_grad_norm,
        "per_client_epsilon": {str(k): v["epsilon"] for k, v in eps.items()},
        "per_client_steps": {str(k): v["steps"] for k, v in eps.items()},
        "max_epsilon_client": worst_id,
        "level": "record",
    }
    evidence = (
        f"each of {len(eps)} clients runs DP-SGD with its own ledger; max epsilon {worst['epsilon']:.3f} "
        f"(client {worst_id}, delta {worst['delta']:g}, {worst['accountant']}, {worst['steps']} steps, noise "
        f"{worst['noise_multiplier']:.3f}); per client: "
        + ", ".join(f"{k}: {v['epsilon']:.3f}" for k, v in eps.items())
        + f"; target {cfg.target_epsilon}"
    )
    return Measured(
        {k: worst[k] for k in FIGURES},
        "dpsgd",
        cfg.target_epsilon,
        evidence,
        details=details,
        randomness=describe_randomness(cfg, run.cfg.train.seed),
        gaps=claims.guarantee_gaps(cfg, len(run.data.train)),  # reproducible noise, delta >= 1/n: no guarantee
    )


def _checklist(run, rows, server: ServerSettings, client: ClientSettings, bytes_per_param, transport: str) -> None:
    report, fed = run.report, run.cfg.federated
    # What happened, not what was configured: dropped, refused and failed-round clients contributed nothing.
    aggregated = sum(1 for row in rows if not row["failed"])
    if any(is_public(row) for row in rows):  # client-level DP: how many updates, never whose (cohorts.py)
        shares = sum(count(row["accepted"]) for row in rows if not row["failed"])
        used_text = f"{shares} update(s) in all (client-level DP: which clients were sampled is not released)"
    else:
        used = sorted({c for row in rows if not row["failed"] for c in row["accepted"]})
        used_text = f"updates from {len(used)} client(s) {used}"
    report.check(
        "data pipeline",
        "training data stays in its silo (federated training)",
        "pass",
        f"{fed.clients} Flower clients ({fed.engine.value} engine) on disjoint {fed.partition.kind.value} partitions; "
        f"{aggregated} of {len(rows)} round(s) aggregated, with {used_text}; only model updates left a client",
    )
    if fed.aggregation.value == "ckks":
        _ckks_checks(run, rows, server, client, bytes_per_param)
    else:
        report.check(
            "deployment",
            "aggregation server never sees a client update (encrypted aggregation)",
            "fail",
            "federated.aggregation=plaintext: the server sees every client's weights",
        )
    secure = transport.startswith("tls")
    report.check(
        "deployment",
        "federated transport encrypted (TLS to the SuperLink)",
        "pass" if secure else ("not_applicable" if transport == "in-process" else "fail"),
        {"in-process": "simulation engine: clients and server share one process, nothing crosses a network"}.get(
            transport, f"SuperLink connection: {transport}"
        ),
    )
    refused = _refused(rows)
    # The criterion: no update of a client injected with a NaN or over-norm fault entered a round the fault fired in.
    # Under client-level DP the server tallied them (faulty_accepted) and the rows say how many, not whose.
    slipped = _slipped(fed, rows)
    what = "(round, updates)" if any(is_public(row) for row in rows) else "(round, client)"
    report.check(
        "training",
        "poisoned or corrupt client updates refused (NaN/inf, norm bound)",
        "fail" if slipped else "pass",
        (f"faulty updates ACCEPTED {what}: {slipped}; " if slipped else "")
        + f"{sum(x.get('count', 1) for x in refused)} update(s) refused"
        + "".join(
            f"; round {x['round']}: {x['count']} ({', '.join(f'{k}: {n}' for k, n in x['reasons'].items())})"
            if "count" in x
            else f"; round {x['round']} client {x['client']} ({x['reason']}, by {x['by']})"
            for x in refused
        )
        + (
            f"; every update clipped to L2 {fed.client_dp.clip_norm} by its client (dp=client), NaN/inf refused"
            if fed.dp is not None and fed.dp.value == "client"
            else f"; L2 bound {fed.max_update_norm} checked by each client before encryption"
            + (" and by the server" if fed.aggregation.value == "plaintext" else "")
        ),
    )
    dropped = sum(row["dropped"] for row in rows)
    failed = [row["round"] for row in rows if row["failed"]]
    report.check(
        "monitoring",
        "client dropouts tolerated with a quorum",
        "pass" if not failed else "fail",
        f"{dropped} client answer(s) missing over {len(rows)} round(s); quorum {fed.min_clients}; "
        f"failed rounds (global model kept): {failed or 'none'}",
    )


def _slipped(fed, rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(round, client) of each accepted update a fault drill corrupted; under client-level DP (round, how many)."""
    out = []
    for row in rows:
        if is_public(row):
            if row["faulty_accepted"]:
                out.append((row["round"], row["faulty_accepted"]))
            continue
        faulty = faulty_clients(fed.inject, row["round"])
        out.extend((row["round"], c) for c in row["accepted"] if c in faulty)
    return out


def ckks_fix(accepted: int, ok: bool) -> str | None:
    """The encrypted-aggregation item's fix on a CKKS run: the item's default (federated=fedavg_he) is what the run
    already did, so a fail says what went wrong: no round aggregated an update, or the aggregate's error."""
    if ok:
        return None
    if accepted == 0:
        return (
            "no round aggregated an update (see 'client dropouts tolerated with a quorum'): raise "
            "federated.round_timeout_s or lower federated.min_clients, and check the clients' logs"
        )
    return "report a bug: the CKKS aggregate differs from plaintext FedAvg (check federated.ckks.* parameters)"


def _ckks_checks(run, rows, server: ServerSettings, client: ClientSettings, bytes_per_param) -> None:
    report, fed = run.report, run.cfg.federated
    test = report.get("federated.ckks.self_test")
    accepted = sum(count(row["accepted"]) for row in rows)
    ok = test["max_abs_error"] <= 1e-6 and accepted > 0
    report.check(
        "deployment",
        "aggregation server never sees a client update (encrypted aggregation)",
        "pass" if ok else "fail",
        f"CKKS N={fed.ckks.poly_modulus_degree} {list(fed.ckks.coeff_mod_bit_sizes)} scale "
        f"2^{fed.ckks.global_scale_bits}: the server added {accepted} encrypted update(s) "
        f"({_fmt(bytes_per_param)} bytes/param uploaded) and returned ciphertext aggregates; aggregation "
        f"error vs plaintext FedAvg {test['max_abs_error']:.2e} over {test['n_values']} values",
        fix=ckks_fix(accepted, ok),
    )
    server, client = current_keys(server, client)
    secret = Path(client.secret_context)
    mode, dir_mode = stat.S_IMODE(secret.stat().st_mode), stat.S_IMODE(secret.parent.stat().st_mode)
    server_dir = Path(server.public_context).resolve().parent
    apart = not secret.resolve().is_relative_to(server_dir)
    ok = not test["public_context_is_private"] and not test["public_context_decrypts"] and apart and mode == 0o600
    report.check(
        "deployment",
        "aggregation server holds no key material",
        "pass" if ok else "fail",
        f"server context is_private()={test['public_context_is_private']} and cannot decrypt "
        f"(decrypt attempt refused: {not test['public_context_decrypts']}); sha256 "
        f"{server.public_sha256[:16]}...; the secret context sits outside the server's folder in "
        f"{secret.parent.name}/ (dir mode {dir_mode:o}, file mode {mode:o}), read only by client code",
    )
