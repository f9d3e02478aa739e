"""The federated run's report section, privacy per client, the accuracy-per-round plot and checklist answers."""

from __future__ import annotations

import math
import stat
from pathlib import Path
from typing import Any

from aisec_train.crypto import ckks


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def history_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round in the spine's history shape (``epoch`` = round) for metrics.csv and the curve."""
    rows = []
    for r in rounds:
        clients = [c for c in r["clients"] if not c.get("refused")]
        rows.append({
            "epoch": r["round"],
            "loss": _mean([c.get("train_loss") for c in clients]) or math.nan,
            "train_accuracy": _mean([c.get("train_accuracy") for c in clients]) or math.nan,
            "test_accuracy": r.get("test_accuracy", math.nan),
            "epsilon": max([c.get("epsilon", 0.0) for c in r["clients"]], default=0.0),
        })
    return rows


def plot_accuracy(rounds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["round"] for r in rounds], [r.get("test_accuracy", math.nan) for r in rounds], "o-")
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title("federated accuracy per round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add(run, state: dict[str, Any], eps: dict[int, dict[str, Any]], *, resumed_from: int, seconds: float,
        private: bool, server, client) -> None:
    cfg, report = run.cfg, run.report
    fed, rounds = cfg.federated, state["history"]
    num_params = sum(p.numel() for p in run.model.state_dict().values())
    uploads = [[c["upload_bytes"] for c in r["clients"] if not c.get("refused")] for r in rounds]
    per_round = [{
        "round": r["round"],
        "test_accuracy": r.get("test_accuracy"),
        "accepted": r["accepted"],
        "dropped": r["dropped"],
        "refused": r["refused"],
        "failed": r["failed"],
        "upload_bytes_per_client": up,
        "encrypt_s_per_client": [c.get("encrypt_s") for c in r["clients"] if not c.get("refused")],
        "aggregate_s": r.get("aggregate_s"),
        "decrypt_s_mean": _mean(r.get("decrypt_s", [])),
        "train_s_per_client": [c.get("train_s") for c in r["clients"]],
    } for r, up in zip(rounds, uploads, strict=True)]
    all_up = [u for up in uploads for u in up]
    bytes_per_param = (sum(all_up) / len(all_up) / num_params) if all_up else None
    plot_accuracy(rounds, run.run_dir / "federated_accuracy.png")
    report.add(
        "federated",
        aggregation=fed.aggregation.value,
        engine="simulation",
        rounds=state["round"],
        rounds_planned=fed.rounds,
        clients=fed.clients,
        min_clients=fed.min_clients,
        partition={"kind": fed.partition.kind.value, "alpha": fed.partition.alpha},
        local_epochs=fed.local_epochs,
        num_params=num_params,
        bytes_per_param=bytes_per_param,
        upload_bytes_per_client_round=_mean(all_up),
        encrypt_s_per_round=[_mean(r["encrypt_s_per_client"]) for r in per_round],
        aggregate_s_per_round=[r["aggregate_s"] for r in per_round],
        decrypt_s_per_round=[r["decrypt_s_mean"] for r in per_round],
        dropped_clients=sum(r["dropped"] for r in rounds),
        refused_updates=[dict(x, round=r["round"]) for r in rounds for x in r["refused"]],
        failed_rounds=[r["round"] for r in rounds if r["failed"]],
        accuracy_per_round=[r.get("test_accuracy") for r in rounds],
        accuracy_plot="federated_accuracy.png",
        resumed_from_round=resumed_from,
        seconds=seconds,
        per_round=per_round,
        ckks=dict(vars(fed.ckks)) if fed.aggregation.value == "ckks" else None,
    )
    _privacy(run, eps, private)
    _checklist(run, rounds, server, client, bytes_per_param)


