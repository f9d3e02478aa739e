"""Monitoring baselines saved with the model, and the drift / confidence check against a new batch.

Features are each input value (pixel x channel) and its square, so both a shift of the mean and a change of
spread (noise) move a feature. A batch of n inputs gives each feature a z-score of its batch mean against the
training baseline, ``(mean_batch - mean_train) / (std_train / sqrt(n))``: about N(0, 1) for clean data at any
batch size. The overall drift score is the mean squared z (about 1 when clean); the confidence check is the
z-score of the drop in mean top-class probability against held-out calibration data.

Exit status of ``aisec-train-monitor``: 0 no alarm, 1 alarm (drift or confidence anomaly), 2 refused input.

    aisec-train-monitor RUN_DIR batch.npz [--json verdict.json] [--max-bytes N]
"""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aisec_train.config import MonitorConfig
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import to_nchw_float
from aisec_train.data.sources import NPZ_READ_ERRORS, DataError, _declared_npy
from aisec_train.hashing import sha256_bytes
from aisec_train.store.files import atomic_write, read_nofollow, validate_output_path

BASELINE = "monitor_baseline.json"
MAX_BATCH_BYTES = DatasetConfig().max_bytes  # a batch's declared size bound, as dataset.max_bytes bounds a dataset
STD_FLOOR = 1.0 / 32  # a feature constant in training (a border pixel) still gets a finite z-score


def _features(x: Tensor) -> Tensor:
    flat = x.reshape(len(x), -1).double()
    return torch.cat([flat, flat**2], dim=1)


@torch.no_grad()
def confidences(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = [
        torch.softmax(model(x[i : i + batch_size].to(device)), 1).max(1).values.cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).double()


def build_baseline(
    model: nn.Module, train_x: Tensor, calibration_x: Tensor, *, model_meta: dict[str, Any], cfg: MonitorConfig
) -> dict[str, Any]:
    feats = _features(train_x)
    conf = confidences(model, calibration_x)
    return {
        "version": 1,
        "model": model_meta,
        "input_shape": list(train_x.shape[1:]),
        "n_train": len(train_x),
        "feature_mean": feats.mean(0).tolist(),
        "feature_std": feats.std(0).tolist(),
        "confidence": {"mean": float(conf.mean()), "std": float(conf.std()), "n_calibration": len(conf)},
        "thresholds": {
            "drift": cfg.drift_threshold,
            "feature": cfg.feature_threshold,
            "confidence": cfg.confidence_threshold,
        },
    }


@dataclass
class Verdict:
    alarm: bool
    drift_score: float
    feature_z: list[float]
    drifted_features: list[str]
    confidence_mean: float
    confidence_z: float
    n: int
    reasons: list[str]

    def text(self) -> str:
        head = "ALARM" if self.alarm else "OK"
        lines = [
            f"{head}: {self.n} inputs; drift score {self.drift_score:.2f}; mean confidence {self.confidence_mean:.3f} "
            f"(z {self.confidence_z:+.2f}); {len(self.drifted_features)} drifted feature(s)"
        ]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alarm": self.alarm,
            "drift_score": self.drift_score,
            "drifted_features": self.drifted_features,
            "confidence_mean": self.confidence_mean,
            "confidence_z": self.confidence_z,
            "n": self.n,
            "reasons": self.reasons,
            "feature_z": self.feature_z,
        }


def _feature_name(j: int, shape: list[int]) -> str:
    size = int(np.prod(shape))
    kind, k = ("value", j) if j < size else ("square", j - size)
    c, rest = divmod(k, shape[1] * shape[2])
    return f"{kind}[c{c},y{rest // shape[2]},x{rest % shape[2]}]"


