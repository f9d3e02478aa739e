"""Fine-Pruning (Liu et al. 2018) on any model: mask the least-active channels of the feature layer, fine-tune.

1. rank the feature layer's channels by mean activation on trusted clean data (activation-statistics kernel);
2. mask them in increasing order while accuracy on the trusted data stays within ``max_drop`` of the start (the
   first breach ends pruning, as in Liu et al.); beyond :data:`POINTS` channels they are pruned in equal groups,
   so a 512-channel layer costs 65 evaluations, not 513;
3. fine-tune on the trusted data through the one training loop, the mask held in place by a forward hook, the
   classifier re-initialised and steered off the old one (Feature Shift Tuning), the body at a fifth of the
   learning rate (backdoor/retune.py), distilling
   from the pre-repair model when it knows more than the trusted data can re-teach (:func:`teacher_for`);
4. bake the mask into the released model, verified (backdoor/bake.py).

The mask is a forward hook on the feature layer (backdoor/layers.py), so nothing here depends on the architecture.

>>> pruned = fine_prune(model, "layer4", trusted, device, BackdoorConfig())   # the four steps, in place
>>> pruned.mask, pruned.curve, pruned.baked.method                           # what was pruned, the plot, the bake
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from aisec_kernels import ChannelStats, channel_stats
from torch import nn
from torch.utils.data import Dataset

from aisec_train.backdoor import retune
from aisec_train.backdoor.bake import Baked, bake
from aisec_train.backdoor.config import BackdoorConfig, FinetuneHead, WeakTeacher
from aisec_train.backdoor.features import activation_stats, masked_accuracy
from aisec_train.backdoor.layers import masked, network
from aisec_train.data.views import materialize, subset
from aisec_train.train.config import TrainConfig
from aisec_train.train.loop import accuracy, train
from aisec_train.train.objectives import (
    BlendedInputs,
    CrossEntropy,
    Distillation,
    ErasedInputs,
    FeatureShift,
    UnlabelledDistillation,
)

POINTS = 64  # most pruning steps evaluated (plus the unpruned start)
CURVE_SAMPLES = 2048  # rows of each plot-only split the curve is measured on (a seeded sample beyond this)
PROBE_SAMPLES = 256  # trusted inputs on which the bake is verified
MIN_HELD_OUT = 20  # trusted rows below which the held-out comparison (and so guarded distillation) is not run
UNLABELLED_SAMPLES = 4096  # training inputs a guarded teacher is distilled on at most (a seeded sample beyond this)


@dataclass
class Pruned:
    mask: torch.Tensor  # (C,) float, 1 keeps a channel
    order: list[int]  # channels in pruning order (increasing mean activation)
    mean_activation: list[float]
    base_accuracy: float  # trusted-set accuracy before pruning
    accuracy: float  # trusted-set accuracy with the mask
    step: int = 1  # channels pruned per evaluated step
    evaluation: str = "replay"  # how masked accuracy was measured: cached replay or full forward passes
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per evaluated pruned count
    baked: Baked | None = None
    head: list[str] = field(default_factory=list)  # modules trained at the full lr (re-initialised, or kept)
    head_mode: str = "off"  # the fine-tuning's head mode that ran: shift | reinit | keep | off (no fine-tuning)
    distilled: bool = False  # whether fine-tuning distilled from the pre-repair model (:func:`teacher_for`)
    distill: dict = field(default_factory=dict)  # how: mode, the held-out comparison, the class left out
    head_check: dict | None = None  # FST against the whole-head re-initialisation on held-out trusted rows
    # Whether erased boxes (backdoor.repair_erase) were used, and the teacher gate's measures they follow: {trusted_
    # accuracy, teacher, student (held-out trusted accuracy of the model and of fine-tuning alone; None when not
    # measured), used}; None when boxes are off or there is no fine-tuning.
    erase_check: dict | None = None
    # The backdoor's target as the training inputs name it (:func:`suspected_target`; only when they are read):
    # {class, rule, lean, excess, scores}. A guarded teacher leaves this class out; relearning clears its rows.
    named_target: dict | None = None

    @property
    def pruned_fraction(self) -> float:
        return float(1.0 - self.mask.mean())


def rank_channels(maps: torch.Tensor, backend: str = "auto") -> tuple[list[int], ChannelStats]:
    """Channels of the (N, C, H, W) clean feature maps in pruning order: increasing mean activation.

    The statistics come from the activation-statistics kernel's dispatch (Triton on CUDA or under
    ``TRITON_INTERPRET=1``, its torch reference otherwise); ties keep channel order (stable sort).
    """
    stats = channel_stats(maps, backend=backend)
    return order_of(stats), stats


def order_of(stats: ChannelStats) -> list[int]:
    return torch.argsort(stats.mean.cpu(), stable=True).tolist()


def _bounded(dataset: Dataset, seed: int, most: int = CURVE_SAMPLES) -> Dataset:
    n = len(dataset)  # type: ignore[arg-type]
    if n <= most:
        return dataset
    return subset(dataset, np.sort(np.random.default_rng(seed).choice(n, most, replace=False)))


def prune(
    model: nn.Module,
    path: str,
    trusted: Dataset,
    device: torch.device,
    *,
    max_drop: float,
    evaluate: dict[str, Dataset] | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> Pruned:
    """Choose the mask; ``evaluate`` adds one accuracy column per named dataset to the curve, for the plot only.

    The curve runs to every channel pruned; the decision reads the trusted data alone.
    """
    stats = activation_stats(model, path, trusted, device, backend)
    order = order_of(stats)
    channels = len(order)
    step = max(1, math.ceil(channels / POINTS))
    trusted_acc, mode = masked_accuracy(model, path, trusted, device)
    evaluate = evaluate or {}
    probes = {name: masked_accuracy(model, path, _bounded(ds, seed), device)[0] for name, ds in evaluate.items()}
    base = trusted_acc(None)
    chosen, chosen_acc, stopped, curve = 0, base, False, []
    for count in sorted({*range(0, channels, step), channels}):
        mask = torch.ones(channels)
        mask[order[:count]] = 0.0
        acc = trusted_acc(mask) if count else base
        row = {"pruned": count, "fraction": count / channels, "trusted_accuracy": acc}
        row.update({name: probe(mask) for name, probe in probes.items()})
        curve.append(row)
        if not stopped and base - acc <= max_drop:
            chosen, chosen_acc = count, acc
        else:
            stopped = True  # the first breach of the budget ends the pruning, as in Liu et al.
    final = torch.ones(channels)
    final[order[:chosen]] = 0.0
    return Pruned(final, order, stats.mean.cpu().tolist(), base, chosen_acc, step, mode, curve)


@dataclass
class Teacher:
    """The frozen pre-repair model to distil from, and how (:func:`teacher_for`)."""

    model: nn.Module
    mode: str  # "full": the whole softmax on every row; "guarded": without ``exclude``, on rows it gets right
    exclude: int | None = None
    lean: list[float] = field(default_factory=list)  # per class: mean probability on the other classes' rows
    rule: str = "lean"  # how ``exclude`` was chosen: "lean" (trusted rows) or "lean+excess" (:func:`suspected_target`)
    excess: list[float] = field(default_factory=list)  # per class: share of the training inputs sent there, less
    # its share of the trusted labels (only when the training inputs are read)
    scores: list[float] = field(default_factory=list)  # per class: the two signals' robust z-scores, summed

    def objective(self, cfg: BackdoorConfig, unlabelled: torch.Tensor | None = None, seed: int = 0):
        """Distillation on the trusted rows; a guarded teacher also on ``unlabelled`` inputs, if given."""
        guarded = self.mode == "guarded"
        labelled = Distillation(self.model, cfg.distill_temperature, cfg.distill_weight, self.exclude, guarded)
        if not guarded or unlabelled is None:
            return labelled
        weight = cfg.distill_weight * cfg.distill_unlabelled_weight
        return UnlabelledDistillation(labelled, self.model, unlabelled, cfg.distill_temperature, weight,
                                      self.exclude, seed)  # fmt: skip


def leaning_class(model: nn.Module, trusted: Dataset, device: torch.device) -> tuple[int, list[float]]:
    """The class ``model`` leans to on clean data: the highest mean probability on trusted rows of other classes.

    An all-to-one backdoor puts extra mass on its target for clean inputs too (the trigger's features are partly
    present in natural images); on the natural set's first three seeds this found the target in every case, where
    counting argmax errors did not (docs/backdoor.md). On the trusted rows alone a wrong guess costs one class's
    soft labels; with the training inputs it would pass the trigger back (ASR 0.356 on one natural BadNets seed), so
    there :func:`suspected_target` weighs it with the training inputs' excess. Read on at most 2048 seeded rows (a
    large reserve need not be held in memory at once)."""
    x, y = materialize(_bounded(trusted, seed=0))
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(x[i : i + 512].to(device)).softmax(1).cpu() for i in range(0, len(x), 512)])
    y = torch.as_tensor(y)
    lean = [float(probs[y != c, c].mean()) if bool((y != c).any()) else 0.0 for c in range(probs.shape[1])]
    return int(np.argmax(lean)), [round(v, 4) for v in lean]


def teacher_for(
    model: nn.Module,
    trusted: Dataset,
    device: torch.device,
    trusted_accuracy: float,
    cfg: BackdoorConfig,
    held_out: Callable[[], tuple[float, float]] | None = None,
) -> Teacher | None:
    """A frozen copy of the pre-repair model to distil from while fine-tuning, or None.

    Distillation keeps what 288 trusted samples cannot re-teach: on non-private digits the repair then costs
    0.6-1.95 points instead of 1.6-3.1, ASR <= 0.04. From a teacher right on (nearly) all trusted data
    (``distill_min_teacher_accuracy``) it is plain distillation. A weaker teacher's soft labels taught the trigger
    back (ASR 0.09-0.22), so below the gate it is **guarded** (the class it leans to left out, only the rows it
    gets right), and only when the teacher beats what fine-tuning alone achieves by ``distill_min_advantage``:
    ``held_out()`` returns (teacher, student) accuracy on half the trusted rows, the student fine-tuned without a
    teacher on the other half (the better of FST's and the whole head's when the head check measured both: what
    the trusted rows alone can re-teach; a DP teacher that beat only FST's weaker student was let through and,
    leaning to the wrong class, left ASR 0.062 on the pinned-noise digits preset). A non-private model on natural
    images wins (it holds knowledge 300 trusted rows cannot re-teach); a DP model loses (the non-private fine-tuning
    alone ends above it) and is not distilled from (docs/backdoor.md, "Guarded distillation"). Every test reads the
    model, not the dataset's name.
    """
    if cfg.distill_weight == 0 or cfg.finetune_epochs == 0:
        return None
    if trusted_accuracy >= cfg.distill_min_teacher_accuracy:
        return Teacher(copy.deepcopy(model).eval().requires_grad_(False), "full")
    if cfg.distill_weak_teacher is WeakTeacher.off or held_out is None:
        return None
    teacher_acc, student_acc = held_out()
    if teacher_acc - student_acc < cfg.distill_min_advantage:
        return None
    exclude, lean = leaning_class(model, trusted, device)
    return Teacher(copy.deepcopy(model).eval().requires_grad_(False), "guarded", exclude, lean)


def over_predicted(model: nn.Module, inputs: torch.Tensor, trusted: Dataset, device: torch.device) -> list[float]:
    """Per class: the share of ``inputs`` (the training split's, labels unread) ``model`` sends there, less that
    class's share of the trusted labels (a stratified draw from the same split: the clean class mix). Every poisoned
    row the model learnt goes to the target, whose excess is then about the poisoned share of the split (0.06-0.12
    on the natural set at ``backdoor.rate=0.1``); a clean class's is sampling noise (up to 0.05 there)."""
    labels = torch.as_tensor(materialize(trusted)[1])
    with torch.no_grad():
        logits = torch.cat([model(inputs[i : i + 512].to(device)).cpu() for i in range(0, len(inputs), 512)])
    sent, classes = logits.argmax(1), logits.shape[1]  # one entry per output, as the lean has
    share_sent = torch.bincount(sent, minlength=classes) / len(sent)
    excess = share_sent - torch.bincount(labels, minlength=classes) / len(labels)
    return [round(float(v), 4) for v in excess]


def _robust_z(values: list[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    scale = 1.4826 * float(np.median(np.abs(v - np.median(v)))) or float(v.std()) or 1.0
    return (v - np.median(v)) / scale


def suspected_target(lean: list[float], excess: list[float]) -> tuple[int, list[float]]:
    """The class both signals of an all-to-one backdoor point to: the sum over classes of the lean's and the
    excess's robust z-scores (median and MAD across the classes), and those sums.

    Neither signal alone names the target every time. The lean (:func:`leaning_class`) named class 7 on one of nine
    natural-set BadNets seeds, and distilling on the training inputs with the target left in passed the trigger back
    (ASR 0.858 -> 0.356). The excess (:func:`over_predicted`) needs a learnt backdoor: where the WaNet backdoor was not
    learnt (ASR before 0.03-0.09) it named a clean class on six of nine seeds, while the lean, 0.13-0.15 on the
    target against at most 0.05 elsewhere, named the target on all nine. Summing z-scores (Stouffer's combination,
    unweighted: nothing fitted) named the target on all 27 non-private natural-set repairs, and on the held-out
    seeds of docs/backdoor.md, "Nine seeds per cell"."""
    scores = _robust_z(lean) + _robust_z(excess)
    return int(scores.argmax()), [round(float(v), 2) for v in scores]


def unlabelled_inputs(teacher: Teacher, rows: Dataset, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """The inputs of ``rows`` (labels unread) a guarded teacher is distilled on, and how many were left out: those
    it classifies as the class it leans to. A triggered input is sent there, and what the teacher says about its
    other classes is its view of the trigger, nothing the repair needs (on the natural set leaving them out did
    not change the measured ASR: the stronger FST penalty did; docs/backdoor.md). None if no row is left."""
    x, _ = materialize(rows)
    with torch.no_grad():
        sent = torch.cat([teacher.model(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(x), 512)])
    keep = sent != teacher.exclude
    return (x[keep] if bool(keep.any()) else None), int((~keep).sum())


def cross_fitted(
    model: nn.Module, path: str, mask: torch.Tensor, view: Dataset, trusted: Dataset, device, cfg, seed: int
) -> tuple[float, float]:
    """(teacher, student) accuracy on a seeded half of the trusted rows: the teacher is ``model`` as it is, the
    student a copy fine-tuned under ``mask`` without a teacher on the other half (of ``view``, the fine-tuning's
    own view of the same rows). The student sees half the rows the real repair will, so it errs low: the test
    favours distilling, and the measured gaps (docs/backdoor.md) are far wider than that bias."""
    n = len(trusted)  # type: ignore[arg-type]
    order = np.random.default_rng(seed).permutation(n)
    fit_rows, score_rows = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
    student = copy.deepcopy(model)
    with masked(student, path, mask):
        fine_tune(student, path, subset(view, fit_rows), device, cfg, seed)
        student_acc = accuracy(student, subset(trusted, score_rows), device)
    return accuracy(model, subset(trusted, score_rows), device), student_acc


def fine_tune(
    model: nn.Module,
    path: str,
    trusted: Dataset,
    device: torch.device,
    cfg: BackdoorConfig,
    seed: int,
    teacher: Teacher | None = None,
    unlabelled: torch.Tensor | None = None,
) -> tuple[str, list[str]]:
    """Non-private SGD (momentum 0.9, weight decay) on the trusted data through the one loop; warm-up over 10% of
    the steps, then cosine to 0 (backdoor/retune.py says why). ``backdoor.finetune_head``:

    - ``shift`` (default): only the classifier (the last ``nn.Linear`` after the feature layer ``path``) is
      re-initialised, trained at ``finetune_lr`` with FST's penalty (:class:`FeatureShift`), everything else at
      ``finetune_body_lr`` times it. A model with no linear classifier after the feature layer gets ``reinit``;
    - ``reinit``: every module after the feature layer is re-initialised and trained at ``finetune_lr``;
    - ``keep``: the same modules at ``finetune_lr``, as they are.

    Call it inside :func:`~aisec_train.backdoor.layers.masked`. Returns the mode that ran (``off`` with 0 epochs)
    and the modules trained at the full lr.

    It runs on the defender's trusted data without DP (what that does to the run's privacy claim:
    backdoor/trusted.py). The warm-up: a DP model's first steps at the full lr 0.1 with momentum could diverge; on
    typeset digits the repaired model fell from 0.45 to 0.27 clean accuracy without it (docs/backdoor.md). With a
    ``teacher``, the loss adds distillation from it (:meth:`Teacher.objective`), a guarded one also on the
    ``unlabelled`` inputs.
    """
    if cfg.finetune_epochs == 0:
        return "off", []
    probe, _ = materialize(trusted, limit=2)
    probe = probe.to(device)
    head = retune.head_modules(model, path, probe)
    linear = retune.classifier(model, head) if cfg.finetune_head is FinetuneHead.shift else None
    shift, mode = None, cfg.finetune_head.value
    if linear is not None:  # FST: only the classifier is re-initialised, and kept off the compromised one
        weight = dict(network(model).named_modules())[linear].weight
        original = weight.detach().clone()
        head = retune.reinit_head(model, path, probe, seed, only=[linear])
    elif cfg.finetune_head is not FinetuneHead.keep:  # reinit, or shift on a model with no linear classifier
        head, mode = retune.reinit_head(model, path, probe, seed), FinetuneHead.reinit.value
    loop_cfg = TrainConfig(
        epochs=cfg.finetune_epochs,
        batch_size=cfg.finetune_batch_size,
        max_physical_batch_size=cfg.finetune_batch_size,
        lr=cfg.finetune_lr,
        momentum=0.9,
        weight_decay=cfg.finetune_weight_decay,
        seed=seed,
        ema_decay=0.0,
    )
    optimizer = {"_target_": retune.OPTIMIZER, "lr": cfg.finetune_lr, "momentum": 0.9,
                 "weight_decay": cfg.finetune_weight_decay}  # fmt: skip
    scheduler = {"_target_": retune.SCHEDULER, "pct_start": 0.1}  # total_steps: the loop's planned steps
    with retune.lr_scales(model, head, cfg.finetune_body_lr):
        objective = None if teacher is None else teacher.objective(cfg, unlabelled, seed)
        if cfg.repair_blend > 0:  # the student reads blended inputs; the teacher and the labels, the clean ones
            objective = BlendedInputs(objective or CrossEntropy(), cfg.repair_blend, seed)
        if cfg.repair_erase > 0:  # and one noise box per row (with this probability); teacher and labels: clean
            objective = ErasedInputs(objective or CrossEntropy(), cfg.repair_erase, seed)
        if linear is not None:
            shift = FeatureShift(objective or CrossEntropy(), weight, original, cfg.shift_weight)
            objective = shift
        train(model, trusted, train_cfg=loop_cfg, device=device, optimizer=optimizer, scheduler=scheduler,
              objective=objective, progress=False)  # fmt: skip
    if shift is not None:
        shift.project()  # the last step's update, back onto the norm ball
    model.eval()
    return mode, head


def fine_prune(
    model: nn.Module,
    path: str,
    trusted: Dataset,
    device: torch.device,
    cfg: BackdoorConfig,
    *,
    evaluate: dict[str, Dataset] | None = None,
    backend: str = "auto",
    seed: int = 0,
    finetune_view: Dataset | None = None,
    unlabelled: Dataset | None = None,
) -> Pruned:
    """The whole repair, in place: choose the mask, fine-tune under it (on ``finetune_view``, default the trusted
    data: the pipeline passes its augmented view), bake it into the released model.

    ``unlabelled``: inputs whose labels are not read (the pipeline passes the training split of a central run
    without DP). They name the backdoor's target with the model's lean (:func:`suspected_target`,
    ``pruned.named_target``, which relearning reads: backdoor/relearn.py), and a guarded teacher is distilled on
    them as well (unless ``backdoor.distill_unlabelled_weight`` is 0), that class left out
    (:func:`unlabelled_inputs`); at most :data:`UNLABELLED_SAMPLES` seeded rows."""
    pruned = prune(model, path, trusted, device, max_drop=cfg.prune_acc_drop, evaluate=evaluate, backend=backend,
                   seed=seed)  # fmt: skip
    view = finetune_view if finetune_view is not None else trusted
    held: dict[str, float] = {}  # held-out accuracy of the teacher and of a student per head mode, when measured

    def student(head: FinetuneHead) -> float:
        if head.value not in held:
            tried = dataclasses.replace(cfg, finetune_head=head, repair_erase=0.0)  # boxes: checked on their own
            held["teacher"], held[head.value] = cross_fitted(model, path, pruned.mask, view, trusted, device, tried,
                                                             seed)  # fmt: skip
        return held[head.value]

    comparable = len(trusted) >= MIN_HELD_OUT  # type: ignore[arg-type]
    if cfg.finetune_head is FinetuneHead.shift and cfg.finetune_epochs and comparable and cfg.shift_max_cost < 1:
        if student(FinetuneHead.shift) < student(FinetuneHead.reinit) - cfg.shift_max_cost:
            cfg = dataclasses.replace(cfg, finetune_head=FinetuneHead.reinit)  # FST would cost this model too much
        pruned.head_check = {"shift": held["shift"], "reinit": held["reinit"], "max_cost": cfg.shift_max_cost,
                             "chosen": cfg.finetune_head.value}  # fmt: skip

    def held_out() -> tuple[float, float]:  # only needed for a teacher below the accuracy gate
        student(cfg.finetune_head)  # the head mode the repair will use, and the other one if the check ran:
        return held["teacher"], max(v for k, v in held.items() if k != "teacher")  # what trusted rows re-teach

    # before the head is re-initialised
    teacher = teacher_for(model, trusted, device, pruned.base_accuracy, cfg, held_out if comparable else None)
    pruned.distilled = teacher is not None
    if cfg.repair_erase > 0 and cfg.finetune_epochs:
        # Boxes only for a model the repair does not learn from, by the teacher gate's own measures: below the
        # full teacher's trusted accuracy, and not beating fine-tuning alone on held-out trusted rows by
        # distill_min_advantage (docs/backdoor.md, "Erased boxes in the repair"). Nothing measured: no boxes.
        weak = pruned.base_accuracy < cfg.distill_min_teacher_accuracy
        teacher_acc, student_acc = held_out() if weak and comparable else (None, None)
        used = teacher_acc is not None and teacher_acc - student_acc < cfg.distill_min_advantage
        pruned.erase_check = {"trusted_accuracy": pruned.base_accuracy, "teacher": teacher_acc,
                              "student": student_acc, "used": used}  # fmt: skip
        if not used:
            cfg = dataclasses.replace(cfg, repair_erase=0.0)
    inputs, dropped = None, 0
    if unlabelled is not None:  # name the target from the training inputs (the model is still the trained one)
        sample = _bounded(unlabelled, seed, UNLABELLED_SAMPLES)
        lean = teacher.lean if teacher is not None and teacher.lean else leaning_class(model, trusted, device)[1]
        excess = over_predicted(model, materialize(sample)[0], trusted, device)
        target, scores = suspected_target(lean, excess)
        pruned.named_target = {"class": target, "rule": "lean+excess", "lean": lean, "excess": excess,
                               "scores": scores}  # fmt: skip
        if teacher is not None and teacher.mode == "guarded" and cfg.distill_unlabelled_weight:
            teacher.excess, teacher.exclude, teacher.scores, teacher.rule = excess, target, scores, "lean+excess"
            inputs, dropped = unlabelled_inputs(teacher, sample, device)
    pruned.distill = {
        "mode": "off" if teacher is None else teacher.mode,
        "held_out_teacher_accuracy": held.get("teacher"),
        "held_out_student_accuracy": max((v for k, v in held.items() if k != "teacher"), default=None),
        "excluded_class": None if teacher is None else teacher.exclude,
        # how the left-out class was named: lean (trusted rows) | lean+excess (and the training inputs); null: none
        "exclude_rule": None if teacher is None or teacher.exclude is None else teacher.rule,
        "lean": [] if teacher is None else teacher.lean,
        "lean_class": int(np.argmax(teacher.lean)) if teacher is not None and teacher.lean else None,
        "excess": [] if teacher is None else teacher.excess,
        "target_scores": [] if teacher is None else teacher.scores,
        "unlabelled_rows": 0 if inputs is None else len(inputs),  # training inputs distilled on (labels unread)
        "unlabelled_dropped": dropped,  # those the teacher sends to the class it leans to, left out
    }
    with masked(model, path, pruned.mask):
        pruned.head_mode, pruned.head = fine_tune(model, path, view, device, cfg, seed, teacher, inputs)
    probe, _ = materialize(trusted, limit=PROBE_SAMPLES)
    pruned.baked = bake(model, path, pruned.mask, probe.to(device))
    return pruned
