"""Why detection finds the poison on digits and not on the natural set: how far the poisoned rows stand apart.

Trains ``experiment=backdoor`` (plus overrides) through the pipeline's data, poison and train stages, then, for the
target class's training rows (clean and poisoned, as the detectors see them) at the feature layer the detectors
read and at the input of the last layer (the penultimate representation Tran et al. analyse), measures:

- ``d_prime``: the poisoned and clean rows' separation along the direction between their means (known only to
  this script: it reads the true poisoned indices), over their pooled standard deviation. A linear detector with
  perfect knowledge cannot do better than this;
- ``spectral_auc``: ROC AUC of the project's spectral score (the distance along the class's top singular vector
  from the trusted rows' mean projection; backdoor/detect.py, here fitted on the whole class rather than
  cross-fitted on halves) for telling poisoned from clean rows,
  threshold-free (scikit-learn): what any threshold on that score could reach;
- ``spectral_recall`` / ``ac_recall``: the project's two detectors, as the defence stage runs them, on that layer.

``--strip`` adds one row at the input: STRIP (Gao et al. 2019) applied to the training rows. Each row is
superimposed (``0.5 x + 0.5 x'``) on ``--strip-n`` random trusted images, and the mean entropy of the model's
predictions is its score: a trigger that dominates the prediction keeps it low. ``strip_auc`` is the ROC AUC of
the negated entropy for poisoned against clean rows of the target class; ``strip_recall`` / ``strip_precision``
flag every training row whose entropy lies below the trusted rows' ``--strip-frr`` quantile (STRIP's rule: the
false-rejection rate chosen on clean data).

``--abl K`` adds one row for training dynamics (Anti-Backdoor Learning, Li et al. 2021: a backdoor is learned
faster than the clean task): a fresh model from the run's factory is trained K epochs on the poisoned training
rows (plain SGD at the run's lr and batch size), and each row's loss is its score. ``abl_auc`` is the ROC AUC of
the negated loss for poisoned against clean rows (all classes); ``abl_precision_1pct`` / ``_10pct`` are the
poisoned share of the lowest-loss 1% (ABL's isolation ratio) and 10% of rows.

Writes one JSON line per (case, layer) to ``--out``:

    XDG_DATA_HOME=$D/x XDG_CACHE_HOME=$D/c AISEC_TRAIN_KEY_FILE=$D/key OMP_NUM_THREADS=1 \\
        python scripts/figures/backdoor_separability.py $D/run badnets 0 --set privacy=none --out rows.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score

from aisec_train import pipeline
from aisec_train.backdoor import badnets, detect, retune
from aisec_train.backdoor.features import detection_features
from aisec_train.backdoor.metrics import measure
from aisec_train.config import register_configs, to_config
from aisec_train.data.views import labels_of, materialize
from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def separation(feats: np.ndarray, poisoned: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """``feats``: one class's training rows, ``poisoned`` their truth, ``ref`` the class's trusted rows."""
    p, c = feats[poisoned], feats[~poisoned]
    direction = p.mean(0) - c.mean(0)
    direction /= np.linalg.norm(direction) + 1e-12
    pp, cc = p @ direction, c @ direction
    d_prime = (pp.mean() - cc.mean()) / np.sqrt((pp.var(ddof=1) + cc.var(ddof=1)) / 2)
    mu = feats.mean(0)
    top = np.linalg.svd(feats - mu, full_matrices=False)[2][0]
    score = np.abs((feats - mu) @ top - ((ref - mu) @ top).mean())
    auc = roc_auc_score(poisoned, score)
    return {"d_prime": round(float(d_prime), 3), "spectral_auc": round(float(auc), 3)}


def strip_entropy(model, x: torch.Tensor, pool: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Mean prediction entropy of each row of ``x`` superimposed on ``n`` random rows of ``pool`` (STRIP)."""
    rng = np.random.default_rng(seed)
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), 256):
            rows = x[i : i + 256]
            blended = 0.5 * rows[:, None] + 0.5 * pool[rng.integers(0, len(pool), (len(rows), n))]
            probs = model(blended.flatten(0, 1)).softmax(1).clamp_min(1e-12)
            out.append((-(probs * probs.log()).sum(1)).view(len(rows), n).mean(1))
    return torch.cat(out).numpy()


def strip_row(run, state, labels, truth, in_target, n: int, frr: float, seed: int) -> dict:
    x, _ = materialize(run.data.train)
    pool, _ = materialize(state.trusted)
    entropy = strip_entropy(run.model, x.to(run.device), pool.to(run.device), n, seed)
    reference = strip_entropy(run.model, pool.to(run.device), pool.to(run.device), n, seed + 1)
    flagged = entropy < np.quantile(reference, frr)
    hits = int((flagged & truth).sum())
    return {
        "strip_auc": round(float(roc_auc_score(truth[in_target], -entropy[in_target])), 3),
        "strip_recall": round(hits / max(1, int(truth.sum())), 3),
        "strip_precision": round(hits / max(1, int(flagged.sum())), 3),
        "strip_frr": frr,
        "strip_n": n,
        "entropy_poisoned_mean": round(float(entropy[truth].mean()), 3),
        "entropy_clean_mean": round(float(entropy[~truth].mean()), 3),
    }


