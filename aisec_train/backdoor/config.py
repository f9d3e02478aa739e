"""The schema of the ``backdoor`` group, next to the code that reads it (range checks in ``__post_init__``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from aisec_train.errors import require


class BackdoorAttack(Enum):
    none = "none"
    badnets = "badnets"  # Gu et al. 2017: a corner patch
    blended = "blended"  # Chen et al. 2017: a fixed noise key blended over the whole image
    wanet = "wanet"  # Nguyen and Tran 2021: a smooth, fixed warp of the image


class BackdoorMapping(Enum):
    all_to_one = "all_to_one"  # every poisoned sample is relabelled to ``target``
    all_to_all = "all_to_all"  # label y becomes (y + 1) mod K


class DetectionMethod(Enum):
    spectral = "spectral"  # spectral signatures (Tran et al. 2018)
    activation_clustering = "activation_clustering"  # Chen et al. 2018


class RepairMethod(Enum):
    none = "none"
    fine_pruning = "fine_pruning"  # Liu et al. 2018


class FinetuneHead(Enum):
    # re-initialise only the classifier (the last Linear after the feature layer) and steer it away from the
    # compromised one, so the features must shift: Feature Shift Tuning (Min et al. 2023; backdoor/retune.py)
    shift = "shift"
    reinit = "reinit"  # re-initialise every module after the feature layer before fine-tuning (backdoor/retune.py)
    keep = "keep"  # fine-tune the released head as it is (the earlier default; docs/backdoor.md)


class WeakTeacher(Enum):
    guarded = "guarded"  # distil without the class it leans to, on the rows it gets right (backdoor/prune.py)
    off = "off"  # no distillation below distill_min_teacher_accuracy (the earlier default)


class PatchPosition(Enum):
    bottom_right = "bottom_right"
    bottom_left = "bottom_left"
    top_right = "top_right"
    top_left = "top_left"


def _boost_ok(value: str) -> bool:
    if str(value) == "auto":
        return True
    try:
        return math.isfinite(float(value)) and float(value) >= 1.0  # a string field: no generic finiteness check
    except ValueError:
        return False


def _finite(ok: bool, key: str, value: float, rule: str) -> None:
    """A lower bound alone lets inf through (an inf lr trained and failed after the budget was charged)."""
    require(ok and math.isfinite(value), key, value, f"must be a finite number {rule}")


@dataclass
class BackdoorConfig:
    attack: BackdoorAttack = BackdoorAttack.none  # badnets|blended|wanet: red-team poisoning (backdoor/attacks.py)
    rate: float = 0.1  # fraction of the (remaining) training split poisoned; federated: of each malicious shard
    mapping: BackdoorMapping = BackdoorMapping.all_to_one
    target: int = 0  # all_to_one target class
    patch_size: int = 3  # trigger side in pixels: BadNets' 3x3 white square (docs/backdoor.md)
    patch_position: PatchPosition = PatchPosition.bottom_right
    patch_value: float = 1.0  # trigger pixel value on the [0, 1] scale
    blend_alpha: float = 0.2  # blended: x' = (1 - alpha) x + alpha key (Chen et al. poison at 0.2)
    # wanet: s, the warp's magnitude (mean displacement s/2 pixels). 1.0, not Nguyen and Tran's 0.5 (tuned on 32x32):
    # at 0.5 on 8x8 digits the non-private backdoor reached ASR 0.55-0.92 over seeds (docs/backdoor.md).
    warp_strength: float = 1.0
    warp_grid: int = 4  # wanet: k, the control grid's side (4 in the paper)
    trigger_seed: int = 0  # the attacker's key: blended's noise pattern, wanet's warp field (fixed per attacker)
    clean_fraction: float = 0.2  # stratified trusted clean reserve carved from the training split before poisoning
    trusted_path: str | None = None  # the defender's own clean .npz, outside the training data (replaces the reserve)
    detection: DetectionMethod = DetectionMethod.spectral  # the one reported as backdoor.detection (both run)
    detection_k: float = 3.0  # flag samples further than k reference deviations from the trusted clean data
    filter: bool = False  # drop the flagged samples and retrain (refused under DP: see docs/backdoor.md)
    repair: RepairMethod = RepairMethod.fine_pruning
    prune_acc_drop: float = 0.02  # stop pruning before trusted-set accuracy falls further than this
    finetune_epochs: int = 60
    finetune_lr: float = 0.1  # peak lr: warmed up over 10% of the steps, then cosine decay to 0
    finetune_batch_size: int = 32
    finetune_weight_decay: float = 0.02  # what erases the trigger path that clean data never exercises
    finetune_head: FinetuneHead = FinetuneHead.shift  # the head after the feature layer: shift | reinit | keep
    # The fine-tuned model reads half its rows blended with a fresh uniform-noise key at a weight drawn from
    # U(0, repair_blend); labels and teacher read them clean (train/objectives.py, BlendedInputs). 0: off. Why 0.15,
    # and what it did to the 36-run matrix: docs/backdoor.md, "Blended inputs in the repair".
    repair_blend: float = 0.15
    # The fine-tuned model reads each row, with this probability, with one random box of N(0, 1) noise (2-10% of the
    # image; train/objectives.py, ErasedInputs); labels and teacher read them clean. Only for a model the repair does
    # not distil from (the teacher gate's measures; prune.fine_prune). 0: off. docs/backdoor.md, "Erased boxes".
    repair_erase: float = 1.0
    shift_weight: float = 0.2  # FST's alpha: the penalty on <new classifier, old classifier> (finetune_head=shift)
    # Guard against a model FST does not suit: fine-tuned on half the trusted rows, FST must score within this of
    # the whole-head re-initialisation on the other half, or the repair re-initialises the whole head (1: no check).
    shift_max_cost: float = 0.1
    finetune_body_lr: float = 0.2  # the body's lr as a fraction of finetune_lr (the head gets finetune_lr)
    # Distillation from the pre-repair model while fine-tuning (backdoor/prune.py), used only when that model's
    # accuracy on the trusted data (held out from training) is at least distill_min_teacher_accuracy: a weaker
    # teacher's soft labels carried the backdoor back (docs/backdoor.md, "Repair by distillation"). weight 0: never.
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    distill_min_teacher_accuracy: float = 0.95
    # Below that gate, a teacher that beats fine-tuning alone by at least distill_min_advantage (both measured on
    # half the trusted rows, the student fine-tuned on the other half) is distilled from guarded: without the class
    # it leans to, on the rows it classifies correctly. One that does not (a DP model, which the non-private
    # fine-tuning alone overtakes) is not distilled from.
    distill_weak_teacher: WeakTeacher = WeakTeacher.guarded
    distill_min_advantage: float = 0.02
    # A guarded teacher is also distilled on the training split's inputs (their labels, some poisoned, unread; its
    # leaning class left out, and the rows it sends there), at this times distill_weight: what it knows beyond the
    # trusted rows. Central runs without DP only: under DP the fine-tuning would read private records without
    # noise, and a federated server holds no training data; there the trusted rows alone are read (the report's
    # distill.unlabelled_rows is 0). 0: never.
    distill_unlabelled_weight: float = 1.0
    # Once the repair has named the target from the training inputs (fine_pruning.named_target: central runs
    # without DP), a fresh model is trained without the rows labelled the target that the repaired model sends
    # elsewhere (the poisoned ones), plus the trusted rows, half its rows blended with fresh noise up to
    # relearn_blend; it is released only if it sends no class more of the training inputs than the repaired model
    # does by more than relearn_max_shift (backdoor/relearn.py; docs/backdoor.md). false: never.
    relearn: bool = True
    relearn_blend: float = 0.25
    # Rounds of clearing: each later round repairs the last retrained model the same way, clears the target's rows
    # that copy sends elsewhere too, and retrains (1: one retrain, as before 2026-12-06).
    relearn_rounds: int = 2
    relearn_max_shift: float = 0.05
    # The module whose output detection and Fine-Pruning read, as a dotted path (``layer4``, ``blocks.7``);
    # null: the last module producing a 4-D feature map before global pooling (backdoor/layers.py).
    feature_layer: str | None = None
    # Federated red team: the first K clients hold poisoned shards (federated=fedavg backdoor=badnets).
    malicious_clients: int = 0
    # Model replacement (Bagdasaryan et al. 2020): malicious clients scale their update by this; auto = clients per
    # round / server lr (backdoor/federated_poison.py); 1 = no boost.
    boost: str = "1"

    def __post_init__(self) -> None:
        require(0.0 < self.rate < 1.0, "backdoor.rate", self.rate, "must be in (0, 1)")
        require(self.target >= 0, "backdoor.target", self.target, "must be a class index >= 0")
        require(self.patch_size >= 1, "backdoor.patch_size", self.patch_size, "must be >= 1")
        require(0.0 <= self.patch_value <= 1.0, "backdoor.patch_value", self.patch_value, "must be in [0, 1]")
        require(0.0 < self.clean_fraction < 0.5, "backdoor.clean_fraction", self.clean_fraction, "must be in (0, 0.5)")
        require(0.0 < self.blend_alpha < 1.0, "backdoor.blend_alpha", self.blend_alpha, "must be in (0, 1)")
        _finite(self.warp_strength > 0, "backdoor.warp_strength", self.warp_strength, "> 0")
        require(self.warp_grid >= 2, "backdoor.warp_grid", self.warp_grid, "must be >= 2")
        seed = self.trigger_seed  # torch.Generator seeds: 2**64 used to fail in the poison stage with a traceback
        require(0 <= seed < 2**32, "backdoor.trigger_seed", seed, "must be in [0, 2**32), as train.seed")
        _finite(self.detection_k > 0, "backdoor.detection_k", self.detection_k, "> 0")
        require(0.0 <= self.prune_acc_drop < 1.0, "backdoor.prune_acc_drop", self.prune_acc_drop, "must be in [0, 1)")
        require(self.finetune_epochs >= 0, "backdoor.finetune_epochs", self.finetune_epochs, "must be >= 0")
        _finite(self.finetune_lr > 0, "backdoor.finetune_lr", self.finetune_lr, "> 0")
        require(self.finetune_batch_size >= 1, "backdoor.finetune_batch_size", self.finetune_batch_size, "must be >= 1")
        require(_boost_ok(self.boost), "backdoor.boost", self.boost, "must be auto or a finite number >= 1")
        require(self.malicious_clients >= 0, "backdoor.malicious_clients", self.malicious_clients, "must be >= 0")
        # Only a malicious client boosts its update: without one the setting would be silently ignored.
        unboosted = str(self.boost) != "auto" and float(self.boost) == 1.0 or self.malicious_clients > 0
        require(unboosted, "backdoor.boost", self.boost, "must be 1 unless backdoor.malicious_clients >= 1 (federated)")
        require(0.0 < self.finetune_body_lr <= 1.0, "backdoor.finetune_body_lr", self.finetune_body_lr, "in (0, 1]")
        require(0.0 <= self.repair_blend < 1.0, "backdoor.repair_blend", self.repair_blend, "must be in [0, 1)")
        require(0.0 <= self.repair_erase <= 1.0, "backdoor.repair_erase", self.repair_erase, "must be in [0, 1]")
        _finite(self.shift_weight >= 0, "backdoor.shift_weight", self.shift_weight, ">= 0")
        require(0.0 <= self.shift_max_cost <= 1.0, "backdoor.shift_max_cost", self.shift_max_cost, "must be in [0, 1]")
        decay = self.finetune_weight_decay
        _finite(decay >= 0, "backdoor.finetune_weight_decay", decay, ">= 0")
        require(0.0 <= self.distill_weight < 1.0, "backdoor.distill_weight", self.distill_weight, "must be in [0, 1)")
        unlabelled = self.distill_unlabelled_weight
        _finite(unlabelled >= 0, "backdoor.distill_unlabelled_weight", unlabelled, ">= 0")
        require(0.0 <= self.relearn_blend < 1.0, "backdoor.relearn_blend", self.relearn_blend, "must be in [0, 1)")
        rounds = self.relearn_rounds
        require(1 <= rounds <= 5, "backdoor.relearn_rounds", rounds, "must be an integer in [1, 5]")
        shift = self.relearn_max_shift
        require(0.0 < shift <= 1.0, "backdoor.relearn_max_shift", shift, "must be in (0, 1]")
        _finite(self.distill_temperature > 0, "backdoor.distill_temperature", self.distill_temperature, "> 0")
        gate = self.distill_min_teacher_accuracy
        require(0.0 <= gate <= 1.0, "backdoor.distill_min_teacher_accuracy", gate, "must be in [0, 1]")
        edge = self.distill_min_advantage
        require(-1.0 <= edge <= 1.0, "backdoor.distill_min_advantage", edge, "must be in [-1, 1]")
