"""The ServerApp: a thin adapter that resumes the round state and runs :class:`SecureFedAvg`.

It is given the public CKKS context only (``public-context`` in the run config); nothing here reads
client key material. Deployment: ``flwr run`` with ``job``, ``state-dir``, ``public-context`` and
``public-sha256`` in the run config (docs/federated.md). Simulation passes the same settings by closure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from aisec_train.federated.client_level import make_plan
from aisec_train.federated.config import Aggregation, FederatedDP, dp_level
from aisec_train.federated.settings import ServerSettings
from aisec_train.federated.strategy import (
    SecureFedAvg,
    example_caps,
    load_state,
    partition_map,
    state_to_record,
    wait_for_nodes,
)
from aisec_train.federated.task import FederatedTask, faulty_clients, load_job
from aisec_train.train.config import PrivacyMode

log = logging.getLogger("aisec_train.federated")


def make_app(
    settings: ServerSettings | None = None, task: FederatedTask | None = None, on_round: Callable | None = None
) -> ServerApp:
    """``on_round``: SecureFedAvg's per-round hook (the simulation's trackers; a deployment's ServerApp has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # 1. Settings: the job and the public context, nothing else.
        s = settings or ServerSettings.from_map(context.run_config)
        cfg, _ = load_job(s.job, s.job_sha256)
        fed = cfg.federated
        # 2. Resume from the last completed round, or start from the seeded initial model.
        state = load_state(s.state_dir)
        done = state["round"] if state else 0
        last = min(fed.rounds, fed.stop_after_round or fed.rounds)
        if done >= last:
            log.info("federated: %d round(s) already complete", done)
            return
        # The partition (index arrays; a deployment's server rebuilds it from the job) caps what each client may
        # claim to hold, and the seeded initial model's shapes are the first round's.
        t = task or FederatedTask.from_job(s.job, s.job_sha256)
        arrays = state_to_record(state["model"]) if state else ArrayRecord(t.global_state())
        # 3. The strategy: FedAvg over ciphertexts (ckks) or checked plaintext updates with the defence; under
        #    client-level DP it samples by Poisson and keeps the client-level ledger.
        level = dp_level(fed, cfg.privacy.mode is PrivacyMode.dpsgd)
        strategy = SecureFedAvg(
            aggregation="ckks" if fed.aggregation is Aggregation.ckks else "plaintext",
            min_clients=fed.min_clients,
            max_update_norm=fed.max_update_norm,
            state_dir=s.state_dir,
            public_context=s.public_context,
            public_sha256=s.public_sha256,
            public_root=s.public_root,
            rotate_every=fed.ckks.rotate_every,
            evaluate=fed.evaluate,
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            seed=cfg.train.seed,
            dp=make_plan(fed) if level is FederatedDP.client else None,
            secret_sampling=fed.client_dp.secure_noise,  # the DP cohort draw from OS entropy, as the noise
            defence={**vars(fed.defence), "name": fed.defence.name.value},
            example_caps=example_caps(t.train_parts, t.test_parts),
            round_offset=done,
            history=state["history"] if state else None,
            on_round=on_round,
            faulty=lambda rnd: faulty_clients(fed.inject, rnd),  # the drills' tally (dp=client saves counts only)
        )
        # 4. Wait for the whole federation (a SuperNode may connect late), learn which partition each node serves
        #    (Flower's node ids are random per run; the seeded sampler draws partitions), run the remaining rounds.
        wait_for_nodes(grid, fed.clients, fed.round_timeout_s)
        strategy.partitions = partition_map(grid, fed.round_timeout_s)
        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=last - done,
            timeout=fed.round_timeout_s,
            # job-sha256: a SuperNode started before the job (its operator could not know the digest) checks
            # job.json against the run's pin, which reaches it only through these messages
            train_config=ConfigRecord({"local-epochs": fed.local_epochs, "job-sha256": s.job_sha256}),
            evaluate_config=ConfigRecord({"job-sha256": s.job_sha256}),
        )

    return app


app = make_app()