def abl_row(run, truth: np.ndarray, epochs: int, seed: int) -> dict:
    from torch.nn import functional as F

    from aisec_train.train.config import TrainConfig
    from aisec_train.train.loop import train

    fresh = run.factory(seed=seed + 1)
    cfg = TrainConfig(epochs=epochs, lr=run.cfg.train.lr, batch_size=run.cfg.train.batch_size, seed=seed,
                      ema_decay=0.0)  # fmt: skip
    fresh = train(fresh, run.data.train, train_cfg=cfg, device=run.device, progress=False).model.eval()
    x, y = materialize(run.data.train)
    y = torch.as_tensor(y)
    with torch.no_grad():
        losses = [F.cross_entropy(fresh(x[i : i + 512].to(run.device)), y[i : i + 512].to(run.device), reduction="none")
                  for i in range(0, len(x), 512)]  # fmt: skip
    loss = torch.cat(losses).cpu()
    order = np.argsort(loss.numpy())
    share = {f: float(truth[order[: max(1, round(f * len(order)))]].mean()) for f in (0.01, 0.1)}
    return {"abl_epochs": epochs, "abl_auc": round(float(roc_auc_score(truth, -loss.numpy())), 3),
            "abl_precision_1pct": round(share[0.01], 3), "abl_precision_10pct": round(share[0.1], 3)}  # fmt: skip


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("attack")
    parser.add_argument("seed", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override KEY=VALUE")
    parser.add_argument("--out", type=output_file, default=None, help="append one JSON row per layer (JSON lines)")
    parser.add_argument("--strip", action="store_true", help="also measure STRIP at the input")
    parser.add_argument("--strip-n", type=int, default=16)
    parser.add_argument("--strip-frr", type=float, default=0.05)
    parser.add_argument("--abl", type=int, default=0, help="also measure loss dynamics after this many epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_configs()
    overrides = ["experiment=backdoor", "audit=off", "robustness.evaluate=false", f"backdoor.attack={args.attack}",
                 f"train.seed={args.seed}", *args.overrides]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    run = pipeline.Run(cfg=cfg, run_dir=args.work)
    rows = []
    with run.resources:
        for name, stage in pipeline.STAGES[:3]:  # data, backdoor_poison, train
            run.report.stage = name
            stage(run)
        state, train_split = run.backdoor, run.data.train
        trained = measure(run.model, run.data.test, *badnets.triggered(run.data.test, state.trigger, state.target_of),
                          run.device)  # fmt: skip
        labels, ref_labels = labels_of(train_split), labels_of(state.trusted)
        truth = np.zeros(len(labels), dtype=bool)
        truth[state.poisoned.indices] = True
        target = int(np.bincount(labels[truth]).argmax())  # all-to-one: the class every poisoned row now claims
        in_target = labels == target
        probe, _ = materialize(state.trusted, limit=2)
        head = retune.head_modules(run.model, state.layer.path, probe.to(run.device))
        for layer in [state.layer.path, head[-2] if len(head) > 1 else head[0]]:
            feats = detection_features(run.model, layer, train_split, run.device)
            ref = detection_features(run.model, layer, state.trusted, run.device)
            row = {"attack": args.attack, "seed": args.seed, "overrides": args.overrides, "layer": layer,
                   "dims": int(feats.shape[1]), "clean_accuracy": round(trained.clean_accuracy, 4),
                   "asr": round(trained.asr, 4), "target_rows": int(in_target.sum()),
                   "poisoned_rows": int(truth.sum())}  # fmt: skip
            row |= separation(feats[in_target], truth[in_target], ref[ref_labels == target])
            for name, detector in detect.DETECTORS.items():
                found = detector(feats, labels, ref, ref_labels, seed=args.seed)
                row[f"{name}_recall"] = round(detect.score(found, state.poisoned.indices, len(labels))["recall"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.strip:
            row = {"attack": args.attack, "seed": args.seed, "overrides": args.overrides, "layer": "input (STRIP)",
                   "clean_accuracy": round(trained.clean_accuracy, 4), "asr": round(trained.asr, 4)}  # fmt: skip
            row |= strip_row(run, state, labels, truth, in_target, args.strip_n, args.strip_frr, args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.abl:
            row = {"attack": args.attack, "seed": args.seed, "overrides": args.overrides, "layer": "loss (ABL)",
                   "poisoned_rows": int(truth.sum()), "rows": len(truth)}  # fmt: skip
            row |= abl_row(run, truth, args.abl, args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
