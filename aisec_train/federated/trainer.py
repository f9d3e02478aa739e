"""The federated trainer: one of the three interchangeable trainers behind the pipeline's train stage.

    keys (client_keys/ 0600, federated/server/ public) -> job.json + task -> engine (simulation | deployment)
    -> final model -> TrainResult (+ the federated report section)

Every client runs the one training loop on its partition, with the run's objective (adversarial training
included) and, under ``backdoor.malicious_clients``, the poisoned shards the poison stage prepared.

The job process acts for the data owners: it creates the CKKS keys, starts the engine, and at the end
decrypts the last aggregate with the clients' key to hand the final global model to the later stages
(evaluate, robustness, outputs). The ServerApp is only ever given the public context's path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from aisec_train.crypto import ckks, rotation
from aisec_train.errors import ConfigError
from aisec_train.federated import report as fed_report
from aisec_train.federated import report_scale as fed_scale
from aisec_train.federated import shared
from aisec_train.federated.client_dp import client_level_epsilon
from aisec_train.federated.client_keys import ClientKeys
from aisec_train.federated.client_level import EXTRA_KEYS, make_plan, read_ledger
from aisec_train.federated.config import Aggregation, Engine, FederatedDP, dp_level
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.federated.strategy import load_state
from aisec_train.federated.task import FederatedTask, client_epsilons, load_job, unflatten, write_job
from aisec_train.privacy import federated_budget as budget
from aisec_train.report.report import Report
from aisec_train.store.files import read_nofollow
from aisec_train.train.checkpoint import CheckpointError
from aisec_train.train.config import PrivacyMode
from aisec_train.train.job import TrainJob
from aisec_train.train.loop import TrainResult

log = logging.getLogger("aisec_train.federated")
CLIENT_KEY_DIR = "client_keys"  # beside federated/, never inside the server's folder


def prepare(job: TrainJob) -> tuple[ServerSettings, ClientSettings]:
    """Keys (created once per run dir, reused on resume) and the job file, split into the two sides' settings."""
    cfg, data, run_dir = job.cfg, job.data, job.run_dir
    fed_dir, key_dir = run_dir / "federated", run_dir / CLIENT_KEY_DIR
    # Every SuperNode reads model.checkpoint_path itself, and the frozen base never crosses the wire: job.json pins
    # the bytes this run's factory loaded, so a node holding other bytes refuses in one line instead of training
    # a mix under this run's report (which names this digest).
    base = job.factory.checkpoint_digest()
    if base is not None and isinstance(cfg.model, dict) and not cfg.model.get("checkpoint_sha256"):
        cfg = replace(cfg, model={**cfg.model, "checkpoint_sha256": base})
    path, digest = write_job(cfg, fed_dir / "job.json", manifest_sha256=data.manifest_sha256)
    load_job.cache_clear()  # a resumed run may have rewritten job.json with new overrides
    server = ServerSettings(job=str(path), state_dir=str(fed_dir / "server"), job_sha256=digest)
    client = ClientSettings(job=str(path), state_dir=str(run_dir / "client_state"), job_sha256=digest)
    cc = cfg.federated.ckks
    if cfg.federated.aggregation is Aggregation.ckks and cc.rotate_every:
        keys = _epoch_keys(cfg.federated, key_dir, fed_dir / "server" / "keys")
        server = replace(server, public_root=str(fed_dir / "server" / "keys"))
        client = replace(client, secret_root=str(key_dir))
    elif cfg.federated.aggregation is Aggregation.ckks:
        keys = _keys(cc, key_dir, fed_dir / "server")
        server = replace(server, public_context=str(keys.public_context), public_sha256=keys.public_sha256)
        client = replace(client, secret_context=str(keys.secret_context), secret_sha256=keys.secret_sha256)
    return server, client


def _params(cc) -> ckks.CkksParams:
    return ckks.CkksParams(cc.poly_modulus_degree, tuple(cc.coeff_mod_bit_sizes), cc.global_scale_bits, cc.encryption)


def _keys(cc, key_dir: Path, server_dir: Path) -> ckks.KeyPaths:
    secret, public = key_dir / ckks.SECRET_FILE, server_dir / ckks.PUBLIC_FILE
    if secret.exists() and public.exists():  # a resumed run keeps its keys: the saved aggregate needs them
        digest = lambda p: p.with_name(p.name + ".sha256").read_text().strip()  # noqa: E731
        return ckks.KeyPaths(secret, public, digest(secret), digest(public))
    return ckks.generate_keys(_params(cc), key_dir, server_dir, overwrite=True)


def _epoch_keys(fed, client_root: Path, server_root: Path) -> list[int]:
    """The key dealer (this job, for the data owners): one key per epoch of ``rotate_every`` rounds, made up
    front (a resumed run keeps the epochs it has: their ciphertexts need them)."""
    made = rotation.epochs(server_root).values()
    wanted = range(rotation.epoch_of(fed.rounds, fed.ckks.rotate_every) + 1)
    for epoch in wanted:
        if epoch not in made:
            rotation.rotate_keys(_params(fed.ckks), client_root, server_root, epoch)
    return list(wanted)


