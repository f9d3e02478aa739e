"""Relearning variants side by side on one trained poisoned model (exploratory; issue 24, docs/backdoor.md,
"Relearning without the cleared rows").

Trains ``experiment=backdoor privacy=none`` (plus any overrides) through the pipeline's own data, poison and train
stages, repairs a copy with the package's Fine-Pruning (``prune.fine_prune``, as the defend stage calls it), then
relearns from that repaired model (``backdoor.stage._relearn``) under each variant, and measures clean accuracy and
ASR on the whole test split. Variants:

- ``default``: the package's settings (``relearn_blend=0.25``, trusted rows added);
- ``blend0``, ``blend0.15``, ``blend0.35``: other ``backdoor.relearn_blend`` values;
- ``no_trusted``: the cleared split alone, without the trusted rows (blend 0, as first tried);
- ``oracle``: the true poisoned rows dropped instead of the cleared ones, trusted rows added, blend 0 (what a
  perfect clearing gives: the retrain's own spread, and the ASR of a model that never saw a poisoned row);
- ``wrong_target``: the repair's named class replaced by the next class, so the poison stays in: the guard's case.

Run it from a scratch directory with the stores redirected; ``--out`` appends one JSON line per case:

    XDG_DATA_HOME=$D/x XDG_CACHE_HOME=$D/c AISEC_TRAIN_KEY_FILE=$D/key OMP_NUM_THREADS=1 \\
        python scripts/figures/backdoor_relearn_study.py $D/run badnets 8 --set dataset=npz ... --out F.jsonl
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
from torch.utils.data import ConcatDataset

from aisec_train import pipeline
from aisec_train.backdoor import badnets, prune, relearn
from aisec_train.backdoor import stage as backdoor_stage
from aisec_train.backdoor.metrics import measure
from aisec_train.config import register_configs, to_config
from aisec_train.data.views import subset
from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file
from aisec_train.train.loop import train
from aisec_train.train.objectives import CrossEntropy

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
BLENDS = {"default": None, "blend0": 0.0, "blend0.15": 0.15, "blend0.35": 0.35}


def _pair(m) -> list[float]:
    return [round(m.clean_accuracy, 4), round(m.asr, 4)]


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("attack")
    parser.add_argument("seed", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override KEY=VALUE")
    parser.add_argument("--out", type=output_file, default=None, help="append one JSON line for the case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_configs()
    overrides = ["experiment=backdoor", "audit=off", "robustness.evaluate=false", "privacy=none",
                 f"backdoor.attack={args.attack}", f"train.seed={args.seed}", *args.overrides]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    run = pipeline.Run(cfg=cfg, run_dir=args.work)
    row: dict = {"attack": args.attack, "seed": args.seed, "overrides": args.overrides}
    with run.resources:
        for name, stage in pipeline.STAGES[:3]:  # data, backdoor_poison, train
            run.report.stage = name
            stage(run)
        state, test, device = run.backdoor, run.data.test, run.device
        splits = (test, *badnets.triggered(test, state.trigger, state.target_of))
        row["trained"] = _pair(measure(run.model, *splits, device))
        repaired = copy.deepcopy(run.model)
        pruned = prune.fine_prune(repaired, state.layer.path, state.trusted, device, cfg.backdoor, seed=args.seed,
                                  finetune_view=run.data.training_view(state.trusted),
                                  unlabelled=backdoor_stage.unlabelled_split(run, state))  # fmt: skip
        row["repaired"] = _pair(measure(repaired, *splits, device))
        named = pruned.named_target
        row |= {"exclude_rule": pruned.distill["exclude_rule"], "named": named and named["class"]}
        repair = {"named_target": named}

        def relearned(name: str, bd, other=None) -> None:
            run.model, run.cfg = repaired, dataclasses.replace(cfg, backdoor=bd)
            rep = copy.deepcopy(repair)
            if other is not None:  # name another class than the repair did
                rep["named_target"]["class"] = other
            started = time.perf_counter()
            backdoor_stage._relearn(run, state, splits, rep)
            done = rep["relearn"]
            row[name] = done and {"relearned": [round(done["metrics"]["clean_accuracy"], 4),
                                                round(done["metrics"]["asr"], 4)],
                                  "released": done["released"], "cleared_rows": done["cleared_rows"],
                                  "max_shift": max(done["shift"]), "shift": done["shift"],
                                  "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
            print(name, row[name], flush=True)

        for name, blend in BLENDS.items():
            bd = cfg.backdoor if blend is None else dataclasses.replace(cfg.backdoor, relearn_blend=blend)
            relearned(name, bd)
        if named is not None:
            relearned("wrong_target", cfg.backdoor, (named["class"] + 1) % run.data.num_classes)
            rows = backdoor_stage.unlabelled_split(run, state)
            sent, labels = relearn.predictions(repaired, rows, device)
            clear = relearn.cleared(sent, labels, named["class"])
            poisoned = np.zeros(len(rows), bool)
            poisoned[state.poisoned.indices] = True  # the red team's indices: this study's oracle, never the package's
            row["cleared_poisoned"] = int((clear & poisoned).sum())
            row["cleared_clean"] = int((clear & ~poisoned).sum())
            row["poisoned"] = int(poisoned.sum())
            for name, view in {
                "no_trusted": subset(rows, np.flatnonzero(~clear)),
                "oracle": ConcatDataset([subset(rows, np.flatnonzero(~poisoned)), state.trusted]),
            }.items():
                model = train(run.factory(seed=args.seed), run.data.training_view(view), train_cfg=cfg.train,
                              privacy_cfg=cfg.privacy, device=device, objective=CrossEntropy(),
                              optimizer=cfg.optimizer, scheduler=cfg.scheduler, workers=0,
                              progress=False).model  # fmt: skip
                row[name] = _pair(measure(model, *splits, device))
                print(name, row[name], flush=True)
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
