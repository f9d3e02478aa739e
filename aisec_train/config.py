"""The whole job's typed configuration, composed from the schema each package keeps next to its code.

``dataset`` (data/config.py), ``train`` and ``privacy`` (train/config.py), ``robustness`` (robust/config.py),
``backdoor``, ``federated`` and ``audit`` (their packages) are dataclasses that OmegaConf type-checks and whose
``__post_init__`` checks ranges. ``model``, ``optimizer`` and ``scheduler`` are Hydra ``_target_`` nodes, open to
any importable class: :mod:`aisec_train.components` checks them (importable, arguments the constructor takes)
before any work. :func:`check_composition` refuses, in one line, any combination of groups that could not run
as the report would claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from aisec_train.audit.config import AuditConfig, MonitorConfig  # noqa: F401 - MonitorConfig: audit/monitor.py reads it here
from aisec_train.backdoor.config import BackdoorAttack, BackdoorConfig
from aisec_train.data.config import DatasetConfig
from aisec_train.errors import ConfigError, require
from aisec_train.federated.config import FederatedConfig, FederatedDP, FederatedMode
from aisec_train.robust.config import RobustMode, RobustnessConfig
from aisec_train.tracking.config import LoggerConfig
from aisec_train.train.config import FP16_UNDER_DP, GradSampleMode, PrivacyConfig, PrivacyMode, TrainConfig


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # _target_ nodes filled by the groups of the same name (configs/model, optimizer, scheduler); they default to
    # null here so that switching presets never leaves one preset's arguments behind in another's node.
    model: Any = None
    optimizer: Any = None  # null: SGD from train.lr / momentum / weight_decay
    scheduler: Any = None  # a _target_ LR scheduler stepped once per optimizer step; null = constant lr
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment trackers (aisec_train/tracking)


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


def to_config(cfg: DictConfig | dict) -> Config:
    """Turn the composed Hydra config into the typed dataclasses, running every range and composition check."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    refuse_unknown_keys(cfg, Config, "")
    cfg_obj = OmegaConf.to_object(cfg)
    assert isinstance(cfg_obj, Config)
    from aisec_train.preflight import check_finite

    check_finite(cfg_obj)  # every float key, before a null radius is derived from an inf one (preflight.py)
    from aisec_train.data.sources import check_source_keys  # the source registry knows which keys it reads

    check_source_keys(cfg_obj.dataset)
    cfg_obj.robustness.resolve(cfg_obj.dataset.name)
    check_composition(cfg_obj)
    return cfg_obj


