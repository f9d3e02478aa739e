"""The backdoor stages of the pipeline: ``poison`` (red team, before training) and ``defend`` (after it).

    poison: take the trusted clean data (own file, or a reserve carved from the training split), BadNets-poison
            the training split, record lineage
    defend: metrics before -> detection (both methods) -> [filter + retrain] -> Fine-Pruning -> metrics after
            -> report section, privacy scope and checklist (backdoor/record.py)

Both return at once when ``backdoor.attack=none``.
"""

from __future__ import annotations

import time

import torch

from aisec_train.backdoor import badnets, detect, prune, record, trusted
from aisec_train.backdoor.features import flat_features
from aisec_train.backdoor.metrics import BackdoorMetrics, measure
from aisec_train.backdoor.plot import pruning_curve
from aisec_train.backdoor.state import BackdoorState
from aisec_train.config import BackdoorAttack, BackdoorConfig, BackdoorMapping, ConfigError, PrivacyMode, RepairMethod
from aisec_train.data.dataset import Split
from aisec_train.models import build_model
from aisec_train.train.loop import train


def _state(run) -> BackdoorState | None:
    return getattr(run, "backdoor", None)


def _target_of(cfg: BackdoorConfig, num_classes: int) -> badnets.TargetOf:
    if cfg.mapping is BackdoorMapping.all_to_all:
        return badnets.all_to_all(num_classes)
    return badnets.all_to_one(cfg.target)


def _validate(run) -> None:
    cfg, data = run.cfg, run.data
    bd = cfg.backdoor
    if bd.filter and cfg.privacy.mode is PrivacyMode.dpsgd:
        raise ConfigError(
            "backdoor.filter=True is not allowed with privacy=dpsgd: the detector picks which records to drop by "
            "looking at each class's records together, so one record can change the retraining set by many and no "
            "DP accounting covers the retrain (docs/backdoor.md); allowed: backdoor.filter=false, or privacy=none"
        )
    if bd.mapping is BackdoorMapping.all_to_one and bd.target >= data.num_classes:
        raise ConfigError(f"backdoor.target={bd.target!r} is not allowed: must be < {data.num_classes} classes")
    side = data.image_size
    if bd.patch_size >= side:
        raise ConfigError(f"backdoor.patch_size={bd.patch_size!r} is not allowed: must be < the image side {side}")


def stage_poison(run) -> None:
    bd = run.cfg.backdoor
    if bd.attack is BackdoorAttack.none:
        return
    _validate(run)
    data, seed = run.data, run.cfg.train.seed
    if bd.trusted_path:
        clean = trusted.load_trusted(bd.trusted_path, data)
        data.record(
            "trusted_clean_set",
            source="backdoor.trusted_path",
            sha256=trusted.trusted_file_sha256(bd.trusted_path),
            n=len(clean),
            used_for="defence",
        )
    else:
        data.train, clean = trusted.carve_reserve(data, bd.clean_fraction, seed)
        data.record("reserve_trusted_clean", n=len(clean), fraction=bd.clean_fraction, seed=seed, used_for="defence")
    trigger = badnets.Trigger(bd.patch_size, bd.patch_position.value, bd.patch_value)
    target_of = _target_of(bd, data.num_classes)
    poisoned = badnets.poison(data.train, rate=bd.rate, trigger=trigger, target_of=target_of, seed=seed)
    data.train = poisoned.split  # a plain Split: the poisoned indices stay in run.backdoor, away from training
    data.record(
        "badnets_poison",
        rate=bd.rate,
        n_poisoned=len(poisoned.indices),
        mapping=bd.mapping.value,
        target=bd.target if bd.mapping is BackdoorMapping.all_to_one else None,
        trigger={"size": bd.patch_size, "position": bd.patch_position.value, "value": bd.patch_value},
        **badnets.fingerprint(poisoned),
    )
    run.backdoor = BackdoorState(trigger, target_of, poisoned, clean, from_file=bool(bd.trusted_path))
    run.report.add("data", n_train=len(data.train), n_trusted=len(clean))
    run.report.check(
        "data pipeline", "data lineage recorded", "pass", " -> ".join(step["step"] for step in data.lineage)
    )