def client_gpu_share(fed, device: torch.device) -> float:
    """Each simulated client's Ray GPU share. Ray hides the GPUs from a client that asked for none, so on a
    CUDA run the default (null) spreads the node's GPUs over the clients, and an explicit 0 is refused."""
    if fed.client_gpus is not None:
        if device.type == "cuda" and fed.client_gpus == 0:
            raise ConfigError(
                "federated.client_gpus=0 is not allowed with train.device on CUDA: the clients would see no GPU; "
                "leave it null or give each client a share in (0, 1]"
            )
        return fed.client_gpus
    if device.type != "cuda":
        return 0.0
    return min(1.0, torch.cuda.device_count() / fed.clients)


def run_simulation(cfg, server: ServerSettings, client: ClientSettings, gpu_share: float, task: FederatedTask,
                   tracker: Any = None) -> str:  # fmt: skip
    """Flower's simulation engine (Ray) in this process, with the configured resources per client. The ServerApp
    runs in a thread of this process, so it logs each round to the run's trackers as the round completes."""
    from aisec_train.quiet import quiet_flower, withheld_client_detail

    quiet_flower()  # each Flower line once, without its DEBUG and import-time noise: before flwr.simulation loads
    from flwr.simulation import run_simulation as flwr_run_simulation

    from aisec_train.federated import client_app, server_app

    fed = cfg.federated
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpu_share},
        "init_args": {
            "num_cpus": fed.ray_num_cpus or os.cpu_count() or 1,
            "include_dashboard": False,
            "log_to_driver": False,
        },
    }
    client_level = dp_level(fed, cfg.privacy.mode is PrivacyMode.dpsgd) is FederatedDP.client
    with withheld_client_detail(client_level):  # a crashing client's log line names none (aisec_train/quiet.py)
        flwr_run_simulation(
            server_app=server_app.make_app(server, task, _round_logger(tracker)),
            client_app=client_app.make_app(client, task),
            num_supernodes=fed.clients,
            backend_config=backend_config,
        )
    return "in-process"


def _round_logger(tracker: Any):
    """The server side's per-round hook: the round's metrics to the run's tracker (None: no logger is on)."""
    if not tracker:
        return None
    return lambda row, epsilon, seconds: tracker.log_metrics(
        fed_report.round_metrics(row, epsilon, seconds), row["round"], "round"
    )


def final_model(task: FederatedTask, client: ClientSettings, state: dict[str, Any]) -> torch.nn.Module:
    """The last global model; on the CKKS path the job decrypts it as a key holder (never the ServerApp).
    A DP aggregate's two extra values (count, clip norm) are not weights and are left out."""
    template, saved = task.global_state(), state["model"]
    if saved["kind"] == "ckks":
        vector = ClientKeys(client).decrypt(saved["data"])
        tensors = unflatten(vector[: sum(v.numel() for v in template.values())], template)
    else:
        tensors = {k: v for k, v in saved["tensors"].items() if k not in EXTRA_KEYS}
    return task.global_model(tensors)  # the aggregated subset merged into the frozen base (shared.py)


# What a resumed run must keep: the report describes every round (and the privacy claim covers every round) by
# the config of the run that finishes it, so a resume that switched any of these would misreport earlier rounds.
RESUME_KEYS = (
    "model", "privacy.mode", "privacy.delta", "privacy.accountant", "train.seed", "dataset.split_seed",
    "robustness.mode", "federated.aggregation", "federated.ckks", "federated.clients", "federated.partition",
    "federated.client_dp", "federated.defence", "backdoor.attack", "backdoor.malicious_clients",
)  # fmt: skip


def _resume_view(container: dict[str, Any], manifest_sha256: str) -> dict[str, Any]:
    def get(dotted: str) -> Any:
        node: Any = container
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    view = {key: get(key) for key in RESUME_KEYS}
    dp = get("federated.dp")  # null follows privacy: compare the resolved unit of privacy
    view["federated.dp"] = dp or ("record" if get("privacy.mode") == "dpsgd" else "none")
    if view["federated.dp"] != "client":
        view["federated.client_dp"] = None  # read only under client-level DP
    view["dataset (manifest)"] = manifest_sha256
    return view


def check_resume(cfg, run_dir: Path, manifest_sha256: str) -> None:
    """Refuse (one line, before any work) a config that would continue another federated run in ``run_dir``."""
    fed_dir = run_dir / "federated"
    started = (fed_dir / "server" / "state.pt").exists() or (run_dir / "client_state").exists()
    if not started:
        return
    try:
        old = json.loads(read_nofollow(fed_dir / "job.json"))
        before = _resume_view(old["config"], old["manifest_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{run_dir} holds federated round state but no readable federated/job.json ({err}): it cannot be "
            "resumed safely. Use another hydra.run.dir"
        ) from None
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    now = _resume_view(container, manifest_sha256)
    changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in now if before[k] != now[k]]
    if changed:
        raise CheckpointError(
            f"{run_dir} holds a federated run that this config would continue with other settings "
            f"({'; '.join(changed)}): a resume keeps them, or the report and the privacy claim would describe "
            "earlier rounds by settings they did not run with. Use another hydra.run.dir"
        )