def refuse_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's ``+key=value`` adds keys even to a typed config; refuse any outside the schema (the ``_target_``
    nodes excepted: their keys are constructor arguments, checked against the signature instead)."""
    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(
                f"{prefix}{key} is not allowed: not a key of {prefix.rstrip('.') or 'the config'} ({allowed})"
            )
        child = node._get_node(key)
        if is_dataclass(known[key].type) or isinstance(known[key].type, str) and _dataclass_of(known[key].type):
            sub = known[key].type if is_dataclass(known[key].type) else _dataclass_of(known[key].type)
            if isinstance(child, DictConfig) and not child._is_none():
                refuse_unknown_keys(child, sub, f"{prefix}{key}.")


def unknown_key(key: str) -> ConfigError | None:
    """The refusal for an override of a key the schema lacks (``privacy.targt_epsilon=3``), or None. Hydra's own
    answer advised ``+privacy.targt_epsilon=3``, which ``refuse_unknown_keys`` then refuses: name what is allowed now.
    Keys under a ``_target_`` node or an optional section are left to Hydra."""
    schema: type | None = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        known = {f.name: f for f in fields(schema)} if schema is not None else {}
        if schema is None or part == "hydra":
            return None
        if part not in known:
            prefix = ".".join(parts[:depth])
            allowed = ", ".join(sorted(known))
            return ConfigError(f"{key} is not allowed: not a key of {prefix or 'the config'} ({allowed})")
        kind = known[part].type
        schema = kind if is_dataclass(kind) else _dataclass_of(kind) if isinstance(kind, str) else None
        if schema is None and depth < len(parts) - 1 and _scalar(kind):  # train.lr.x=1; dataset.resize.a=1 crashed
            where = ".".join(parts[: depth + 1])
            return ConfigError(f"{key} is not allowed: {where} is one value ({_text(kind)}), not a section with keys")
    return None


# The modules whose dataclasses and enums the schema's string annotations name (``from __future__ import
# annotations`` leaves them as text).
_SCHEMA_MODULES = ("aisec_train.config", "aisec_train.data.config", "aisec_train.train.config",
                   "aisec_train.robust.config", "aisec_train.backdoor.config", "aisec_train.federated.config",
                   "aisec_train.audit.config", "aisec_train.tracking.config")  # fmt: skip


def _named(annotation: str) -> Any:
    import sys

    for module_name in _SCHEMA_MODULES:
        found = getattr(sys.modules.get(module_name), annotation, None)
        if found is not None:
            return found
    return None


def _dataclass_of(annotation: str) -> type | None:
    """The dataclass a string annotation names."""
    found = _named(annotation)
    return found if found is not None and is_dataclass(found) else None


def _text(kind: Any) -> str:
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def _scalar(kind: Any) -> bool:
    """Whether a field's annotation is one plain value (a number, text, flag, choice or list), possibly optional: what
    OmegaConf answered with ``Value '{}' of type 'dict' could not be converted to Float`` when given a sub-key."""
    import enum

    name = _text(kind).replace(" | None", "").strip()
    found = _named(name)
    plain = name in ("int", "float", "str", "bool") or name.startswith(("list[", "tuple["))  # a list is one value too
    return plain or (isinstance(found, type) and issubclass(found, enum.Enum))


# What a text run cannot do (text_run.py answers the stages' items with these words).
NO_PGD = "text inputs: embedding-space PGD not implemented"
NO_IMAGES = "text inputs: {what} (image-only, not implemented for token ids)"


def check_text_config(cfg: Config) -> None:
    """Refuse, before any work, what would run in pixel space on token ids (one line naming key and value)."""
    if cfg.dataset.name != "text":
        return
    refusals = [
        ("robustness.mode", cfg.robustness.mode.value, cfg.robustness.mode is not RobustMode.none, NO_PGD),
        ("backdoor.attack", cfg.backdoor.attack.value, cfg.backdoor.attack is not BackdoorAttack.none,
         "text inputs: image triggers (badnets, blended, wanet) cannot be stamped on token ids"),
        ("federated.mode", cfg.federated.mode.value, cfg.federated.mode is not FederatedMode.none,
         "federated text fine-tuning is not implemented yet"),
        ("dataset.augment", "set", cfg.dataset.augment.random_crop_padding > 0 or cfg.dataset.augment.horizontal_flip,
         "image augmentation on token ids"),
        ("dataset.normalize", cfg.dataset.normalize.mean, cfg.dataset.normalize.mean is not None,
         "pixel normalisation on token ids"),
        ("train.augmult", cfg.train.augmult, cfg.train.augmult > 1, "augmented views are image augmentations"),
        ("audit.canaries.kind", cfg.audit.canaries.kind.value, cfg.audit.canaries.kind.value != "mislabel",
         "noise canaries are images; use audit.canaries.kind=mislabel"),
    ]  # fmt: skip
    for key, value, bad, why in refusals:
        if bad:
            raise ConfigError(f"{key}={value!r} is not allowed with dataset=text: {why}")


def check_composition(cfg: Config) -> None:
    """Refuse combinations that would silently do less than the report claims."""
    check_text_config(cfg)  # token ids: no pixel-space training, poisoning, augmentation (text_run.py: the rest)
    fed, bd, priv = cfg.federated, cfg.backdoor, cfg.privacy
    federated = fed.mode is not FederatedMode.none
    if federated:
        require(
            cfg.train.distributed.nproc == 1,
            "train.distributed.nproc",
            cfg.train.distributed.nproc,
            "must be 1 with federated training (each Flower client trains in its own process)",
        )
        require(
            not bd.filter,
            "backdoor.filter",
            bd.filter,
            "false with federated training: the server holds no training records to filter and retrain on",
        )
        if bd.attack is not BackdoorAttack.none:  # badnets, blended or wanet: poisoned through malicious clients
            ok = 1 <= bd.malicious_clients <= fed.clients
            require(
                ok,
                "backdoor.malicious_clients",
                bd.malicious_clients,
                f"must be in [1, federated.clients={fed.clients}] with federated=fedavg backdoor=badnets "
                "(the clients that hold poisoned shards)",
            )
    else:
        require(
            bd.malicious_clients == 0,
            "backdoor.malicious_clients",
            bd.malicious_clients,
            "must be 0 without federated training (it counts poisoned Flower clients)",
        )
    if federated:
        _check_federated_dp(cfg)
    if federated and cfg.audit.privacy_audit:
        raise ConfigError(
            "audit.privacy_audit=True is not allowed with federated training: the one-run audit trains a canary model "
            "with the central recipe; auditing a federation would need canary clients (not implemented)"
        )
    if bd.malicious_clients and bd.attack is BackdoorAttack.none:
        raise ConfigError(
            f"backdoor.malicious_clients={bd.malicious_clients!r} is not allowed: it needs backdoor=badnets"
        )
    from aisec_train.train.augmult import check as check_augmult

    check_augmult(cfg)  # train.augmult needs instantiated per-sample gradients
    from aisec_train.train.sharding import check_strategy

    check_strategy(cfg)  # train.distributed.strategy=fsdp: what Opacus' FSDP2 path runs
    from aisec_train.train.launch import check_launch  # reads the env:// variables only (no torch)

    check_launch(cfg)  # under torchrun the launcher started the ranks: train.distributed.nproc must be 1
    two_forwards = cfg.robustness.mode is RobustMode.trades
    if priv.mode is PrivacyMode.dpsgd and two_forwards and priv.grad_sample_mode is GradSampleMode.ghost:
        raise ConfigError(
            "privacy.grad_sample_mode='ghost' is not allowed with robustness=trades: Opacus' ghost clipping "
            "norms each forward pass on its own, but TRADES feeds every record twice (clean and adversarial); "
            "allowed: bk or hooks, which clip the sum"
        )
    _check_low_precision_ghost(cfg, two_forwards)


def _check_low_precision_ghost(cfg: Config, two_forwards: bool) -> None:
    """bf16 under Opacus' ghost clipping breaks the per-record bound (train/precision.py, ``check_private_step``).
    The loop refuses it whatever chose ghost; this refuses, with the rest of the config and before data-parallel
    ranks launch, the choices the config already makes: ghost by name, FSDP, or bk's data-parallel ghost."""
    priv, dist = cfg.privacy, cfg.train.distributed
    if priv.mode is not PrivacyMode.dpsgd or cfg.train.precision == "32":
        return
    if cfg.train.precision == "fp16":  # aisec_train.fit reached the loop with it: only run's preflight refused it
        raise ConfigError(FP16_UNDER_DP)
    from aisec_train.train.launch import env_world  # reads the env:// variables only (no torch)

    ranks = dist.nproc > 1 or env_world() > 1  # torchrun's ranks too: they clip as train.distributed.nproc's do
    if priv.grad_sample_mode is GradSampleMode.ghost:
        why = "privacy.grad_sample_mode=ghost"
    elif ranks and dist.strategy == "fsdp":
        why = "train.distributed.strategy=fsdp clips with ghost_fsdp"
    elif ranks and priv.grad_sample_mode is GradSampleMode.bk and not two_forwards:
        why = f"{max(dist.nproc, env_world())} data-parallel ranks clip bk's steps with it"
    else:
        return
    raise ConfigError(
        f"train.precision={cfg.train.precision!r} is not allowed with Opacus' ghost clipping ({why}): it forms the "
        "clipped sum in a second backward through the bf16 forward, so a record's clipped gradient can exceed "
        "privacy.max_grad_norm; allowed: train.precision=32, or bf16 with privacy.grad_sample_mode=hooks, or "
        "with bk in one process"
    )


def _check_federated_dp(cfg: Config) -> None:
    """``federated.dp`` names the unit of privacy; ``privacy`` is record-level DP-SGD. They must agree."""
    dp, mode = cfg.federated.dp, cfg.privacy.mode
    if dp is FederatedDP.record and mode is not PrivacyMode.dpsgd:
        raise ConfigError(
            "federated.dp='record' is not allowed with privacy=none: record-level DP is each client's DP-SGD; "
            "allowed: privacy=dpsgd, or federated.dp=client (client-level) or none"
        )
    if dp in (FederatedDP.client, FederatedDP.none) and mode is PrivacyMode.dpsgd:
        raise ConfigError(
            f"federated.dp={dp.value!r} is not allowed with privacy=dpsgd: "
            + (
                "client-level DP (DP-FedAvg) replaces the clients' DP-SGD and has its own budget in "
                "federated.client_dp.*; allowed: privacy=none, or federated.dp=record"
                if dp is FederatedDP.client
                else "DP-SGD on the clients is record-level DP; allowed: privacy=none, or federated.dp=record"
            )
        )