def check(baseline: dict[str, Any], model: nn.Module, x: Tensor) -> Verdict:
    shape = baseline["input_shape"]
    if list(x.shape[1:]) != shape:
        raise DataError(f"batch has inputs of shape {list(x.shape[1:])}; the baseline was built on {shape}")
    n = len(x)
    mean, std = torch.tensor(baseline["feature_mean"]), torch.tensor(baseline["feature_std"]).clamp_min(STD_FLOOR)
    z = (_features(x).mean(0) - mean) / (std / n**0.5)
    score = float((z**2).mean())
    th = baseline["thresholds"]
    drifted = [
        _feature_name(int(j), shape) for j in torch.argsort(z.abs(), descending=True) if abs(z[j]) > th["feature"]
    ]
    conf = confidences(model, x)
    base = baseline["confidence"]
    conf_z = float((conf.mean() - base["mean"]) / (max(base["std"], 1e-6) / n**0.5))
    reasons = _non_finite(z, conf)
    # Written as `not (x <= limit)` so that a NaN statistic is an alarm, never a silent OK.
    if not score <= th["drift"]:
        reasons.append(f"input drift: score {score:.2f} > {th['drift']} (top: {', '.join(drifted[:5])})")
    if not conf_z >= -th["confidence"]:
        reasons.append(
            f"confidence anomaly: mean {float(conf.mean()):.3f} vs baseline {base['mean']:.3f} "
            f"(z {conf_z:.2f} < -{th['confidence']})"
        )
    return Verdict(bool(reasons), score, z.tolist(), drifted, float(conf.mean()), conf_z, n, reasons)


def _non_finite(z: Tensor, conf: Tensor) -> list[str]:
    """NaN/inf statistics or model outputs are an alarm of their own (a broken baseline, model or batch)."""
    reasons = []
    if not torch.isfinite(z).all():
        reasons.append(f"non-finite input statistics: {int((~torch.isfinite(z)).sum())} feature z-score(s) NaN/inf")
    if not torch.isfinite(conf).all():
        reasons.append(f"non-finite model outputs on {int((~torch.isfinite(conf)).sum())} input(s)")
    return reasons


def refuse_non_finite(model: nn.Module, where: Path) -> None:
    """A model whose weights are NaN/inf is refused: its answers (and a monitor's OK) would mean nothing."""
    from aisec_train.train.checkpoint import CheckpointError

    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where} has non-finite weights ({', '.join(bad[:3])}); refusing to monitor it")


def read_batch(path: Path, max_bytes: int = MAX_BATCH_BYTES, *, expect: tuple[int, ...] | None = None) -> Tensor:
    """An unlabeled .npz batch (key ``x``; ``y`` optional) in any layout ``dataset=npz`` accepts.

    ``expect``: the model's input (C, H, W) (the baseline's ``input_shape``): a 4-D ``x`` is read in the layout that
    gives it, so a model trained with ``dataset.channels_last`` on a shape the layout rule calls ambiguous gets its
    batches read, not refused; a 4-D ``x`` that neither layout turns into it is refused in one line.

    ``x``'s .npy header is read first: a member that is no .npy (numpy hands it back as bytes), or one declaring more
    than ``max_bytes`` (numpy allocated it and ended in a MemoryError traceback, exit 1: "alarm"), is refused."""
    if not path.is_file():
        raise DataError(f"batch {str(path)!r} does not exist or is not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            if "x" not in members:
                raise DataError(f"{path} lacks array 'x'")
            shape, dtype = _declared_npy(archive, members["x"], path)
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if declared > max_bytes:
            raise DataError(
                f"{path}:x declares {declared} bytes (shape {tuple(shape)}, {dtype}), over --max-bytes={max_bytes}"
            )
        with np.load(path, allow_pickle=False) as archive:
            x = archive["x"]
    except DataError:
        raise
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{path} is not a readable .npz of numeric arrays: {' '.join(str(err).split())}") from err
    if not isinstance(x, np.ndarray):
        raise DataError(f"{path}:x is not a .npy array")
    x = to_nchw_float(x, f"{path.name}:x", expect=expect)
    if len(x) == 0 or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{path.name}:x must be a non-empty batch of finite values in [0, 1]")
    return torch.from_numpy(x)


def expected_shape(run_dir: Path) -> tuple[int, int, int] | None:
    """The run's model input (C, H, W) as its baseline states it, to read a batch's layout by; None when the baseline
    is missing or unreadable (``load_run`` then refuses it). It only picks one of two readings of the batch: the
    baseline is verified by ``load_run`` and ``check`` compares the batch with it."""
    from aisec_train.store.errors import StoreError

    try:
        shape = json.loads(read_nofollow(run_dir / BASELINE, root=run_dir)).get("input_shape")
    except (OSError, ValueError, AttributeError, StoreError):
        return None
    ok = isinstance(shape, list) and len(shape) == 3
    return tuple(shape) if ok and all(type(v) is int and v > 0 for v in shape) else None  # type: ignore[return-value]


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def check_baseline(baseline: dict[str, Any], path: Path) -> None:
    """Refuse (one line) a baseline :func:`check` cannot read: every statistic present, finite and of the size its
    ``input_shape`` implies, thresholds finite and > 0 (a hand-made or truncated file used to end in a traceback)."""
    shape = baseline.get("input_shape")
    problems = []
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v >= 1 for v in shape)):
        problems.append(f"input_shape {shape!r} is not [C, H, W]")
    else:
        size = 2 * int(np.prod(shape))
        for key in ("feature_mean", "feature_std"):
            values = baseline.get(key)
            if not (isinstance(values, list) and len(values) == size and all(map(_finite_number, values))):
                problems.append(f"{key} is not {size} finite numbers")
    conf = baseline.get("confidence")
    if not (isinstance(conf, dict) and all(_finite_number(conf.get(k)) for k in ("mean", "std"))):
        problems.append("confidence has no finite mean and std")
    th = baseline.get("thresholds")
    keys = ("drift", "feature", "confidence")
    if not (isinstance(th, dict) and all(_finite_number(th.get(k)) and th[k] > 0 for k in keys)):
        problems.append(f"thresholds {th!r} are not finite numbers > 0 for {', '.join(keys)}")
    if problems:
        raise DataError(f"{path} is not a usable monitoring baseline: {'; '.join(problems)}")


