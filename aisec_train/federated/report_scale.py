"""The report items of federated training at scale: partition, sampling, client-level privacy, the defence
against malicious clients, and key custody (issue 14). ``report.py`` keeps the per-round record.

Every statement here says what ran and what it cannot do, so no item claims a protection that did not run:
under CKKS the defences that need individual updates are listed as impossible, the clients' own norm clip
as unverifiable, and single-key CKKS's collusion threat in plain words.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from aisec_train.federated import cohorts
from aisec_train.federated.client_keys import ClientKeys
from aisec_train.federated.client_level import EXTRA_KEYS, ClientDPPlan, decode, noise_std_of_sum, read_ledger
from aisec_train.federated.config import Aggregation, Defence, FederatedDP
from aisec_train.federated.partition import Partition
from aisec_train.federated.report import ReportInputs
from aisec_train.federated.robust_aggregation import DEFENCES, ckks_summary, runs_on_ciphertexts
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.privacy.report import FIGURES, Measured

COLLUSION = (
    "single-key CKKS: every client holds the same secret key and the server holds none, so any key-holding client "
    "colluding with the server can decrypt every client's individual update"
)


def add(
    run: ReportInputs,
    partition: Partition,
    level: FederatedDP,
    plan: ClientDPPlan | None,
    server: ServerSettings,
    retired: list[int],
    client: ClientSettings | None = None,
    state: dict[str, Any] | None = None,
) -> Measured | None:
    """Add the scale items to the ``federated`` section and checks; return the client-level privacy figures
    (None without client-level DP) for privacy/report.py."""
    cfg, report = run.cfg, run.report
    fed = cfg.federated
    history = report.get("federated.per_round") or []
    report.add(
        "federated",
        partition=partition.to_report(),
        sampling={
            "fraction_train": fed.fraction_train,
            "fraction_evaluate": fed.fraction_evaluate if fed.evaluate else 0.0,
            "sampler": _sampler(plan, fed.client_dp.secure_noise),
            "expected_cohort": plan.expected_cohort if plan else max(int(fed.clients * fed.fraction_train), 1),
            "cohort_per_round": [row.get("sampled") for row in history],
            "evaluated_clients_per_round": [row.get("evaluated_clients") for row in history],
        },
        dp=level.value,
        defence=_defence(fed),
        defences_on_ciphertexts=ckks_summary(),
        key_custody=_custody(fed, retired),
    )
    _defence_check(run, history)
    _custody_check(run, retired)
    return _client_measured(run, plan, server, client, state) if plan is not None else None


def _defence(fed) -> dict[str, Any]:
    name = fed.defence.name
    on_ckks, why = runs_on_ciphertexts(name.value)
    ckks = fed.aggregation is Aggregation.ckks
    where = "server, on each plaintext update (local - global)"
    if ckks and name is Defence.norm_bound:
        where = "clients, before encrypting (unverifiable: the server cannot compute an encrypted update's norm)"
    elif name is Defence.fedavg:
        where = "none"
    return {
        "name": name.value,
        "what": DEFENCES[name.value],
        "where": where,
        "verifiable_by_server": not ckks and name is not Defence.fedavg,
        "runs_on_ciphertexts": on_ckks,
        "why": why,
        "num_malicious_assumed": fed.defence.num_malicious,
        "trim_fraction": fed.defence.trim_fraction if name is Defence.trimmed_mean else None,
        "krum_select": fed.defence.krum_select if name is Defence.krum else None,
        "norm_bound": fed.defence.norm_bound if name is Defence.norm_bound else None,
        "clients_skipping_clip": list(fed.inject.skip_clip) if ckks and name is Defence.norm_bound else [],
    }


def _custody(fed, retired: list[int]) -> dict[str, Any]:
    if fed.aggregation is not Aggregation.ckks:
        return {"scheme": "none (plaintext aggregation)", "threat": "the server sees every client's update"}
    every = fed.ckks.rotate_every
    return {
        "scheme": "single-key CKKS (TenSEAL)",
        "key_holders": "every client, and the job acting for the data owners (it decrypts the final model)",
        "server_holds": "a public context: CKKS parameters only, no key of any kind",
        "threat": COLLUSION + "; rotation limits a key leaked later to its own epoch, not collusion during one",
        "protects_against": "an honest-but-curious server alone, and outsiders without a key",
        "rotate_every": every or None,
        "epochs": math.ceil(fed.rounds / every) if every else 1,
        "retired_epochs": retired,
        "not_implemented": "threshold or multi-key HE, secure aggregation (SecAgg+)",
    }


def _final_clip(plan: ClientDPPlan, client: ClientSettings | None, state: dict[str, Any] | None) -> float | None:
    """The clip norm the released aggregate carries (adaptive clipping moves it), read as a key holder."""
    if state is None:
        return None
    saved = state["model"]
    if saved["kind"] == "ckks":
        if client is None:
            return None
        extras = ClientKeys(client).decrypt(saved["data"])[-2:]
    else:
        if EXTRA_KEYS[1] not in saved["tensors"]:
            return plan.clip_norm  # no round was released: the configured C
        extras = np.array([float(saved["tensors"][k]) for k in EXTRA_KEYS])
    return decode(np.asarray(extras, np.float64), 0, plan)[1]


def _sampler(plan: ClientDPPlan | None, secure: bool) -> str:
    if plan is None:
        return "fixed size, seeded"
    return f"poisson (each client independently, {'OS entropy' if secure else 'seeded: replayable'})"


def _client_measured(run, plan: ClientDPPlan, server: ServerSettings, client, state) -> Measured:
    """Client-level DP (DP-FedAvg): the server's ledger, kept by the sampler; privacy/report.py writes it."""
    ledger = read_ledger(Path(server.state_dir), plan.accountant, plan.delta) or {
        "epsilon": 0.0, "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate, "steps": 0, "accountant": plan.accountant, "rounds_charged": [],
    }  # fmt: skip
    n = run.cfg.federated.clients
    eps, delta = ledger["epsilon"], ledger["delta"]
    statement = (
        f"client-level DP (DP-FedAvg): each round samples every one of the {n} clients independently with "
        f"probability {plan.sample_rate:g}; each sampled client clips its update to L2 norm "
        f"{plan.clip_norm:g}{' (adaptive)' if plan.adaptive else ''} and adds its share of Gaussian noise, so the "
        f"aggregate carries noise multiplier {plan.noise_multiplier:.3f}; the server only adds. The guarantee covers "
        "the released global models (every round's); a key-holding client colluding with the server sees each "
        "upload with one noise share only, and the clients' example counts, losses and norms never leave them"
    )
    details = {
        "level": "client",
        "rounds_charged": ledger["rounds_charged"],
        "clip_norm": plan.clip_norm,
        "clip_norm_final": _final_clip(plan, client, state),
        "adaptive_clipping": plan.adaptive,
        "update_noise_multiplier": plan.update_noise,
        "count_stddev": plan.count_stddev,
        "expected_cohort": plan.expected_cohort,
        "noise_std_of_mean": noise_std_of_sum(plan),
        "dropout_tolerance": plan.dropout_tolerance,
        "secure_noise": run.cfg.federated.client_dp.secure_noise,
        "ledger": "the server's state folder (client_dp_ledger.pt): the sampler is the accountant",
        "scope": {"unit": "client", "statement": statement},
    }
    secure, seed = run.cfg.federated.client_dp.secure_noise, run.cfg.train.seed
    source = "os_entropy" if secure else f"train.seed={seed} (federated.client_dp.secure_noise=false: replayable)"
    gaps = [] if secure else [f"federated.client_dp.secure_noise=false: noise and cohorts follow train.seed={seed}"]
    evidence = (
        f"client-level ({eps:.3f}, {delta:g})-DP by DP-FedAvg with distributed noise: {ledger['steps']} round(s) "
        f"charged by the {plan.accountant} accountant at sampling rate {plan.sample_rate:g}, noise multiplier "
        f"{plan.noise_multiplier:.3f}, clip {plan.clip_norm:g}; target {plan.target_epsilon}"
    )
    return Measured(
        {k: ledger[k] for k in FIGURES},
        "dp-fedavg",
        plan.target_epsilon,
        evidence,
        details=details,
        randomness={"noise": source, "sampling": source, "dp_guarantee": secure},
        gaps=gaps,
        not_covered=[cohorts.NOT_COVERED],
    )