def train_federated(job: TrainJob) -> TrainResult:
    """Run the job's federated training; the result carries the final global model, the per-round history, the
    privacy figures and, in ``sections`` / ``checks``, the federated section and its checklist answers."""
    cfg, device = job.cfg, job.device
    check_resume(cfg, job.run_dir, job.data.manifest_sha256)  # before any key, job file, admission or round
    part = Report()  # this trainer's own sections and answers: the train stage adds them to the run's report
    if job.factory.template is not None and cfg.federated.engine is Engine.deployment:
        raise ConfigError(
            "federated.engine=deployment is not allowed with a model object from the Python API: each SuperNode "
            "builds the model from the config; give model._target_ instead"
        )
    if cfg.federated.engine is Engine.deployment:  # a resumed run's app folder, before any key or admission
        from aisec_train.federated.deploy import APP_NAME, check_app_folder

        if (job.run_dir / "federated" / APP_NAME).is_dir():
            check_app_folder(job.run_dir / "federated" / APP_NAME)  # write_app checks it again
    # Checked before anything is written: Ray would otherwise wait for a GPU forever, or hide it from clients.
    gpus = client_gpu_share(cfg.federated, device) if cfg.federated.engine is Engine.simulation else 0.0
    if cfg.federated.engine is Engine.simulation and gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"federated.client_gpus={gpus} is not allowed: this machine has no CUDA device")
    level = dp_level(cfg.federated, cfg.privacy.mode is PrivacyMode.dpsgd)
    plan = make_plan(cfg.federated) if level is FederatedDP.client else None  # refuses an infeasible plan now
    task = FederatedTask.build(cfg, job.factory, job.data, job.extras.get("backdoor"))
    task.partition.save(job.run_dir / "federated" / "partition.npz")
    if job.spend is not None:  # the dataset-level budget: the planned spend must fit before any round
        budget.begin(job.spend.ledger, job.spend.run_id, task, plan, len(job.data.train))
    server, client = prepare(job)
    before = load_state(Path(server.state_dir))
    started = time.perf_counter()
    if cfg.federated.engine is Engine.deployment:
        from aisec_train.federated.deploy import run_deployment

        transport = run_deployment(cfg, server, client, job.run_dir / "federated")
    else:
        transport = run_simulation(cfg, server, client, gpus, task, job.extras.get("tracker"))
    seconds = time.perf_counter() - started
    state = load_state(Path(server.state_dir))
    if state is None:
        raise RuntimeError("the federated run completed no round; see the Flower log above")
    model = final_model(task, client, state).to(device)
    if job.spend is not None:
        spent = budget.charge(job.spend.ledger, job.spend.run_id, client.state_path, Path(server.state_dir), plan,
                              cfg.federated.clients)  # fmt: skip
        part.add("privacy", budget={**job.spend.summary(), "federated_charge": spent})
    retired = _retire(cfg.federated, client, state)
    eps = client_epsilons(client.state_path, cfg.federated.clients) if level is FederatedDP.record else {}
    history = fed_report.history_rows(state["history"])
    if plan is not None:  # the curve's epsilon: the client-level ledger after each round, not the clients' 0
        charged = (read_ledger(Path(server.state_dir), plan.accountant, plan.delta) or {}).get("rounds_charged", [])
        for row in history:
            steps = sum(1 for r in charged if r <= row["epoch"])
            row["epsilon"] = client_level_epsilon(plan.noise_multiplier, plan.sample_rate, steps, plan.delta,
                                                  plan.accountant) if steps else 0.0  # fmt: skip
    result = TrainResult(model, None, history, grad_sample_mode=cfg.privacy.grad_sample_mode.value)
    view = fed_report.ReportInputs(cfg, part, job.run_dir, model, job.objective.name, job.data)
    measured_record = fed_report.add(
        view,
        state,
        eps,
        resumed_from=before["round"] if before else 0,
        seconds=seconds,
        private=level is FederatedDP.record,
        server=server,
        client=client,
        transport=transport,
        client_level=plan is not None,
    )
    measured_client = fed_scale.add(view, task.partition, level, plan, server, retired, client, state)
    result.privacy = measured_client or measured_record  # what the clients' or the server's ledger measured
    slots = cfg.federated.ckks.poly_modulus_degree // 2 if cfg.federated.aggregation is Aggregation.ckks else None
    part.add("federated", **shared.summary(model, task.keys, fed_report.per_round(state["history"]), slots))
    result.sections, result.checks = part.sections, part.checklist
    return result


def _retire(fed, client: ClientSettings, state: dict[str, Any]) -> list[int]:
    """Once every round is done, destroy every epoch secret but the last (the final model needs it)."""
    if not client.secret_root or state["round"] < fed.rounds:
        return []
    last = rotation.epoch_of(state["round"], fed.ckks.rotate_every)
    return [int(p.parent.name.split("_")[1]) for p in rotation.retire(Path(client.secret_root), last)]
