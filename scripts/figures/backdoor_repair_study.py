"""Repair variants side by side on one trained poisoned model (exploratory; issue 24, benchmarks/results/cpu/
backdoor_tuning.json's ``repair_study``).

Trains ``experiment=backdoor privacy=none`` through the pipeline's own data, poison and train stages, then repairs a
copy of the model with each Fine-Pruning variant (``backdoor.*`` fields) and measures clean accuracy and ASR on two
fixed halves of the test split: choose on ``sel``, report ``rep``. Run it from a scratch directory with the stores
redirected (it opens a ledger):

    XDG_DATA_HOME=$D/x XDG_CACHE_HOME=$D/c AISEC_TRAIN_KEY_FILE=$D/key OMP_NUM_THREADS=1 \\
        python scripts/figures/backdoor_repair_study.py $D/run blended 0
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from aisec_train import pipeline
from aisec_train.backdoor import badnets, prune
from aisec_train.backdoor.config import FinetuneHead
from aisec_train.backdoor.metrics import measure
from aisec_train.config import register_configs, to_config
from aisec_train.data.views import subset

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
VARIANTS = {
    "default": {},
    "body0.1": {"finetune_body_lr": 0.1},
    "wd0.005": {"finetune_weight_decay": 0.005},
    "ep60": {"finetune_epochs": 60},
    "keep": {"finetune_head": FinetuneHead.keep},
    "drop0.01": {"prune_acc_drop": 0.01},
    "lr0.05": {"finetune_lr": 0.05},
}


def main() -> None:
    torch.set_num_threads(1)
    work, attack, seed, extra = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    register_configs()
    overrides = ["experiment=backdoor", "audit=off", "privacy=none", "robustness.evaluate=false",
                 f"backdoor.attack={attack}", f"train.seed={seed}", *extra]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    run = pipeline.Run(cfg=cfg, run_dir=work)
    with run.resources:
        for name, stage in pipeline.STAGES[:3]:  # data, backdoor_poison, train
            run.report.stage = name
            stage(run)
        state, test = run.backdoor, run.data.test
        perm = np.random.default_rng(123).permutation(len(test))
        half = len(test) // 2
        halves = {"sel": subset(test, np.sort(perm[:half])), "rep": subset(test, np.sort(perm[half:]))}

        def scores(model) -> dict[str, tuple[float, float]]:
            out = {}
            for name, ds in halves.items():
                m = measure(model, ds, *badnets.triggered(ds, state.trigger, state.target_of), run.device)
                out[name] = (round(m.clean_accuracy, 3), round(m.asr, 3))
            return out

        print("trained", scores(run.model), flush=True)
        for name, change in VARIANTS.items():
            model, started = copy.deepcopy(run.model), time.process_time()
            bd = dataclasses.replace(cfg.backdoor, **change)
            view = run.data.training_view(state.trusted)
            prune.fine_prune(model, state.layer.path, state.trusted, run.device, bd, seed=seed, finetune_view=view)
            print(name, scores(model), f"{time.process_time() - started:.1f} cpu-s", flush=True)


if __name__ == "__main__":
    main()