def _defence_check(run, history: list[dict[str, Any]]) -> None:
    fed, report = run.cfg.federated, run.report
    d = report.get("federated.defence")
    fix = None  # the table's fix (report/criteria.py) unless the rule needs more clients
    if d["name"] == "fedavg":
        status, evidence = "fail", "federated.defence=fedavg: every accepted update enters the mean unchecked"
    elif not d["verifiable_by_server"]:
        status = "fail"
        evidence = (
            f"norm_bound {fed.defence.norm_bound} is clipped by each client before encryption; the server cannot "
            "compute or check an encrypted update's norm, so a malicious client that skips the clip is neither "
            f"bounded nor detected (clients that skipped it here: {d['clients_skipping_clip'] or 'none'})"
        )
    else:
        held, tally, fix = _held_against_attackers(run, history)
        status = "pass" if held else "fail"
        evidence = f"{d['what']}, applied by the server to the plaintext updates of every round; {tally}"
    if fed.aggregation is Aggregation.ckks:
        table = report.get("federated.defences_on_ciphertexts")
        impossible = [k for k, v in table.items() if not v["runs_on_ciphertexts"]]
        evidence += f"; cannot run on ciphertexts: {', '.join(impossible)}"
    report.check("training", "robust aggregation against malicious clients", status, evidence, fix=fix)