def _privacy(run, eps: dict[int, dict[str, Any]], private: bool) -> None:
    cfg, report = run.cfg.privacy, run.report
    if not private or not eps:
        report.add("privacy", **dict.fromkeys(["epsilon", "delta", "noise_multiplier", "sample_rate", "steps"]),
                   accountant=None, mode="none")
        report.check("training", "differentially private training (DP-SGD)", "fail", "privacy=none: no DP guarantee")
        return
    worst_id = max(eps, key=lambda pid: eps[pid]["epsilon"])
    worst = eps[worst_id]
    # privacy.epsilon is the max over clients: the guarantee every client's data gets.
    report.add("privacy", **{k: worst[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                                                   "accountant")},
               mode="dpsgd", scope="per client (max over clients)", target_epsilon=cfg.target_epsilon,
               max_grad_norm=cfg.max_grad_norm, per_client_epsilon={str(k): v["epsilon"] for k, v in eps.items()},
               max_epsilon_client=worst_id)
    within = cfg.target_epsilon is None or worst["epsilon"] <= cfg.target_epsilon + 1e-9
    report.check("training", "differentially private training (DP-SGD)", "pass" if within else "fail",
                 f"each of {len(eps)} clients runs DP-SGD with its own ledger; max epsilon {worst['epsilon']:.3f} "
                 f"(client {worst_id}, delta {worst['delta']:g}, {worst['accountant']}, {worst['steps']} steps, noise "
                 f"{worst['noise_multiplier']:.3f}); per client: "
                 + ", ".join(f"{k}: {v['epsilon']:.3f}" for k, v in eps.items()) + f"; target {cfg.target_epsilon}")


def _checklist(run, rounds, server, client, bytes_per_param) -> None:
    report, fed = run.report, run.cfg.federated
    report.check("data pipeline", "training data stays in its silo (federated training)", "pass",
                 f"{fed.clients} Flower clients trained on disjoint {fed.partition.kind.value} partitions for "
                 f"{len(rounds)} round(s); only model updates left a client")
    if fed.aggregation.value == "ckks":
        pub = ckks.load_public_context(Path(server.public_context), server.public_sha256)
        mode = stat.S_IMODE(Path(client.secret_context).stat().st_mode)
        report.check("deployment", "aggregation server never sees a client update (encrypted aggregation)", "pass",
                     f"CKKS N={fed.ckks.poly_modulus_degree} {list(fed.ckks.coeff_mod_bit_sizes)} scale "
                     f"2^{fed.ckks.global_scale_bits}: the server added {sum(len(r['accepted']) for r in rounds)} "
                     f"encrypted updates ({bytes_per_param:.1f} bytes/param) and returned ciphertext aggregates")
        report.check("deployment", "aggregation server holds no key material", "pass",
                     f"server context is_private()={pub.is_private()} (sha256 {server.public_sha256[:16]}...); the "
                     f"secret context sits under client_keys/ with mode {mode:o}, read only by client code")
    else:
        report.check("deployment", "aggregation server never sees a client update (encrypted aggregation)", "fail",
                     "federated.aggregation=plaintext: the server sees every client's weights")
    refused = [x for r in rounds for x in r["refused"]]
    report.check("training", "poisoned or corrupt client updates refused (NaN/inf, norm bound)", "pass",
                 f"{len(refused)} update(s) refused "
                 + (", ".join(f"client {x['client']} ({x['reason']}, by {x['by']})" for x in refused) or "")
                 + f"; L2 bound {fed.max_update_norm} checked by clients before encryption"
                 + (" and by the server" if fed.aggregation.value == "plaintext" else ""))
    dropped = sum(r["dropped"] for r in rounds)
    failed = [r["round"] for r in rounds if r["failed"]]
    report.check("monitoring", "client dropouts tolerated with a quorum", "pass" if not failed else "fail",
                 f"{dropped} client answer(s) missing over {len(rounds)} round(s); quorum {fed.min_clients}; "
                 f"failed rounds: {failed or 'none'}")
