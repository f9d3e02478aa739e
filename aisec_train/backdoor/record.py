"""The backdoor section of the report, its privacy scope and its checklist answers.

The checklist evidence is what the model card shows (report/outputs.py renders the checklist), so the Fine-Pruning
item says how the mask reached the released model, and says plainly when it is a structural wrapper that a loader
must install (backdoor/bake.py) rather than weights.
"""

from __future__ import annotations

from typing import Any

from aisec_train.backdoor import attacks, federated_poison
from aisec_train.backdoor.config import BackdoorMapping, RepairMethod
from aisec_train.backdoor.metrics import BackdoorMetrics, der, errors_to_target
from aisec_train.backdoor.state import BackdoorState
from aisec_train.backdoor.trusted import privacy_scope
from aisec_train.train.config import PrivacyMode

ASR_GOAL, ACC_DROP_GOAL = 0.05, 0.02  # the BackdoorBench-style bar the checklist holds the repair to
RECALL_GOAL = 0.8
ITEMS = {
    "detect": ("data pipeline", "validation against poisoning (spectral signatures, activation clustering)"),
    "prune": ("model", "pruning against poisoning (Fine-Pruning)"),
    "privacy": ("training", "defence data covered by the privacy claim"),
}
DETECTION_PRIVACY = (
    "detection scores are statistics of the training records, computed without DP from the model's activations "
    "and the red team's own poisoned indices; they are evaluation output for the operator, not part of the model"
)


def not_applicable(run) -> None:
    run.report.add("backdoor", enabled=False, asr_before=None, asr_after=None, detection=None)
    for area, item in ITEMS.values():
        run.report.check(area, item, "not_applicable", "backdoor.attack=none: no poisoning red team in this run")


def write(run, state: BackdoorState, stages: dict[str, BackdoorMetrics], scores: dict, repair: dict | None) -> None:
    bd = run.cfg.backdoor
    before, after = stages["trained"], list(stages.values())[-1]
    private = run.cfg.privacy.mode is PrivacyMode.dpsgd
    errors = {name: errors_to_target(m, run.data.num_classes) for name, m in (("before", before), ("after", after))}
    scope = privacy_scope(
        from_file=state.from_file, n_trusted=len(state.trusted), n_train=len(run.data.train), private=private
    )
    run.report.add(
        "backdoor",
        enabled=True,
        attack=bd.attack.value,
        rate=bd.rate,
        mapping=bd.mapping.value,
        target=bd.target if bd.mapping is BackdoorMapping.all_to_one else None,
        trigger=attacks.describe(state.trigger),
        n_poisoned=len(state.poisoned.indices),
        feature_layer=state.layer.path,
        feature_layer_detail=state.layer.describe(),
        n_trusted=len(state.trusted),
        trusted_source="backdoor.trusted_path" if state.from_file else "reserve carved from the training split",
        asr_before=before.asr,
        asr_after=after.asr,
        clean_accuracy_before=before.clean_accuracy,
        clean_accuracy_after=after.clean_accuracy,
        robust_accuracy_before=before.robust_accuracy,
        robust_accuracy_after=after.robust_accuracy,
        der=der(before, after),
        # the attacker's share of the model's mistakes on triggered inputs, against chance (metrics.errors_to_target)
        errors_to_target=errors,
        stages={name: {**m.as_dict(), "der": der(before, m)} for name, m in stages.items()},
        detection={k: v for k, v in scores[bd.detection.value].items() if k != "per_class"},
        detections=scores,
        fine_pruning=repair,
        privacy={"dp_training": private, "ledger_unchanged": True, **scope, "detection": DETECTION_PRIVACY},
    )
    if state.client_indices is not None:
        boost = {"boost": str(bd.boost), "boost_factor": federated_poison.boost_factor(run.cfg)}  # model replacement
        run.report.add("backdoor", federated=_federated(state) | boost)
    if private:
        run.report.add("privacy", scope=scope)
    _check_detection(run, scores)
    _check_repair(run, before, after, repair, errors["after"])
    _check_privacy(run, state, scope, private)


def _federated(state: BackdoorState) -> dict[str, Any]:
    assert state.client_indices is not None
    return {
        "malicious_clients": list(state.malicious_clients),
        "poisoned_per_client": list(state.poisoned_per_client),
        "shard_sizes": [len(rows) for rows in state.client_indices],
        "rate_of": "each malicious client's shard (eligible rows; the rest of the shard stays clean)",
        "defence_on": "the global model, with the trusted reserve carved before partitioning",
    }