def _detect(run, state: BackdoorState) -> dict[str, dict]:
    train_split, device = run.data.train, run.device
    feats = flat_features(run.model, train_split, device).numpy()
    ref = flat_features(run.model, state.trusted, device).numpy()
    labels, ref_labels = train_split.y.numpy(), state.trusted.y.numpy()
    found, scores = {}, {}
    for name, detector in detect.DETECTORS.items():
        kwargs = {"seed": run.cfg.train.seed} | ({"k": run.cfg.backdoor.detection_k} if name == "spectral" else {})
        found[name] = detector(feats, labels, ref, ref_labels, **kwargs)
        scores[name] = detect.score(found[name], state.poisoned.indices, len(train_split))
        scores[name]["per_class"] = found[name].per_class
    run.backdoor_found = found[run.cfg.backdoor.detection.value]
    return scores


def _filter_and_retrain(run, splits) -> BackdoorMetrics:
    found, data, cfg = run.backdoor_found, run.data, run.cfg
    keep = torch.ones(len(data.train), dtype=torch.bool)
    keep[torch.from_numpy(found.flagged)] = False
    filtered = Split(data.train.x[keep], data.train.y[keep])
    data.record("filter_flagged", method=found.method, dropped=int((~keep).sum()), n_train=int(keep.sum()))
    torch.manual_seed(cfg.train.seed)
    model = build_model(
        cfg.model.name.value, in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size
    )
    run.model = train(model, filtered, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=run.device).model
    return measure(run.model, *splits, run.device)


def _fine_prune(run, state: BackdoorState, splits) -> tuple[BackdoorMetrics, dict]:
    bd, model, device = run.cfg.backdoor, run.model, run.device
    clean, attack, _ = splits
    started = time.perf_counter()
    pruned = prune.fine_prune(
        model,
        state.trusted,
        device,
        bd,
        evaluate={"test_accuracy": clean, "asr": attack},
        backend=run.cfg.robustness.backend,
        seed=run.cfg.train.seed,
    )
    seconds = time.perf_counter() - started
    after = measure(model, *splits, device)
    pruning_curve(pruned.curve, pruned.pruned_fraction, after.as_dict(), run.run_dir / "fine_pruning.png")
    details = {
        "pruned_channels": int((pruned.mask == 0).sum()),
        "channels": pruned.mask.numel(),
        "pruned_fraction": pruned.pruned_fraction,
        "trusted_accuracy_before": pruned.base_accuracy,
        "trusted_accuracy_pruned": pruned.accuracy,
        "acc_drop_budget": bd.prune_acc_drop,
        "finetune": {
            "epochs": bd.finetune_epochs,
            "lr": bd.finetune_lr,
            "weight_decay": bd.finetune_weight_decay,
            "batch_size": bd.finetune_batch_size,
            "n_trusted": len(state.trusted),
        },
        "curve": pruned.curve,
        "plot": "fine_pruning.png",
        "seconds": round(seconds, 3),
    }
    return after, details


def stage_defend(run) -> None:
    state = _state(run)
    if state is None:
        record.not_applicable(run)
        return
    bd, data, device = run.cfg.backdoor, run.data, run.device
    attack, truth = badnets.triggered(data.test, state.trigger, state.target_of)
    splits = (data.test, attack, truth)
    ledger = run.result.ledger if run.result else None
    steps_before = ledger.steps if ledger is not None else None

    stages = {"trained": measure(run.model, *splits, device)}
    scores = _detect(run, state)
    if bd.filter:
        stages["filtered"] = _filter_and_retrain(run, splits)
    repair = None
    if bd.repair is RepairMethod.fine_pruning:
        stages["fine_pruned"], repair = _fine_prune(run, state, splits)
    if ledger is not None and ledger.steps != steps_before:
        raise RuntimeError("the backdoor defence touched the privacy ledger; it must only post-process the DP model")
    record.write(run, state, stages, scores, repair)
