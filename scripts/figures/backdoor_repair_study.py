"""Repair variants side by side on one trained poisoned model (exploratory; issue 24).

Trains ``experiment=backdoor`` (plus any overrides) through the pipeline's own data, poison and train stages, then
repairs a copy of the model with each Fine-Pruning variant (``backdoor.*`` fields) and measures clean accuracy and
ASR on the whole test split and on two fixed halves of it (choose on ``sel``, report ``rep``). ``--variants
distill`` compares the default (distillation from the pre-repair model, gated on its trusted accuracy) with no
distillation and with distillation forced at several weights and temperatures; its ``*_correct`` variants
distil only on rows the teacher classifies correctly, an objective this script defines (not a package option).
Run it from a scratch directory with the stores redirected (it opens a ledger); ``--out`` appends one JSON line
per variant:

    XDG_DATA_HOME=$D/x XDG_CACHE_HOME=$D/c AISEC_TRAIN_KEY_FILE=$D/key OMP_NUM_THREADS=1 \\
        python scripts/figures/backdoor_repair_study.py $D/run blended 0 --set privacy=none --variants distill
"""

from __future__ import annotations

import argparse
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
from aisec_train.backdoor import badnets, prune
from aisec_train.backdoor.config import FinetuneHead
from aisec_train.backdoor.metrics import measure
from aisec_train.config import register_configs, to_config
from aisec_train.data.views import subset
from aisec_train.train.objectives import Distillation

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
}


class CorrectOnly(Distillation):
    """Distillation whose soft term counts only the rows the teacher classifies correctly (its errors on clean data
    are where a backdoored teacher leans to the target)."""

    def __call__(self, model, attacked, x, y, criterion):
        logits = model(x)
        with torch.no_grad():
            teacher = self.teacher(x)
        soft = F.softmax(teacher / self.temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / self.temperature, dim=1), soft, reduction="none").sum(1)
        kl = kl * (teacher.argmax(1) == y).float()
        hard = criterion(logits, y)
        return (1 - self.weight) * hard + self.weight * self.temperature**2 * kl.mean(), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("attack")
    parser.add_argument("seed", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override KEY=VALUE")
    parser.add_argument("--variants", choices=list(VARIANTS), default="schedule")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON row per variant (JSON lines)")
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
            model, started = copy.deepcopy(run.model), time.process_time()
            bd = dataclasses.replace(cfg.backdoor, **change)
            view = run.data.training_view(state.trusted)
            pruned = prune.fine_prune(
                model, state.layer.path, state.trusted, run.device, bd, seed=args.seed, finetune_view=view
            )
            rows.append({"variant": name, **scores(model), "distilled": pruned.distilled,
                         "teacher_trusted_accuracy": round(pruned.base_accuracy, 4),
                         "cpu_s": round(time.process_time() - started, 1)})  # fmt: skip
            print(name, rows[-1], flush=True)
        prune.Distillation = Distillation
    if args.out:
        case = {"attack": args.attack, "seed": args.seed, "overrides": args.overrides}
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(case | row) + "\n")


if __name__ == "__main__":
    main()