def tolerates(rule: str, n: int, f: int, trim_fraction: float = 0.0) -> bool:
    """Whether ``rule`` still bounds the aggregate with ``f`` malicious updates among ``n`` (the standard breakdown
    points: Krum, Blanchard et al. 2017, n >= 2f + 3; the coordinate-wise median an honest majority; the trimmed
    mean cuts at least f per side and keeps an honest majority; norm bounding caps each update's size but a
    malicious majority still steers the mean, so it needs an honest majority too)."""
    if f == 0:
        return n >= 1
    if rule == "krum":
        return n >= 2 * f + 3
    if rule == "trimmed_mean":
        return int(trim_fraction * n) >= f and 2 * f < n
    if rule in ("median", "norm_bound"):
        return 2 * f < n
    return False  # fedavg: a single update moves the mean anywhere


def _held_against_attackers(run, history: list[dict[str, Any]]) -> tuple[bool, str, str | None]:
    """The criterion on this run's rounds: each aggregated round's f (the larger of the assumed attackers and the
    red team's clients among its accepted updates) within what the rule tolerates for its n updates."""
    fed, bd = run.cfg.federated, run.cfg.backdoor
    malicious = set(range(bd.malicious_clients)) | set(fed.inject.skip_clip) | set(fed.inject.scale)
    assumed, rule = fed.defence.num_malicious, fed.defence.name.value
    rounds = [row for row in history if not row.get("failed") and row.get("accepted")]
    if not rounds:  # nothing aggregated: judge the configured cohort against every attacker it can hold
        rounds = [{"round": 0, "accepted": list(range(min(fed.cohort, fed.clients)))}]
    worst = None
    for row in rounds:
        rnd, accepted = row["round"], row["accepted"]
        n, f = len(accepted), max(assumed, len(malicious & set(accepted)))
        by_count = tolerates(rule, n, f, fed.defence.trim_fraction)
        by_weight = rule != "norm_bound" or _weighted_majority_honest(row, f)
        if not (by_count and by_weight):
            worst = worst or (rnd, n, f, by_count)
    attackers = f"malicious clients {sorted(malicious) or 'none'}, num_malicious assumed {assumed}"
    if worst is None:
        return True, f"{attackers}: every round's f within what {rule} tolerates", None
    rnd, n, f, by_count = worst
    where = f"round {rnd}" if rnd else "the configured cohort"
    need = 2 * f + 3 if rule == "krum" else 2 * f + 1
    fix = (
        f"at least {need} clients per round for f={f}: federated.clients={max(need, fed.clients + need - n)} "
        f"federated.defence.num_malicious={f}"
    )
    if rule == "trimmed_mean":
        fix += f" federated.defence.trim_fraction={min(0.49, round(f / need + 0.005, 2))}"
    tally = f"{attackers}: {where} had f={f} malicious of n={n} updates, more than {rule} tolerates"
    if by_count:
        tally = (
            f"{attackers}: in {where} the {f} heaviest of n={n} updates held half or more of the examples that "
            f"{rule}'s weighted mean weighs by, so f={f} attackers could steer it"
        )
    return False, tally, fix


def _weighted_majority_honest(row: dict[str, Any], f: int) -> bool:
    """norm_bound's mean is weighted by the (capped) example counts, so an honest majority of clients is not enough:
    the f heaviest accepted updates, whoever sends them, must weigh less than half of the round's total."""
    counts = {c.get("partition_id"): c.get("num_examples") for c in row.get("clients", [])}
    weights = sorted((float(counts.get(pid) or 0) for pid in row["accepted"]), reverse=True)
    if not any(weights):  # no counts recorded (the configured cohort before any round): the count rule alone
        return True
    return 2 * sum(weights[:f]) < sum(weights)


def _custody_check(run, retired: list[int]) -> None:
    fed, report = run.cfg.federated, run.report
    if fed.aggregation is not Aggregation.ckks:
        report.check("deployment", "no single key holder can decrypt individual updates (key custody)",
                     "not_applicable", "plaintext aggregation: the server reads every update")  # fmt: skip
        return
    every = fed.ckks.rotate_every
    rotation = (
        f"keys rotate every {every} round(s); retired epochs {retired or 'none yet'}" if every else "one key per run"
    )
    report.check(
        "deployment",
        "no single key holder can decrypt individual updates (key custody)",
        "fail",
        f"{COLLUSION}; {rotation}; threshold/multi-key HE or secure aggregation would be needed (not implemented)",
    )
