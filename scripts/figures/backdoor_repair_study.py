"""Repair variants side by side on one trained poisoned model (exploratory; issue 24).

Trains ``experiment=backdoor`` (plus any overrides) through the pipeline's own data, poison and train stages, then
repairs a copy of the model with each Fine-Pruning variant (``backdoor.*`` fields) and measures clean accuracy and
ASR on the whole test split and on two fixed halves of it (choose on ``sel``, report ``rep``). ``--variants
distill`` compares the default (distillation from the pre-repair model, gated on its trusted accuracy) with no
distillation and with distillation forced at several weights and temperatures; its ``*_correct`` variants
distil only on rows the teacher classifies correctly, an objective this script defines (not a package option).
The groups before ``fst``, and the ``fst*`` groups' rows without an FST key (``default``, ``ep60``, ...), ran under
the previous repair default (whole head re-initialised, 30 epochs): add ``--set backdoor.finetune_head=reinit --set
backdoor.finetune_epochs=30`` to reproduce them; ``shift`` and ``alpha`` use the package's Feature Shift Tuning.
``pool`` and ``unlabelled*`` study the distillation on the training inputs (non-private runs; their comments say
which alpha each ran at).
Run it from a scratch directory with the stores redirected (it opens a ledger); ``--out`` appends one JSON line
per variant:

    XDG_DATA_HOME=$D/x XDG_CACHE_HOME=$D/c AISEC_TRAIN_KEY_FILE=$D/key OMP_NUM_THREADS=1 \\
        python scripts/figures/backdoor_repair_study.py $D/run blended 0 --set privacy=none --variants distill
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from aisec_train import pipeline
from aisec_train.backdoor import badnets, prune, retune
from aisec_train.backdoor import stage as backdoor_stage
from aisec_train.backdoor.config import FinetuneHead, WeakTeacher
from aisec_train.backdoor.layers import network
from aisec_train.backdoor.metrics import measure
from aisec_train.config import register_configs, to_config
from aisec_train.data.views import subset
from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file
from aisec_train.train.objectives import Distillation, FeatureShift, soft_term

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
VARIANTS = {
    "schedule": {
        "default": {},
        "body0.1": {"finetune_body_lr": 0.1},
        "wd0.005": {"finetune_weight_decay": 0.005},
        "ep60": {"finetune_epochs": 60},
        "keep": {"finetune_head": FinetuneHead.keep},
        "drop0.01": {"prune_acc_drop": 0.01},
        "lr0.05": {"finetune_lr": 0.05},
    },
    "distill": {
        "default": {},  # distillation only from a teacher with trusted accuracy >= 0.95
        "no_distill": {"distill_weight": 0.0},
        "kd_T2_w0.3": {"distill_weight": 0.3, "distill_min_teacher_accuracy": 0.0},
        "kd_T2_w0.5": {"distill_weight": 0.5, "distill_min_teacher_accuracy": 0.0},
        "kd_T1_w0.5": {"distill_temperature": 1.0, "distill_min_teacher_accuracy": 0.0},
        "kd_T4_w0.5": {"distill_temperature": 4.0, "distill_min_teacher_accuracy": 0.0},
        "kd_correct_T2_w0.5": {"distill_min_teacher_accuracy": 0.0, "correct_only": True},
        "kd_correct_T4_w0.5": {"distill_temperature": 4.0, "distill_min_teacher_accuracy": 0.0, "correct_only": True},
    },
    "masked": {
        "default": {},
        "no_distill": {"distill_weight": 0.0},
        "kd_T2_w0.5": {"distill_min_teacher_accuracy": 0.0},
        "mask_T2_w0.5": {"distill_min_teacher_accuracy": 0.0, "objective": "masked"},
        "mask_T2_w0.7": {"distill_weight": 0.7, "distill_min_teacher_accuracy": 0.0, "objective": "masked"},
        "mask_T4_w0.5": {"distill_temperature": 4.0, "distill_min_teacher_accuracy": 0.0, "objective": "masked"},
        "mask_correct_T2_w0.5": {"distill_min_teacher_accuracy": 0.0, "objective": "masked_correct"},
        "mask_T2_w0.5_body0.5": {"distill_min_teacher_accuracy": 0.0, "objective": "masked", "finetune_body_lr": 0.5},
        "mask_T2_w0.5_wd0.05": {
            "distill_min_teacher_accuracy": 0.0,
            "objective": "masked",
            "finetune_weight_decay": 0.05,
        },
        "no_distill_body0.5": {"distill_weight": 0.0, "finetune_body_lr": 0.5},
        "mask_mass_T2_w0.5": {"distill_min_teacher_accuracy": 0.0, "objective": "masked", "rule": "mass"},
        "mask_mass_correct_T2_w0.5": {
            "distill_min_teacher_accuracy": 0.0,
            "objective": "masked_correct",
            "rule": "mass",
        },
        "mask_oracle_T2_w0.5": {"distill_min_teacher_accuracy": 0.0, "objective": "masked", "rule": "oracle"},
    },
    "guarded": {  # the package's options (backdoor.distill_weak_teacher, distill_min_fit_gap)
        "default": {},
        "no_distill": {"distill_weight": 0.0},
        "weak_off": {"distill_weak_teacher": WeakTeacher.off},  # the default before guarded distillation
        "guarded_always": {"distill_min_advantage": -1.0},
        "full_forced": {"distill_min_teacher_accuracy": 0.0},
    },
    "unlearn": {  # + universal adversarial unlearning (one shared perturbation per batch, I-BAU's idea, PGD inner)
        "default": {},
        "no_distill": {"distill_weight": 0.0},
        "unlearn_0.1": {"unlearn": (0.1, 5)},
        "unlearn_0.2": {"unlearn": (0.2, 5)},
        "unlearn_0.3": {"unlearn": (0.3, 5)},
        "unlearn_0.2_no_distill": {"unlearn": (0.2, 5), "distill_weight": 0.0},
        "unlearn_0.2_w0.2": {"unlearn": (0.2, 5, 0.2)},
        "unlearn_0.2_w0.1": {"unlearn": (0.2, 5, 0.1)},
        "unlearn_0.05_w0.5": {"unlearn": (0.05, 5, 0.5)},
    },
    "fst": {  # Feature Shift Tuning (Min et al. 2023): only the classifier re-initialised, kept away from the old one
        "default": {},
        "no_distill": {"distill_weight": 0.0},
        "last_only_body1": {"fst": 0.0, "finetune_body_lr": 1.0},
        "fst_a0.2_body1": {"fst": 0.2, "finetune_body_lr": 1.0},
        "fst_a0.2_body1_no_distill": {"fst": 0.2, "finetune_body_lr": 1.0, "distill_weight": 0.0},
        "fst_a0.2_body0.2": {"fst": 0.2},
        "fst_a0.2_body0.5": {"fst": 0.2, "finetune_body_lr": 0.5},
        "fst_a0.05_body1": {"fst": 0.05, "finetune_body_lr": 1.0},
        "fst_a0.5_body1": {"fst": 0.5, "finetune_body_lr": 1.0},
        "fst_a0.2_body1_lr0.03": {"fst": 0.2, "finetune_body_lr": 1.0, "finetune_lr": 0.03},
    },
    "fst2": {  # FST's penalty at the default body lr (0.2x), around its alpha and the distillation weight
        "default": {},
        "fst_a0.2_body0.2": {"fst": 0.2},
        "fst_a0.1_body0.2": {"fst": 0.1},
        "fst_a0.05_body0.2": {"fst": 0.05},
        "fst_a0.2_body0.1": {"fst": 0.2, "finetune_body_lr": 0.1},
        "fst_a0.2_w0.7": {"fst": 0.2, "distill_weight": 0.7},
        "fst_a0.2_w0.9": {"fst": 0.2, "distill_weight": 0.9},
        "fst_a0.2_ep60": {"fst": 0.2, "finetune_epochs": 60},
        "fst_a0.2_wd0": {"fst": 0.2, "finetune_weight_decay": 0.0},
        "fst_a0.2_full_forced": {"fst": 0.2, "distill_min_teacher_accuracy": 0.0},
        "last_only_body0.2": {"fst": 0.0},
    },
    "fst3": {  # FST's penalty with a longer fine-tuning
        "default": {},
        "fst_a0.2_ep60": {"fst": 0.2, "finetune_epochs": 60},
        "fst_a0.1_ep60": {"fst": 0.1, "finetune_epochs": 60},
        "fst_a0.05_ep60": {"fst": 0.05, "finetune_epochs": 60},
        "fst_a0.2_ep100": {"fst": 0.2, "finetune_epochs": 100},
        "fst_a0.1_ep100": {"fst": 0.1, "finetune_epochs": 100},
        "fst_a0.2_ep60_body0.3": {"fst": 0.2, "finetune_epochs": 60, "finetune_body_lr": 0.3},
        "fst_a0.2_ep60_w0.7": {"fst": 0.2, "finetune_epochs": 60, "distill_weight": 0.7},
        "fst_a0.2_ep60_lr0.05": {"fst": 0.2, "finetune_epochs": 60, "finetune_lr": 0.05},
        "ep60": {"finetune_epochs": 60},
    },
    "shift": {  # the package's head modes side by side (backdoor.finetune_head, finetune_epochs)
        "default": {},  # shift (FST), 60 epochs
        "reinit_ep30": {"finetune_head": FinetuneHead.reinit, "finetune_epochs": 30},  # the previous default
        "reinit_ep60": {"finetune_head": FinetuneHead.reinit},
        "shift_ep30": {"finetune_epochs": 30},
    },
    "alpha": {  # the package's FST at 60 epochs, around its shift_weight
        "default": {},
        "a0.1": {"shift_weight": 0.1},
        "a0.05": {"shift_weight": 0.05},
        "a0.02": {"shift_weight": 0.02},
        "a0": {"shift_weight": 0.0},
        "reinit": {"finetune_head": FinetuneHead.reinit},
    },
    "pool": {  # this script's first version of the training-input distillation (before the package had it: every
        # row, a generator seeded 0), the package's own switched off; privacy=none only. Rows ran at alpha 0.05:
        # add --set backdoor.shift_weight=0.05 to reproduce them
        "default": {"distill_unlabelled_weight": 0.0},
        "pool_w1": {"objective": "pool", "distill_unlabelled_weight": 0.0},
        "pool_w1_all": {"objective": "pool", "pool_min_teacher": True, "distill_unlabelled_weight": 0.0},
    },
    # The unlabelled* groups use the package's distillation on the training inputs. "unlabelled" and "unlabelled2"
    # ran at alpha 0.05 (add --set backdoor.shift_weight=0.05 to reproduce), "unlabelled3" at the default 0.2.
    "unlabelled": {  # the package's distillation on the training inputs, at several weights (x distill_weight)
        "default": {},
        "u0": {"distill_unlabelled_weight": 0.0},
        "u0.5": {"distill_unlabelled_weight": 0.5},
        "u0.25": {"distill_unlabelled_weight": 0.25},
        "u1_shift0.1": {"shift_weight": 0.1},
        "u1_body0.5": {"finetune_body_lr": 0.5},
    },
    "unlabelled2": {  # a stronger FST penalty against the features the training-input distillation holds in place
        "u1_shift0.1": {"shift_weight": 0.1},
        "u1_shift0.2": {"shift_weight": 0.2},
        "u1_shift0.1_body0.5": {"shift_weight": 0.1, "finetune_body_lr": 0.5},
        "u0.5_shift0.1": {"shift_weight": 0.1, "distill_unlabelled_weight": 0.5},
    },
    "unlabelled3": {  # around the new default (alpha 0.2, training inputs at weight 1)
        "default": {},
        "shift0.3": {"shift_weight": 0.3},
        "ep80": {"finetune_epochs": 80},
        "u0.5": {"distill_unlabelled_weight": 0.5},
    },
    "fst4": {  # the candidates on other cases
        "default": {},
        "fst_a0.2": {"fst": 0.2},
        "fst_a0.2_ep60": {"fst": 0.2, "finetune_epochs": 60},
        "fst_a0.1_ep60": {"fst": 0.1, "finetune_epochs": 60},
        "ep60": {"finetune_epochs": 60},
    },
    "depth": {  # how much of a (DP) model to re-initialise: ``reset`` names SmallCNN modules re-initialised with the
        # head and trained at the full lr; ``trusted_only`` resets every layer and distils from nothing: a model
        # that never read the training split, poisoned or not (its ASR is the trigger's pull on the trusted rows)
        "default": {},
        "last_block": {"reset": ["conv2", "norm2"]},
        "last_block_reinit": {"reset": ["conv2", "norm2"], "finetune_head": FinetuneHead.reinit},
        "trusted_only": {
            "reset": ["conv1", "norm1", "conv2", "norm2"],
            "finetune_head": FinetuneHead.reinit,
            "distill_weight": 0.0,
        },  # fmt: skip
    },
}
TRUSTED = {}  # set in main: the trusted data and device, for MaskedDistillation's target estimate


def suspected_target(teacher, trusted, device) -> tuple[int, list[float]]:
    """The class the teacher leans to on the trusted data: ``TRUSTED["rule"]`` = ``count`` (predicted minus true
    counts over rows) or ``mass`` (mean probability on rows of other classes)."""
    from aisec_train.data.views import materialize

    x, y = materialize(trusted)
    y = torch.as_tensor(y)
    with torch.no_grad():
        p = torch.cat([teacher(x[i : i + 256].to(device)).softmax(1).cpu() for i in range(0, len(x), 256)])
    k = p.shape[1]
    count = (torch.bincount(p.argmax(1), minlength=k) - torch.bincount(y, minlength=k)).float() / len(y)
    mass = torch.stack([p[y != c, c].mean() for c in range(k)])
    TRUSTED["stats"] = {"count": [round(float(v), 4) for v in count], "mass": [round(float(v), 4) for v in mass]}
    if TRUSTED.get("rule") == "oracle":
        return TRUSTED["oracle"], []
    excess = count if TRUSTED.get("rule", "count") == "count" else mass
    return int(excess.argmax()), [round(float(v), 4) for v in excess]


class MaskedDistillation(Distillation):
    """The package's distillation over every class but the one ``suspected_target`` picks (by this script's
    ``TRUSTED["rule"]``: count, mass or oracle): the soft term teaches nothing about that class's probability."""

    correct_only = False

    def __init__(self, teacher, temperature, weight, *_):  # the package's exclude / correct_only: chosen here
        target, excess = suspected_target(teacher, *TRUSTED["args"])
        super().__init__(teacher, temperature, weight, exclude=target, correct_only=self.correct_only)
        TRUSTED["last"] = (target, excess)


