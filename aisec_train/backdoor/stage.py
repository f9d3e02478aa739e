"""The backdoor stages of the pipeline: ``poison`` (red team, before training) and ``defend`` (after it).

    poison: carve a trusted clean reserve, BadNets-poison the rest of the training split, record lineage
    defend: metrics before -> detection (both methods) -> [filter + retrain] -> Fine-Pruning -> metrics after

Both return at once when ``backdoor.attack=none``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from aisec_train.backdoor import badnets, detect, prune
from aisec_train.backdoor.features import flat_features
from aisec_train.backdoor.metrics import BackdoorMetrics, der, measure
from aisec_train.backdoor.plot import pruning_curve
from aisec_train.config import BackdoorAttack, BackdoorConfig, BackdoorMapping, ConfigError, PrivacyMode, RepairMethod
from aisec_train.data.dataset import Split
from aisec_train.models import build_model
from aisec_train.train.loop import accuracy, train

ASR_GOAL, ACC_DROP_GOAL = 0.05, 0.02  # the BackdoorBench-style bar the checklist holds the repair to


@dataclass
class BackdoorState:
    """What the defence stage needs and training never sees."""

    trigger: badnets.Trigger
    target_of: badnets.TargetOf
    poisoned: badnets.Poisoned
    trusted: Split


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
            "backdoor.filter=True is not allowed with privacy=dpsgd: retraining on a subset chosen by a non-private "
            "detector is outside the DP guarantee; set backdoor.filter=false or privacy=none"
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
    y = data.train.y.numpy()
    stratify = y if np.bincount(y).min() >= 2 else None
    kept, reserved = train_test_split(
        np.arange(len(y)), test_size=bd.clean_fraction, random_state=seed, stratify=stratify
    )
    kept, reserved = torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(reserved))
    trusted = Split(data.train.x[reserved], data.train.y[reserved])
    data.record("reserve_trusted_clean", n=len(reserved), fraction=bd.clean_fraction, seed=seed, used_for="defence")
    trigger = badnets.Trigger(bd.patch_size, bd.patch_position.value, bd.patch_value)
    target_of = _target_of(bd, data.num_classes)
    poisoned = badnets.poison(
        Split(data.train.x[kept], data.train.y[kept]), rate=bd.rate, trigger=trigger, target_of=target_of, seed=seed
    )
    data.train = poisoned.split
    data.record(
        "badnets_poison",
        rate=bd.rate,
        n_poisoned=len(poisoned.indices),
        mapping=bd.mapping.value,
        target=bd.target if bd.mapping is BackdoorMapping.all_to_one else None,
        trigger={"size": bd.patch_size, "position": bd.patch_position.value, "value": bd.patch_value},
        **badnets.fingerprint(poisoned),
    )
    run.backdoor = BackdoorState(trigger, target_of, poisoned, trusted)
    run.report.add("data", n_train=len(data.train), n_trusted=len(trusted))
    run.report.check(
        "data pipeline", "data lineage recorded", "pass", " -> ".join(step["step"] for step in data.lineage)
    )


def _not_applicable(run) -> None:
    run.report.add("backdoor", enabled=False, asr_before=None, asr_after=None, detection=None)
    for area, item in _ITEMS:
        run.report.check(area, item, "not_applicable", "backdoor.attack=none: no poisoning red team in this run")


_ITEMS = [
    ("data pipeline", "validation against poisoning (spectral signatures, activation clustering)"),
    ("model", "pruning against poisoning (Fine-Pruning)"),
]


def _detect(run, state: BackdoorState) -> dict[str, dict]:
    train_split, device = run.data.train, run.device
    feats = flat_features(run.model, train_split, device).numpy()
    ref = flat_features(run.model, state.trusted, device).numpy()
    labels, ref_labels = train_split.y.numpy(), state.trusted.y.numpy()
    found, scores = {}, {}
    for name, detector in detect.DETECTORS.items():
        kwargs = {"k": run.cfg.backdoor.detection_k} if name == "spectral" else {"seed": run.cfg.train.seed}
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

    def probe(m) -> dict[str, float]:
        return {"test_accuracy": accuracy(m, clean, device), "asr": accuracy(m, attack, device)}

    started = time.perf_counter()
    pruned = prune.prune(
        model, state.trusted, device, max_drop=bd.prune_acc_drop, probe=probe, backend=run.cfg.robustness.backend
    )
    with prune.masked(model, pruned.mask):
        prune.fine_tune(
            model,
            state.trusted,
            device,
            epochs=bd.finetune_epochs,
            lr=bd.finetune_lr,
            weight_decay=bd.finetune_weight_decay,
            batch_size=bd.finetune_batch_size,
            seed=run.cfg.train.seed,
        )
    prune.bake(model, pruned.mask, state.trusted.x[:256].to(device))
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
        _not_applicable(run)
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
    _record(run, state, stages, scores, repair)


def _record(run, state: BackdoorState, stages: dict[str, BackdoorMetrics], scores: dict, repair: dict | None) -> None:
    bd = run.cfg.backdoor
    before, after = stages["trained"], list(stages.values())[-1]
    private = run.cfg.privacy.mode is PrivacyMode.dpsgd
    run.report.add(
        "backdoor",
        enabled=True,
        attack=bd.attack.value,
        rate=bd.rate,
        mapping=bd.mapping.value,
        target=bd.target if bd.mapping is BackdoorMapping.all_to_one else None,
        trigger={"size": bd.patch_size, "position": bd.patch_position.value, "value": bd.patch_value},
        n_poisoned=len(state.poisoned.indices),
        n_trusted=len(state.trusted),
        asr_before=before.asr,
        asr_after=after.asr,
        clean_accuracy_before=before.clean_accuracy,
        clean_accuracy_after=after.clean_accuracy,
        robust_accuracy_before=before.robust_accuracy,
        robust_accuracy_after=after.robust_accuracy,
        der=der(before, after),
        stages={name: {**m.as_dict(), "der": der(before, m)} for name, m in stages.items()},
        detection={k: v for k, v in scores[bd.detection.value].items() if k != "per_class"},
        detections=scores,
        fine_pruning=repair,
        privacy={
            "dp_training": private,
            "ledger_unchanged": True,
            "trusted_data": "a stratified reserve carved from the training split before training; never trained on "
            "under DP, used by the defence without DP: those records are outside the (epsilon, delta) guarantee, "
            "which covers the records trained on (the defence only post-processes the DP model)",
        },
    )
    _checklist(run, scores, before, after)


def _checklist(run, scores: dict, before: BackdoorMetrics, after: BackdoorMetrics) -> None:
    spec, ac = scores["spectral"], scores["activation_clustering"]
    chosen = scores[run.cfg.backdoor.detection.value]
    run.report.check(
        *_ITEMS[0],
        "pass" if chosen["recall"] >= 0.8 else "fail",
        f"on the poisoned training split ({chosen['poisoned']} poisoned of {len(run.data.train)}): spectral "
        f"signatures precision {spec['precision']:.3f} recall {spec['recall']:.3f}; activation clustering precision "
        f"{ac['precision']:.3f} recall {ac['recall']:.3f}",
    )
    if run.cfg.backdoor.repair is RepairMethod.none:
        run.report.check(*_ITEMS[1], "not_applicable", "backdoor.repair=none")
        return
    drop = before.clean_accuracy - after.clean_accuracy
    ok = after.asr <= ASR_GOAL and drop <= ACC_DROP_GOAL
    run.report.check(
        *_ITEMS[1],
        "pass" if ok else "fail",
        f"ASR {before.asr:.3f} -> {after.asr:.3f} (goal <= {ASR_GOAL}), clean accuracy {before.clean_accuracy:.3f} "
        f"-> {after.clean_accuracy:.3f} (drop {drop:+.3f}, goal <= {ACC_DROP_GOAL}), RA {before.robust_accuracy:.3f} "
        f"-> {after.robust_accuracy:.3f}, DER {der(before, after):.3f}",
    )
