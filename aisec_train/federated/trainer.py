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

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from aisec_train.crypto import ckks
from aisec_train.errors import ConfigError
from aisec_train.federated import report as fed_report
from aisec_train.federated.config import Aggregation, Engine
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.federated.strategy import load_state
from aisec_train.federated.task import FederatedTask, client_epsilons, load_job, unflatten, write_job
from aisec_train.train.config import PrivacyMode
from aisec_train.train.loop import TrainResult

log = logging.getLogger("aisec_train.federated")
CLIENT_KEY_DIR = "client_keys"  # beside federated/, never inside the server's folder


def prepare(job) -> tuple[ServerSettings, ClientSettings]:
    """Keys (created once per run dir, reused on resume) and the job file, split into the two sides' settings."""
    cfg, data, run_dir = job.cfg, job.data, job.run_dir
    fed_dir, key_dir = run_dir / "federated", run_dir / CLIENT_KEY_DIR
    path = write_job(cfg, fed_dir / "job.json", manifest_sha256=data.manifest_sha256)
    load_job.cache_clear()  # a resumed run may have rewritten job.json with new overrides
    server = ServerSettings(job=str(path), state_dir=str(fed_dir / "server"))
    client = ClientSettings(job=str(path), state_dir=str(run_dir / "client_state"))
    if cfg.federated.aggregation is Aggregation.ckks:
        keys = _keys(cfg.federated.ckks, key_dir, fed_dir / "server")
        server = ServerSettings(server.job, server.state_dir, str(keys.public_context), keys.public_sha256)
        client = ClientSettings(client.job, client.state_dir, str(keys.secret_context), keys.secret_sha256)
    return server, client


def _keys(cc, key_dir: Path, server_dir: Path) -> ckks.KeyPaths:
    params = ckks.CkksParams(cc.poly_modulus_degree, tuple(cc.coeff_mod_bit_sizes), cc.global_scale_bits, cc.encryption)
    secret, public = key_dir / ckks.SECRET_FILE, server_dir / ckks.PUBLIC_FILE
    if secret.exists() and public.exists():  # a resumed run keeps its keys: the saved aggregate needs them
        digest = lambda p: p.with_name(p.name + ".sha256").read_text().strip()  # noqa: E731
        return ckks.KeyPaths(secret, public, digest(secret), digest(public))
    return ckks.generate_keys(params, key_dir, server_dir, overwrite=True)


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


def run_simulation(cfg, server: ServerSettings, client: ClientSettings, gpu_share: float, task: FederatedTask) -> str:
    """Flower's simulation engine (Ray) in this process, with the configured resources per client."""
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
    flwr_run_simulation(
        server_app=server_app.make_app(server, task),
        client_app=client_app.make_app(client, task),
        num_supernodes=fed.clients,
        backend_config=backend_config,
    )
    return "in-process"


def final_model(task: FederatedTask, client: ClientSettings, state: dict[str, Any]) -> torch.nn.Module:
    """The last global model; on the CKKS path the job decrypts it as a key holder (never the ServerApp)."""
    model = task.initial_model()
    saved = state["model"]
    if saved["kind"] == "ckks":
        ctx = ckks.load_secret_context(Path(client.secret_context), client.secret_sha256)
        saved = {"tensors": unflatten(ckks.decrypt_aggregate(saved["data"], ctx), model.state_dict())}
    model.load_state_dict(saved["tensors"])
    return model


def train_federated(job) -> TrainResult:
    cfg, device = job.cfg, job.device
    if job.factory.template is not None and cfg.federated.engine is Engine.deployment:
        raise ConfigError(
            "federated.engine=deployment is not allowed with a model object from the Python API: each SuperNode "
            "builds the model from the config; give model._target_ instead"
        )
    # Checked before anything is written: Ray would otherwise wait for a GPU forever, or hide it from clients.
    gpus = client_gpu_share(cfg.federated, device) if cfg.federated.engine is Engine.simulation else 0.0
    if cfg.federated.engine is Engine.simulation and gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"federated.client_gpus={gpus} is not allowed: this machine has no CUDA device")
    task = FederatedTask.build(cfg, job.factory, job.data)
    server, client = prepare(job)
    before = load_state(Path(server.state_dir))
    started = time.perf_counter()
    if cfg.federated.engine is Engine.deployment:
        from aisec_train.federated.deploy import run_deployment

        transport = run_deployment(cfg, server, client, job.run_dir / "federated")
    else:
        transport = run_simulation(cfg, server, client, gpus, task)
    seconds = time.perf_counter() - started
    state = load_state(Path(server.state_dir))
    if state is None:
        raise RuntimeError("the federated run completed no round; see the Flower log above")
    model = final_model(task, client, state).to(device)
    eps = client_epsilons(client.state_path, cfg.federated.clients)
    history = fed_report.history_rows(state["history"])
    result = TrainResult(model, None, history, grad_sample_mode=cfg.privacy.grad_sample_mode.value)
    view = SimpleNamespace(cfg=cfg, report=job.report, run_dir=job.run_dir, model=model, objective=job.objective.name)
    fed_report.add(
        view,
        state,
        eps,
        resumed_from=before["round"] if before else 0,
        seconds=seconds,
        private=cfg.privacy.mode is PrivacyMode.dpsgd,
        server=server,
        client=client,
        transport=transport,
    )
    return result