class MaskedCorrect(MaskedDistillation):
    correct_only = True


class Unlearn:
    """The inner objective on the batch, plus cross-entropy on the batch under one shared perturbation (Linf
    ``eps``, ``steps`` signed-gradient steps maximising the batch's loss): the model is taught to ignore the
    universal pattern that flips it most, which is where a whole-image trigger lives (Zeng et al. 2022, I-BAU)."""

    name, forwards = "unlearn", 1

    def __init__(self, inner, eps: float, steps: int, weight: float = 0.5):
        self.inner, self.eps, self.steps, self.weight = inner, eps, steps, weight

    def __call__(self, model, attacked, x, y, criterion):
        delta = torch.zeros_like(x[:1], requires_grad=True)
        was = model.training
        model.eval()
        for _ in range(self.steps):
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta + 2.5 * self.eps / self.steps * grad.sign()).clamp(-self.eps, self.eps)
            delta = delta.detach().requires_grad_(True)
        model.train(was)
        loss, logits = self.inner(model, attacked, x, y, criterion)
        adv = criterion(model((x + delta.detach()).clamp(0, 1)), y)
        return (1 - self.weight) * loss + self.weight * adv, logits


def classifier(model) -> torch.nn.Linear:
    """The model's last linear layer: the classifier FST re-initialises and steers."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _train_with(unlearn, fst=None):
    """The loop, its objective wrapped in :class:`Unlearn` (``unlearn`` = (eps, steps)) and/or the package's
    ``FeatureShift`` on the model's last linear layer (``fst`` = (alpha, original classifier weight)), for the
    exploratory ``fst*`` variants that ran before ``backdoor.finetune_head=shift`` existed."""

    def run(model, *a, objective=None, **kw):
        from aisec_train.train.objectives import CrossEntropy

        if unlearn is not None:
            objective = Unlearn(objective or CrossEntropy(), *unlearn)
        if fst is not None and fst[0] > 0:
            alpha, original = fst
            objective = FeatureShift(objective or CrossEntropy(), classifier(model).weight, original, alpha)
        return LOOP_TRAIN(model, *a, objective=objective, **kw)

    return run


HEAD_MODULES = retune.head_modules
REINIT_HEAD = retune.reinit_head


def _reinit_also(names: list[str]):
    """``retune.reinit_head`` that also re-initialises the modules ``names`` (seeded) and returns them with the
    head, so they train at the full lr (the ``depth`` variants)."""

    def reinit(model, path, probe, seed, only=None):
        head = REINIT_HEAD(model, path, probe, seed, only=only)
        modules = dict(network(model).named_modules())
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed + 1)
            for name in names:
                modules[name].reset_parameters()
        return [*head, *(n for n in names if n not in head)]

    return reinit if names else REINIT_HEAD


def _head(last_only: bool):
    """``retune.head_modules``, or only its last module (FST re-initialises the classifier alone)."""
    return (lambda *a: HEAD_MODULES(*a)[-1:]) if last_only else HEAD_MODULES


class PoolDistillation(Distillation):
    """The package's distillation plus the same soft term (the guarded teacher's class left out, every row) on a
    batch of the training split's inputs, labels unused: what the teacher knows beyond 300 trusted rows. Only with
    a guarded teacher (a full teacher's soft labels on the poisoned rows would teach the trigger), unless
    ``TRUSTED["pool_all"]``: then a full teacher's term leaves out the class it leans to (``leaning_class``)."""

    def __init__(self, teacher, temperature, weight, exclude=None, correct_only=False):
        super().__init__(teacher, temperature, weight, exclude, correct_only)
        self.gen = torch.Generator().manual_seed(0)
        self.pool_exclude = exclude
        if exclude is None and TRUSTED.get("pool_all"):  # a full teacher: leave out the class it leans to
            self.pool_exclude = prune.leaning_class(teacher, *TRUSTED["args"])[0]
            TRUSTED["last"] = (self.pool_exclude, [])

    def __call__(self, model, attacked, x, y, criterion):
        loss, logits = super().__call__(model, attacked, x, y, criterion)
        pool = TRUSTED["pool"]
        if self.pool_exclude is None:
            return loss, logits
        xp = pool[torch.randint(len(pool), (len(x),), generator=self.gen)].to(x.device)
        student = model(xp)
        with torch.no_grad():
            teacher = self.teacher(xp)
        kl = soft_term(student, teacher, self.temperature, self.pool_exclude).mean()
        return loss + self.weight * self.temperature**2 * kl, logits


LOOP_TRAIN = prune.train
OBJECTIVES = {"masked": MaskedDistillation, "masked_correct": MaskedCorrect, "pool": PoolDistillation}


class CorrectOnly(Distillation):
    """The package's distillation with the soft term on the rows the teacher classifies correctly only (its errors
    on clean data are where a backdoored teacher leans to the target), every class kept."""

    def __init__(self, teacher, temperature, weight, *_):
        super().__init__(teacher, temperature, weight, correct_only=True)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("attack")
    parser.add_argument("seed", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override KEY=VALUE")
    parser.add_argument("--variants", choices=list(VARIANTS), default="schedule")
    parser.add_argument("--out", type=output_file, default=None, help="append one JSON row per variant (JSON lines)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_configs()
    overrides = ["experiment=backdoor", "audit=off", "robustness.evaluate=false", f"backdoor.attack={args.attack}",
                 f"train.seed={args.seed}", *args.overrides]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    run = pipeline.Run(cfg=cfg, run_dir=args.work)
    with run.resources:
        for name, stage in pipeline.STAGES[:3]:  # data, backdoor_poison, train
            run.report.stage = name
            stage(run)
        state, test = run.backdoor, run.data.test
        perm = np.random.default_rng(123).permutation(len(test))
        half = len(test) // 2
        splits = {"all": test, "sel": subset(test, np.sort(perm[:half])), "rep": subset(test, np.sort(perm[half:]))}

        def scores(model) -> dict[str, tuple[float, float]]:
            out = {}
            for name, ds in splits.items():
                m = measure(model, ds, *badnets.triggered(ds, state.trigger, state.target_of), run.device)
                out[name] = (round(m.clean_accuracy, 4), round(m.asr, 4))
            return out

        rows = [{"variant": "trained", **scores(run.model)}]
        print("trained", rows[0], flush=True)
        for name, change in VARIANTS[args.variants].items():
            change = dict(change)
            prune.Distillation = CorrectOnly if change.pop("correct_only", False) else Distillation
            prune.Distillation = OBJECTIVES.get(change.pop("objective", None), prune.Distillation)
            TRUSTED["args"], TRUSTED["last"] = (state.trusted, run.device), None
            TRUSTED["rule"], TRUSTED["stats"] = change.pop("rule", "count"), None
            TRUSTED["oracle"] = cfg.backdoor.target
            TRUSTED["pool_all"] = change.pop("pool_min_teacher", False)
            if "pool" not in TRUSTED:
                from aisec_train.data.views import materialize

                TRUSTED["pool"] = materialize(run.data.train)[0]
            fst = change.pop("fst", None)
            if fst is not None:  # this script's FST: the package's previous whole-head mode, its head cut to the
                change.setdefault("finetune_head", FinetuneHead.reinit)  # last module (_head), 30 epochs unless
                change.setdefault("finetune_epochs", 30)  # the variant says otherwise, as when these rows were run
            original = classifier(run.model).weight.detach().clone()
            prune.train = _train_with(change.pop("unlearn", None), None if fst is None else (fst, original))
            retune.head_modules = _head(fst is not None)
            retune.reinit_head = _reinit_also(change.pop("reset", []))
            model, started = copy.deepcopy(run.model), time.process_time()
            bd = dataclasses.replace(cfg.backdoor, **change)
            view = run.data.training_view(state.trusted)
            pruned = prune.fine_prune(
                model,
                state.layer.path,
                state.trusted,
                run.device,
                bd,
                seed=args.seed,
                finetune_view=view,
                unlabelled=backdoor_stage.unlabelled_split(run, state),
            )
            rows.append({"variant": name, **scores(model), "distilled": pruned.distilled,
                         "teacher_trusted_accuracy": round(pruned.base_accuracy, 4), **pruned.distill,
                         "suspected": TRUSTED["last"], "target": cfg.backdoor.target, "stats": TRUSTED["stats"],
                         "cpu_s": round(time.process_time() - started, 1)})  # fmt: skip
            print(name, rows[-1], flush=True)
        prune.Distillation, retune.head_modules, retune.reinit_head = Distillation, HEAD_MODULES, REINIT_HEAD
    if args.out:
        case = {"attack": args.attack, "seed": args.seed, "overrides": args.overrides}
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(case | row) + "\n")


if __name__ == "__main__":
    main()