def recipe(factory: Any) -> dict[str, Any]:
    """How to rebuild the model a :class:`~aisec_train.models.ModelFactory` makes, as JSON values. The pipeline
    records it in ``model.pt``'s keyed tag, so the monitor builds what the key vouches for (an editable
    ``.hydra/config.yaml`` or report could otherwise name any ``_target_`` to import and call)."""
    spec = factory.spec if factory.template is None else None
    try:
        spec = json.loads(json.dumps(spec, allow_nan=False)) if spec is not None else None
    except (TypeError, ValueError):
        spec = None  # arguments that are not JSON values cannot be rebuilt from a record: the monitor refuses
    return {
        "target": factory.target,
        "spec": spec,
        "input_shape": [int(v) for v in factory.input_shape],
        "num_classes": int(factory.num_classes),
        "private": bool(factory.private),
        "normalize": [list(factory.normalize[0]), list(factory.normalize[1])] if factory.normalize else None,
    }


def _factory(rec: Any, baseline: dict[str, Any], model_path: Path):
    """The run's model factory from its keyed recipe, cross-checked against the baseline's ``model_meta``."""
    from aisec_train.models import ModelFactory
    from aisec_train.train.checkpoint import CheckpointError

    if not isinstance(rec, dict) or not isinstance(rec.get("spec"), dict):
        raise CheckpointError(
            f"{model_path}'s keyed tag records no model config to rebuild it from (a model given as a Python object, "
            "or a run older than this check); load it with the code that built it"
        )
    meta = baseline.get("model") if isinstance(baseline.get("model"), dict) else {}
    for key in ("target", "input_shape", "num_classes"):
        if key in meta and meta[key] != rec.get(key):
            raise CheckpointError(
                f"{BASELINE} describes model {key}={meta[key]!r} but {model_path}'s keyed tag records "
                f"{rec.get(key)!r}; refusing a baseline and model that do not belong together"
            )
    norm = rec.get("normalize")
    return ModelFactory(
        rec["spec"],
        input_shape=tuple(rec["input_shape"]),
        num_classes=int(rec["num_classes"]),
        private=bool(rec.get("private")),  # Opacus' ModuleValidator.fix, as in training: the state dict keys match
        normalize=(norm[0], norm[1]) if norm else None,
    )


