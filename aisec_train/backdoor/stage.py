"""The backdoor stages of the pipeline: ``poison`` (red team, before training) and ``defend`` (after it).

    poison: resolve the feature layer once (backdoor.feature_layer or automatic, on a fresh model from the
            factory) -> trusted clean data (own file, or a stratified reserve carved from the training split) ->
            the attack's poisoned view (backdoor/attacks.py: badnets, blended, wanet) over the training split
            (central), or over the first K clients' shards (federated) -> lineage, report
    defend: metrics before -> detection (both methods) -> [filter + retrain] -> Fine-Pruning -> [relearn: a fresh
            model without the rows the repair clears, kept if it passes its guard] -> metrics after -> report
            section, privacy scope and checklist (backdoor/record.py)

``poison_data(cfg, data, factory)`` is the poison stage without the report, for a process that rebuilds the data
from the config (a federated SuperNode). Both stages return at once when ``backdoor.attack=none``. Nothing here
holds a whole split: training, detection and metrics stream over dataset views.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from aisec_train.backdoor import attacks, badnets, detect, federated_poison, prune, record, relearn, trusted
from aisec_train.backdoor.config import BackdoorAttack, BackdoorConfig, BackdoorMapping, RepairMethod
from aisec_train.backdoor.features import detection_features, features_mode
from aisec_train.backdoor.layers import resolve_feature_layer
from aisec_train.backdoor.metrics import BackdoorMetrics, measure
from aisec_train.backdoor.plot import pruning_curve
from aisec_train.backdoor.state import BackdoorState
from aisec_train.data.views import labels_of, subset
from aisec_train.errors import ConfigError
from aisec_train.federated.config import FederatedMode
from aisec_train.train.config import PrivacyMode
from aisec_train.train.loop import train
from aisec_train.train.objectives import BlendedInputs, CrossEntropy, objective_from_config


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
    side = min(data.input_shape[1:])
    if bd.attack is BackdoorAttack.badnets and bd.patch_size >= side:
        raise ConfigError(f"backdoor.patch_size={bd.patch_size!r} is not allowed: must be < the image side {side}")
    if bd.attack is BackdoorAttack.wanet and bd.warp_grid > side:
        # the warp used to fall back silently to a side x side grid: a per-pixel jitter, not the configured field
        raise ConfigError(f"backdoor.warp_grid={bd.warp_grid!r} is not allowed: must be <= the image side {side}")
    if not len(badnets.eligible_rows(labels_of(data.test), _target_of(bd, data.num_classes))):
        # ASR and RA would be over no triggered input (the run trained, then failed in the defence stage)
        what = f"class {bd.target}" if bd.mapping is BackdoorMapping.all_to_one else "one class"
        raise ConfigError(
            f"backdoor.target={bd.target!r} is not allowed for this data: every test row is {what}, so no triggered "
            "test input would measure the attack; allowed: a target the test split holds rows outside of"
        )


def _require_poison(bd: BackdoorConfig, poisoned: badnets.Poisoned, n_rows: int, federated: bool) -> None:
    """Refuse a red team that poisoned nothing: detection recall, ASR and the repair would be figures of an attack
    that never ran (the run used to train and report recall 0.000 against 0 poisoned rows)."""
    if len(poisoned.indices):
        return
    where = f"the first {bd.malicious_clients} clients' shards" if federated else f"the {n_rows} training rows"
    raise ConfigError(
        f"backdoor.rate={bd.rate!r} is not allowed for this data: it poisons 0 of {where} (round(rate x rows), "
        "drawn among rows whose label the mapping changes); raise backdoor.rate"
        + ("" if federated else f" to at least {1 / max(n_rows, 1):.3g}")
    )


def _trusted(cfg, data):
    bd, seed = cfg.backdoor, cfg.train.seed
    if bd.trusted_path:
        clean, sha = trusted.read_trusted(bd.trusted_path, data)
        data.record("trusted_clean_set", source="backdoor.trusted_path", sha256=sha, n=len(clean), used_for="defence")
        return clean
    data.train, clean = trusted.carve_reserve(data.train, bd.clean_fraction, seed)
    data.record("reserve_trusted_clean", n=len(clean), fraction=bd.clean_fraction, seed=seed, used_for="defence")
    return clean


def poison_data(cfg, data, factory) -> BackdoorState:
    """The red team on ``data`` (its ``train`` becomes the poisoned view; lineage recorded): deterministic in the
    config and seed, so a process that rebuilds the data from the config (a federated SuperNode) gets the same
    rows, shards and trigger by calling it again."""
    bd, seed = cfg.backdoor, cfg.train.seed
    layer = resolve_feature_layer(factory(seed=seed), data.input_shape, bd.feature_layer)
    clean = _trusted(cfg, data)  # before any partition: the reserve never reaches a client
    trigger = attacks.make_trigger(bd)  # backdoor.attack's trigger: badnets patch, blended key or wanet warp
    target_of = _target_of(bd, data.num_classes)
    parts, per_client = None, []
    if bd.malicious_clients:
        parts = federated_poison.client_partition(labels_of(data.train), cfg)
        poisoned, per_client = federated_poison.poison_clients(
            data.train, parts, bd.malicious_clients, rate=bd.rate, trigger=trigger, target_of=target_of, seed=seed
        )
    else:
        poisoned = badnets.poison(data.train, rate=bd.rate, trigger=trigger, target_of=target_of, seed=seed)
    _require_poison(bd, poisoned, len(data.train), parts is not None)
    data.train = poisoned.view  # stamped and relabelled as rows are read; augmentation applies after the stamp
    scope = {"malicious_clients": bd.malicious_clients, "poisoned_per_client": per_client} if parts else {}
    data.record(
        f"{bd.attack.value}_poison",
        rate=bd.rate,
        rate_of="each malicious client's shard" if parts else "the training split",
        n_poisoned=len(poisoned.indices),
        mapping=bd.mapping.value,
        target=bd.target if bd.mapping is BackdoorMapping.all_to_one else None,
        trigger=attacks.describe(trigger),
        **scope,
        **badnets.fingerprint(poisoned, trigger, target_of),
    )
    return BackdoorState(
        trigger, target_of, poisoned, clean, bool(bd.trusted_path), layer,
        client_indices=tuple(parts) if parts else None,
        malicious_clients=tuple(range(bd.malicious_clients)),
        poisoned_per_client=tuple(per_client),
    )  # fmt: skip


def stage_poison(run) -> None:
    """The red team, then (whatever backdoor.attack) the audit's limits that need the final training split: the
    last stage before training, so a refusal comes before any step is trained or charged."""
    from aisec_train.audit.stage import check_before_training

    if run.cfg.backdoor.attack is BackdoorAttack.none:
        check_before_training(run)
        return
    _validate(run)
    run.backdoor = state = poison_data(run.cfg, run.data, run.factory)
    run.report.add("data", n_train=len(run.data.train), n_trusted=len(state.trusted))
    run.report.add("backdoor", feature_layer=state.layer.path, feature_layer_detail=state.layer.describe())
    check_before_training(run)  # on the split the reserve left: what the audit stage will read


def _detect(run, state: BackdoorState) -> dict[str, dict]:
    train_split, device, path = run.data.train, run.device, state.layer.path
    feats = detection_features(run.model, path, train_split, device)
    ref = detection_features(run.model, path, state.trusted, device)
    labels, ref_labels = labels_of(train_split), labels_of(state.trusted)
    scores = {}
    for name, detector in detect.DETECTORS.items():
        kwargs = {"seed": run.cfg.train.seed} | ({"k": run.cfg.backdoor.detection_k} if name == "spectral" else {})
        state.detections[name] = detector(feats, labels, ref, ref_labels, **kwargs)
        scores[name] = detect.score(state.detections[name], state.poisoned.indices, len(train_split))
        scores[name]["per_class"] = state.detections[name].per_class
        scores[name]["features"] = features_mode(state.layer.map_shape)
    return scores


def _kept_rows(run, state: BackdoorState) -> np.ndarray:
    """The training rows ``backdoor.filter`` keeps: all but those the reported detector flagged."""
    found = state.detections[run.cfg.backdoor.detection.value]
    return np.setdiff1d(np.arange(len(run.data.train)), found.flagged)


def _filter_and_retrain(run, state: BackdoorState, splits) -> BackdoorMetrics:
    cfg, data = run.cfg, run.data
    found = state.detections[cfg.backdoor.detection.value]
    keep = _kept_rows(run, state)
    data.record("filter_flagged", method=found.method, dropped=len(data.train) - len(keep), n_train=len(keep))
    run.model = train(
        run.factory(seed=cfg.train.seed),
        data.training_view(subset(data.train, keep)),
        train_cfg=cfg.train,
        privacy_cfg=cfg.privacy,  # privacy=none: filtering under DP is refused before training
        device=run.device,
        objective=objective_from_config(cfg.robustness),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        workers=cfg.dataset.workers,
        progress=False,
    ).model
    return measure(run.model, *splits, run.device)


def unlabelled_split(run, state: BackdoorState):
    """The training split, for the repair's guarded distillation and relearning (naming the target from its
    inputs, then retraining on its rows): only where reading it without noise breaks no claim (no DP) and the process
    holds it (central: a federated server does not), and one of the two is on. After ``backdoor.filter``, the rows
    it kept: the flagged ones are the suspected poison."""
    cfg = run.cfg
    private = cfg.privacy.mode is not PrivacyMode.none
    wanted = cfg.backdoor.distill_unlabelled_weight or cfg.backdoor.relearn
    if private or cfg.federated.mode is not FederatedMode.none or not wanted:
        return None
    return subset(run.data.train, _kept_rows(run, state)) if cfg.backdoor.filter else run.data.train


def _fine_prune(run, state: BackdoorState, splits) -> tuple[BackdoorMetrics, dict]:
    bd, model, device = run.cfg.backdoor, run.model, run.device
    clean, attack, _ = splits
    started = time.perf_counter()
    pruned = _repair(run, state, model, evaluate={"test_accuracy": clean, "asr": attack})
    seconds = time.perf_counter() - started
    after = measure(model, *splits, device)
    pruning_curve(pruned.curve, pruned.pruned_fraction, after.as_dict(), run.run_dir / "fine_pruning.png")
    details = {
        "feature_layer": state.layer.path,
        "pruned_channels": int((pruned.mask == 0).sum()),
        "channels": pruned.mask.numel(),
        "pruned_fraction": pruned.pruned_fraction,
        "step": pruned.step,
        "evaluation": pruned.evaluation,
        "trusted_accuracy_before": pruned.base_accuracy,
        "trusted_accuracy_pruned": pruned.accuracy,
        "acc_drop_budget": bd.prune_acc_drop,
        "finetune": {
            "head": pruned.head_mode,  # what ran: shift | reinit | keep | off
            "reinitialised": pruned.head if pruned.head_mode in ("shift", "reinit") else [],
            "shift_weight": bd.shift_weight if pruned.head_mode == "shift" else None,
            "head_check": pruned.head_check,  # held-out trusted accuracy of FST and of reinit, and the choice
            "blend": bd.repair_blend,  # the student's inputs blended with fresh noise keys up to this weight (0: off)
            "erase": bd.repair_erase,  # the share of the student's rows with a random noise box (0: off) ...
            "erase_check": pruned.erase_check,  # ... used only for a model the repair does not distil from
            "body_lr": bd.finetune_body_lr,
            "epochs": bd.finetune_epochs,
            "lr": bd.finetune_lr,
            "weight_decay": bd.finetune_weight_decay,
            "batch_size": bd.finetune_batch_size,
            "n_trusted": len(state.trusted),
            "distill": {
                "used": pruned.distilled,
                **pruned.distill,
                "teacher_trusted_accuracy": pruned.base_accuracy,
                "min_teacher_accuracy": bd.distill_min_teacher_accuracy,
                "weak_teacher": bd.distill_weak_teacher.value,
                "min_advantage": bd.distill_min_advantage,
                "weight": bd.distill_weight,
                "temperature": bd.distill_temperature,
                "unlabelled_weight": bd.distill_unlabelled_weight,
            },
        },
        "named_target": pruned.named_target,  # from the training inputs (central, no DP): relearning's class
        "bake": pruned.baked.describe() if pruned.baked else None,
        "curve": pruned.curve,
        "plot": "fine_pruning.png",
        "seconds": round(seconds, 3),
    }
    return after, details


def _relearn(run, state: BackdoorState, splits, repair: dict) -> BackdoorMetrics | None:
    """backdoor/relearn.py after the repair, when it named the target from the training inputs (``named_target``:
    central runs without DP, whatever the teacher); adds
    ``repair["relearn"]``. Returns the retrained model's metrics when it is released (``run.model`` is then it)."""
    cfg, device = run.cfg, run.device
    bd, named = cfg.backdoor, repair["named_target"]
    rows = unlabelled_split(run, state)  # the split the repair read: central, no DP (after a filter, its kept rows)
    if not bd.relearn or rows is None or named is None:
        repair["relearn"] = None
        return None
    if bd.mapping is not BackdoorMapping.all_to_one:  # poison under every label: clearing one class leaves it in
        repair["relearn"] = {"target": named["class"], "released": "repaired", "retrained": False,
                             "reason": f"backdoor.mapping={bd.mapping.value}: relearning clears one class's rows and "
                                       "needs an all-to-one backdoor"}  # fmt: skip
        return None
    started = time.perf_counter()
    target = named["class"]
    sent, labels = relearn.predictions(run.model, rows, device)
    clear = relearn.cleared(sent, labels, target)
    objective = objective_from_config(cfg.robustness)
    blend = bd.relearn_blend if isinstance(objective, CrossEntropy) else 0.0  # adversarial objectives: as trained
    if blend > 0:
        objective = BlendedInputs(objective, blend, cfg.train.seed)
    # The red team knows which rows it poisoned: how many the rule cleared and how many the retrain still read.
    # Evaluation output, like the metrics: neither the clearing nor the guard reads it.
    positions = _kept_rows(run, state) if bd.filter else np.arange(len(run.data.train))
    poisoned = np.isin(positions, state.poisoned.indices)
    cleared_by_round, kept_by_round, model = [], [], None
    for round_ in range(bd.relearn_rounds):
        if model is not None:
            # A retrain that read a few poisoned rows the last repair kept has a weaker backdoor than the trained
            # model, so the same repair of it sends more of them to their true class; the target stays the one
            # first named. It trained without the trusted rows, so the repair's fine-tuning on them still teaches.
            judged = _repaired_copy(run, state, model)
            clear |= relearn.cleared(relearn.predictions(judged, rows, device)[0], labels, target)
        cleared_by_round.append(int(clear.sum()))
        kept_by_round.append(int((~clear & poisoned).sum()))
        last = round_ == bd.relearn_rounds - 1
        view = relearn.training_rows(rows, ~clear, state.trusted if last else None)
        model = _retrain(run, view, objective)
        if not relearn.finite(model):  # a diverged retrain is never repaired or released
            break
    shift = relearn.share_shift(relearn.predictions(model, rows, device)[0], sent, run.data.num_classes)
    released = max(shift) <= bd.relearn_max_shift and relearn.finite(model)
    done = relearn.Relearned(target, int(clear.sum()), len(view), shift, released, model, cleared_by_round)
    metrics = measure(model, *splits, device)
    repair["relearn"] = done.describe(bd.relearn_max_shift, blend) | {
        "retrained": True,
        "poisoned_cleared": int((clear & poisoned).sum()),
        "poisoned_kept": int((~clear & poisoned).sum()),
        "poisoned_kept_by_round": kept_by_round,
        "metrics": metrics.as_dict(),  # evaluation output, whether released or not (the guard never reads it)
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not done.released:
        return None
    run.model = model
    return metrics


def _retrain(run, view, objective):
    """A fresh model from the run's factory, trained on ``view`` with the run's own training config and seed."""
    cfg = run.cfg
    return train(
        run.factory(seed=cfg.train.seed),
        run.data.training_view(view),
        train_cfg=cfg.train,
        privacy_cfg=cfg.privacy,  # privacy=none: unlabelled_split is None under DP
        device=run.device,
        objective=objective,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        workers=cfg.dataset.workers,
        progress=False,
    ).model


def _repair(run, state: BackdoorState, model, evaluate: dict | None = None) -> prune.Pruned:
    """``prune.fine_prune`` of ``model``, in place, as the defend stage repairs: the run's trusted rows, config and
    seed (``evaluate``: test-split curves for the report, read by nothing that decides)."""
    return prune.fine_prune(
        model,
        state.layer.path,
        state.trusted,
        run.device,
        run.cfg.backdoor,
        evaluate=evaluate,
        backend=run.cfg.robustness.backend,
        seed=run.cfg.train.seed,
        finetune_view=run.data.training_view(state.trusted),
        unlabelled=unlabelled_split(run, state),
    )


def _repaired_copy(run, state: BackdoorState, model):
    """A copy of ``model`` repaired as the trained one was: what a later relearning round reads the rows with."""
    again = copy.deepcopy(model)
    _repair(run, state, again)
    return again


def stage_defend(run) -> None:
    state = run.backdoor
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
        stages["filtered"] = _filter_and_retrain(run, state, splits)
    repair = None
    if bd.repair is RepairMethod.fine_pruning:
        stages["fine_pruned"], repair = _fine_prune(run, state, splits)
        relearned = _relearn(run, state, splits, repair)
        if relearned is not None:
            stages["relearned"] = relearned
    if ledger is not None and ledger.steps != steps_before:
        raise RuntimeError("the backdoor defence touched the privacy ledger; it must only post-process the DP model")
    record.write(run, state, stages, scores, repair)
