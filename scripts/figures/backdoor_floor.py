"""The ASR a model shows with no backdoor at all: the floor under issue 24's "ASR <= 0.05" (exploratory).

For each cell (image set x attack x privacy x seed) this trains the **never-poisoned twin** of the matrix's run
(scripts/figures/backdoor_matrix.py): the same config, seed, trusted reserve and trigger, but the poison stage's
view stamps no row. It then measures the trigger's "ASR" on it (triggered non-target test inputs classified as
the target), runs the same Fine-Pruning repair the pipeline runs (``prune.fine_prune``, the training inputs for a
non-private run as ``backdoor.unlabelled_split`` hands them) and measures again. A repaired backdoored model cannot
be expected to go below what a model that never saw the trigger does; this is that number, per cell.

Each cell runs in its own process with its own ledger and key store (a DP run charges the budget of its data):

    OMP_NUM_THREADS=1 python scripts/figures/backdoor_floor.py --sets natural --attack blended --seeds 0 1 2 \\
        --out benchmarks/results/cpu/backdoor_floor.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backdoor_matrix import PRIVACY, SETS, _dataset  # noqa: E402

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

REPO = Path(__file__).resolve().parents[2]
CONFIGS = str(REPO / "configs")


# ``--variants``: repair changes (BackdoorConfig fields) each applied to a copy of the same trained twin, to see
# whether one part of the repair adds the trigger's pull (docs/backdoor.md, "The ASR of a model with no backdoor").
VARIANTS = {
    "no_blend": {"repair_blend": 0.0},
    "reinit": {"finetune_head": "reinit"},
    "keep": {"finetune_head": "keep"},
    "body0.02": {"finetune_body_lr": 0.02},
    "ep20": {"finetune_epochs": 20},
    "no_shift": {"shift_weight": 0.0},
}


def twin(attack: str, seed: int, overrides: list[str], work: Path, variants: tuple[str, ...] = ()) -> dict:
    """Train the never-poisoned twin of one matrix cell and measure its trigger rate before and after repair
    (and after each of ``variants``' repairs, each on a copy of the trained twin)."""
    from hydra import compose, initialize_config_dir

    from aisec_train import pipeline
    from aisec_train.backdoor import badnets, prune
    from aisec_train.backdoor import stage as backdoor_stage
    from aisec_train.backdoor.config import FinetuneHead
    from aisec_train.backdoor.metrics import errors_to_target, measure
    from aisec_train.config import register_configs, to_config

    torch.set_num_threads(1)
    register_configs()
    base = ["experiment=backdoor", "audit=off", "robustness.evaluate=false", f"backdoor.attack={attack}"]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=[*base, f"train.seed={seed}", *overrides]))
    run = pipeline.Run(cfg=cfg, run_dir=work)
    stages = dict(pipeline.STAGES)
    with run.resources:
        run.report.stage = "data"
        stages["data"](run)
        run.report.stage = "backdoor_poison"
        stages["backdoor_poison"](run)
        state = run.backdoor
        # The twin: the same split (reserve already carved), the same trigger, no row stamped or relabelled.
        clean = badnets.poison_rows(state.poisoned.view.base, np.array([], np.int64), state.trigger, state.target_of)
        run.data.train = clean.view
        run.backdoor = state = dataclasses.replace(state, poisoned=clean)
        run.report.stage = "train"
        stages["train"](run)
        test = run.data.test

        def rates() -> dict[str, float]:
            m = measure(run.model, test, *badnets.triggered(test, state.trigger, state.target_of), run.device)
            errors = errors_to_target(m, run.data.num_classes)  # the target's share of the mistakes, against chance
            return {"clean": round(m.clean_accuracy, 4), "asr": round(m.asr, 4), "ra": round(m.robust_accuracy, 4),
                    "share": errors["share"], "p": errors["p_value"]}  # fmt: skip

        before = rates()
        trained, others = copy.deepcopy(run.model), {}
        for name in variants:
            change = {k: FinetuneHead(v) if k == "finetune_head" else v for k, v in VARIANTS[name].items()}
            run.model = copy.deepcopy(trained)
            prune.fine_prune(
                run.model, state.layer.path, state.trusted, run.device, dataclasses.replace(cfg.backdoor, **change),
                seed=seed, finetune_view=run.data.training_view(state.trusted),
                unlabelled=backdoor_stage.unlabelled_split(run, state),
            )  # fmt: skip
            others[name] = rates()
        run.model = trained
        pruned = prune.fine_prune(
            run.model, state.layer.path, state.trusted, run.device, cfg.backdoor, seed=seed,
            finetune_view=run.data.training_view(state.trusted),
            unlabelled=backdoor_stage.unlabelled_split(run, state),
        )  # fmt: skip
        after = rates()
    return {
        "clean_before": before["clean"], "asr_floor_before": before["asr"],
        "clean_after": after["clean"], "asr_floor_after": after["asr"],
        "ra_after": after["ra"], "target_share_after": after["share"], "target_share_p_after": after["p"],
        "distill_mode": pruned.distill.get("mode"), "epsilon": run.report.get("privacy.epsilon"),
        "erase_used": (pruned.erase_check or {}).get("used", False),
        **({"variants": others} if others else {}),
    }  # fmt: skip


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=["natural"])
    parser.add_argument("--attack", nargs="+", default=["badnets", "blended", "wanet"])
    parser.add_argument("--privacy", nargs="+", choices=list(PRIVACY), default=list(PRIVACY))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=[])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--out", type=output_file, default=REPO / "benchmarks" / "results" / "cpu" / "backdoor_floor.jsonl"
    )
    parser.add_argument("--cell", nargs=3, metavar=("ATTACK", "SEED", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="aisec-backdoor-floor-"))
    if args.cell:  # the child: one cell, its result as the last line of stdout
        attack, seed, overrides = args.cell[0], int(args.cell[1]), json.loads(args.cell[2])
        print(json.dumps(twin(attack, seed, overrides, work, tuple(args.variants))))
        return
    work.mkdir(parents=True, exist_ok=True)
    for name in args.sets:
        data = _dataset(name, work)
        for attack in args.attack:
            for privacy in args.privacy:
                for seed in args.seeds:
                    cell = work / f"{name}-{attack}-{privacy}-{seed}"
                    cell.mkdir(parents=True, exist_ok=True)
                    env = os.environ | {"XDG_DATA_HOME": str(cell / "x"), "XDG_CACHE_HOME": str(cell / "c"),
                                        "AISEC_TRAIN_KEY_FILE": str(cell / "key")}  # fmt: skip
                    overrides = [*data, *PRIVACY[privacy]]
                    done = subprocess.run(
                        [sys.executable, __file__, "--work", str(cell / "run"), "--cell", attack, str(seed),
                         json.dumps(overrides), *(["--variants", *args.variants] if args.variants else [])],
                        cwd=cell, env=env, capture_output=True, text=True,
                    )  # fmt: skip
                    row = {"case": f"{name}/{attack}/{privacy}", "seed": seed}
                    if done.returncode:
                        row["failed"] = done.stderr[-500:]
                    else:
                        row |= json.loads(done.stdout.strip().splitlines()[-1])
                    print(json.dumps(row), flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