def load_run(run_dir: Path) -> tuple[dict[str, Any], nn.Module]:
    """The baseline and the model it was saved with: rebuilt through the model factory from the recipe in
    ``model.pt``'s keyed tag, its weights read once, verified against that tag, and loaded with
    ``weights_only=True``."""
    from aisec_train.errors import ConfigError
    from aisec_train.store.files import read_nofollow
    from aisec_train.train import checkpoint

    path = run_dir / BASELINE
    try:
        raw = read_nofollow(path, root=run_dir)
        baseline = json.loads(raw)
    except FileNotFoundError:
        raise DataError(f"{run_dir} holds no {BASELINE}; run aisec-train with audit.enabled=true first") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable JSON baseline: {' '.join(str(err).split())}") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("input_shape"), list):
        raise DataError(f"{path} is not a monitoring baseline (no input_shape)")
    model_path = run_dir / "model.pt"
    state, manifest = checkpoint.load_with_manifest(model_path, root=run_dir)
    if manifest["meta"].get("finite") is not True:
        raise checkpoint.CheckpointError(
            f"{model_path} has non-finite weights (per its keyed tag); refusing to monitor it"
        )
    # The run's save stage records the baseline's SHA-256 in model.pt's keyed tag: an edited baseline (thresholds
    # raised so that nothing ever alarms, statistics moved) is refused, not trusted.
    recorded = manifest["meta"].get("monitor_baseline_sha256")
    if recorded is not None and sha256_bytes(raw) != recorded:
        raise checkpoint.CheckpointError(
            f"{path} has SHA-256 {sha256_bytes(raw)[:16]}..., but {model_path}'s keyed tag records "
            f"{str(recorded)[:16]}...: refusing an edited monitoring baseline"
        )
    factory = _factory(manifest["meta"].get("model"), baseline, model_path)
    try:
        model = factory(seed=0)
        model.load_state_dict(state)
    except (ConfigError, RuntimeError, TypeError, KeyError) as err:
        raise checkpoint.CheckpointError(
            f"{model_path} does not load into the model its tag records: {' '.join(str(err).split())[:300]}"
        ) from None
    refuse_non_finite(model, model_path)
    check_baseline(baseline, path)  # after the model: a baseline cannot be judged by a model of unknown origin
    return baseline, model.eval()


# What a run folder holds that --json must never replace (the verdict over the baseline made the run unmonitorable).
RUN_ARTIFACTS = ("model.pt", "model.pt.tag", "model.pt.sha256", BASELINE, "report.json", "model_card.md",
                 "security_report.md", "metrics.csv")  # fmt: skip


def _check_verdict_path(json_path: Path, run_dir: Path, batch: Path) -> None:
    """Refuse a ``--json`` that is the batch or one of the run's own files (or in its checkpoints folder)."""
    where = json_path.absolute().resolve()
    run = run_dir.absolute().resolve()
    ours = {(run / name): f"the run's {name}" for name in RUN_ARTIFACTS} | {batch.absolute().resolve(): "the batch"}
    what = ours.get(where) or ("the run's checkpoints" if where.is_relative_to(run / "checkpoints") else None)
    if what:
        raise DataError(f"--json {json_path} would overwrite {what}; write the verdict elsewhere (e.g. verdict.json)")


def main(argv: list[str] | None = None) -> None:
    from aisec_train import errors

    parser = errors.RefusingParser(
        prog="aisec-train-monitor",
        description="Check a .npz batch against a run's monitoring baseline. Exit 0: ok, 1: alarm, 2: refused.",
    )
    parser.add_argument("run_dir", type=Path, help="a finished aisec-train run folder")
    parser.add_argument("batch", type=Path, help=".npz holding x (N,H,W / N,H,W,C / N,C,H,W; uint8 or float 0-1)")
    parser.add_argument("--json", type=Path, help="also write the verdict as JSON here")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_BATCH_BYTES,
        help=f"refuse a batch whose x declares more bytes than this (default: {MAX_BATCH_BYTES}, as dataset.max_bytes)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with errors.refusing(parser.prog, errors.Refusal):  # DataError, CheckpointError, StoreError...
        if args.max_bytes < 1:
            raise DataError(f"--max-bytes={args.max_bytes} is not allowed: must be >= 1")
        if args.json:  # a symlink or an unwritable folder is refused before any work, not after it
            args.json = validate_output_path(args.json, what="--json")
            _check_verdict_path(args.json, args.run_dir, args.batch)
        # the input first: a bad batch is refused before any work (the model's input shape only picks its layout)
        batch = read_batch(args.batch, args.max_bytes, expect=expected_shape(args.run_dir))
        baseline, model = load_run(args.run_dir)
        verdict = check(baseline, model, batch)
    print(verdict.text())
    if args.json:
        with errors.refusing(parser.prog, errors.Refusal, OSError):  # a link planted since, a full disk
            atomic_write(args.json, json.dumps(verdict.to_dict(), indent=2), root=args.json.parent)
    sys.exit(1 if verdict.alarm else 0)


if __name__ == "__main__":
    main()