def bake_sentence(bake: dict[str, Any] | None) -> str:
    """How the pruning mask reached the released model, in words (report and model card)."""
    if not bake or bake["method"] == "none":
        return "no channel pruned, nothing to bake"
    if bake["method"] == "structural":
        return (
            f"no weight-level bake verified ({', '.join(bake['not_verified']) or 'no candidate applied'}), so the "
            f"model is released with a structural ChannelMask wrapper at {bake['module']!r}: model.pt holds "
            f"'{bake['module']}.module.*' and '{bake['module']}.backdoor_channel_mask'; install it with "
            "aisec_train.backdoor.bake.install_released_masks before load_state_dict"
        )
    return f"mask baked into the weights ({bake['method']}: {bake['module']}), verified against the hooked model"


def _check_detection(run, scores: dict[str, dict[str, Any]]) -> None:
    spec, ac = scores["spectral"], scores["activation_clustering"]
    chosen = scores[run.cfg.backdoor.detection.value]
    run.report.check(
        *ITEMS["detect"],
        "pass" if chosen["recall"] >= RECALL_GOAL else "fail",
        f"on the poisoned training split ({chosen['poisoned']} poisoned of {len(run.data.train)}): spectral "
        f"signatures precision {spec['precision']:.3f} recall {spec['recall']:.3f}; activation clustering precision "
        f"{ac['precision']:.3f} recall {ac['recall']:.3f} (goal: recall >= {RECALL_GOAL} for "
        f"backdoor.detection={chosen['method']})",
    )


def _check_repair(run, before: BackdoorMetrics, after: BackdoorMetrics, repair: dict | None, errors: dict) -> None:
    if run.cfg.backdoor.repair is RepairMethod.none:
        run.report.check(*ITEMS["prune"], "not_applicable", "backdoor.repair=none")
        return
    drop = before.clean_accuracy - after.clean_accuracy
    ok = after.asr <= ASR_GOAL and drop <= ACC_DROP_GOAL
    # A model that never learned the backdoor leaves the repair nothing to remove: its low ASR after is no figure
    # of Fine-Pruning (the item used to pass on a run whose attack had not taken, ASR 0.000 -> 0.003). It still
    # fails if the repair cost clean accuracy.
    unlearned = before.asr <= ASR_GOAL
    status = "fail" if not ok else "not_applicable" if unlearned else "pass"
    why = (
        f"the trained model did not learn the backdoor (ASR {before.asr:.3f} <= {ASR_GOAL} before any repair), so "
        "the repair had nothing to remove and its figures are no evidence of Fine-Pruning; "
    )
    run.report.check(
        *ITEMS["prune"],
        status,
        (why if unlearned else "")
        + f"ASR {before.asr:.3f} -> {after.asr:.3f} (goal <= {ASR_GOAL}), clean accuracy {before.clean_accuracy:.3f} "
        f"-> {after.clean_accuracy:.3f} (drop {drop:+.3f}, goal <= {ACC_DROP_GOAL}), RA {before.robust_accuracy:.3f} "
        f"-> {after.robust_accuracy:.3f}, DER {der(before, after):.3f}; {_errors_sentence(errors)}; "
        f"layer {(repair or {}).get('feature_layer')}, {_released_sentence(repair or {})}; figure fine_pruning.png",
    )


def _released_sentence(repair: dict) -> str:
    """Which model the figures above are of: the repaired one (its mask's bake) or a relearned one."""
    done = repair.get("relearn")
    if not done:
        return bake_sentence(repair.get("bake"))
    if not done["retrained"]:
        return f"no relearning ({done['reason']}), so {bake_sentence(repair.get('bake'))}"
    rule = f"largest class shift {max(done['shift']):+.3f} against at most {done['max_shift']}"
    if done["released"] == "repaired":
        return f"relearning was refused by its guard ({rule}), so {bake_sentence(repair.get('bake'))}"
    return (
        f"released: a fresh model retrained without the {done['cleared_rows']} rows labelled class "
        f"{done['target']} that the repaired model sends elsewhere, plus the trusted rows ({done['trained_on']} "
        f"rows; guard: {rule}); no pruning mask"
    )


def _errors_sentence(errors: dict) -> str:
    if errors["share"] is None:
        return "no triggered input misclassified after repair"
    return (
        f"after repair the target takes {errors['to_target']} of {errors['errors']} misclassified triggered inputs "
        f"({errors['share']:.3f}; chance {errors['chance_share']:.3f}, one-sided binomial p {errors['p_value']:.3g}), "
        f"an ASR of {errors['asr_from_errors']:.3f} from errors alone"
    )


def _check_privacy(run, state: BackdoorState, scope: dict[str, Any], private: bool) -> None:
    if not private:
        run.report.check(*ITEMS["privacy"], "not_applicable", "privacy=none: this run makes no DP claim")
        return
    status = "pass" if scope["not_covered_records"] == 0 else "fail"
    run.report.check(*ITEMS["privacy"], status, scope["statement"])
