"""What a run does differently when its inputs are token ids (``dataset=text``, ``model=hf``).

Every stage that attacks or inspects pixels (robustness, extraction through the guard, input sanitisation, the
guard's malformed-image probes, the monitoring baseline and its rotation / occlusion drift check, image sanity
checks) answers its checklist items ``not_applicable`` with the reason, never a claim that did not run. The
membership audit (loss, LiRA, RMIA) only needs the model's loss on ``(input_ids, label)`` records, so it runs.
Combinations that would train or poison in pixel space are refused before any work (``config.check_text_config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from aisec_train.audit import evidence
from aisec_train.config import NO_IMAGES, NO_PGD
from aisec_train.errors import ConfigError

if TYPE_CHECKING:
    from aisec_train.data.dataset import DataBundle
    from aisec_train.run_state import Run

# (area, item) the robustness stage answers (robust/stage.py reads its EVASION and MASKING from here)
ROBUSTNESS_ITEMS = (
    ("model", "tested against evasion attacks"),
    ("model", "robust accuracy not inflated by gradient masking"),
)
# (area, item, reason) of the audit stage's image-only parts
IMAGE_AUDITS = (
    ("model", evidence.EXTRACTION, NO_IMAGES.format(what="the extraction attacker's query synthesis")),
    ("model", evidence.SANITIZATION, NO_IMAGES.format(what="input sanitisation (bit depth, smoothing)")),
    ("deployment", evidence.GUARD, NO_IMAGES.format(what="the guard's malformed-query probe set")),
    ("monitoring", "baseline input and confidence statistics saved with the model",
     NO_IMAGES.format(what="the monitoring baseline (per-pixel statistics)")),
    ("monitoring", evidence.DRIFT, NO_IMAGES.format(what="the drift check (noise, rotation, occlusion)")),
)  # fmt: skip


def is_text(data: DataBundle | None) -> bool:
    """Token-id records: the data stage's shape is ``(max_length,)``, not ``(C, H, W)``."""
    return data is not None and len(data.input_shape) == 1


def text_sanity(data: DataBundle) -> tuple[dict[str, Any], str]:
    """The checks that mean something on token ids: labels (range checked at load, counts here), empty and
    truncated records, duplicates (removed by record digest). The pixel checks are listed as skipped."""
    from aisec_train.data.views import labels_of

    labels = labels_of(data.train)
    counts = np.bincount(labels, minlength=data.num_classes)
    base = getattr(data.train, "dataset", data.train)  # a Subset of the TextDataset (hold-out, deduplicated)
    rows = np.asarray(getattr(data.train, "indices", range(len(data.train))), dtype=np.int64)
    ids, pad = getattr(base, "ids", None), getattr(base, "pad_token_id", None)
    findings: list[dict[str, Any]] = []
    empty = truncated = 0
    if ids is not None and pad is not None:
        lengths = (ids[rows] != pad).sum(dim=1).numpy()
        truncated = int((lengths >= ids.shape[1]).sum())  # filled every slot: the text was likely cut
        texts = [base.records[i][0] for i in rows]
        empty = sum(1 for t in texts if not t.strip())
    if empty:
        findings.append({"check": "empty_text", "count": empty})
    if truncated:
        findings.append({"check": "truncated_to_max_length", "count": truncated})
    if counts.min() < 0.1 * counts.max():
        findings.append({"check": "class_imbalance", "counts": counts.tolist()})
    sanity = {
        "findings": findings,
        "coverage": {"mode": "all", "checked": len(labels), "of": len(labels)},
        "class_counts": counts.tolist(),
        "skipped": {"checks": ["nan_inf", "pixel_range", "outliers"], "reason": NO_IMAGES.format(what="pixel checks")},
    }
    said = (
        f"{NO_IMAGES.format(what='NaN/inf, pixel range and outlier checks did not run')}; ran on "
        f"every one of {len(labels)} training records: labels in range, class counts {counts.tolist()}, "
        f"{data.duplicates_removed} exact duplicate(s) removed by record digest, {empty} empty, {truncated} "
        f"truncated to dataset.max_length; finding(s): {', '.join(f['check'] for f in findings) or 'none'}"
    )
    return sanity, said


def check_token_ids(run: Run) -> None:
    """Every token id of the data must index the model's input embedding: a ``dataset.tokenizer`` with a larger
    vocabulary than the model's used to pass the factory's check (blank ids) and crash the first training step
    with an IndexError traceback, after the dataset ledger was opened. Refused in one line before any step."""
    import torch

    assert run.data is not None and run.factory is not None
    with torch.random.fork_rng(devices=[]):  # a throwaway model: the run's random stream stays as it was
        model = run.factory(seed=0)
    inner = getattr(model, "model", model)  # HFClassifier wraps the transformers model
    get = getattr(inner, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        return
    for split, part in (("dataset.path", run.data.train), ("dataset.test_path", run.data.test)):
        base = getattr(part, "dataset", part)
        ids = getattr(base, "ids", None)
        if ids is None or ids.numel() == 0:
            continue
        top = int(ids.max())
        if top >= rows:
            tokenizer = run.cfg.dataset.tokenizer
            raise ConfigError(
                f"dataset.tokenizer={tokenizer!r} is not allowed with this model: it gives {split}'s records token "
                f"id {top}, and the model's input embedding has {rows} rows (another tokenizer than the model's?); "
                "allowed: the model's own tokenizer (dataset.tokenizer=null takes model.path's)"
            )


def skip_robustness(run: Run) -> None:
    run.report.add("robustness", robust_accuracy=None, attack=None, eval=None, training="none", skipped=NO_PGD)
    for area, item in ROBUSTNESS_ITEMS:
        run.report.check(area, item, "not_applicable", NO_PGD)


def skip_image_audits(run: Run) -> None:
    """The audit stage's image-only parts, answered not applicable (membership runs: audit/stage.py)."""
    extraction, guard = IMAGE_AUDITS[0][2], IMAGE_AUDITS[2][2]
    run.report.add("audit", extraction={"not_applicable": extraction}, sanitization=None,
                   guard_probes={"not_applicable": guard})  # fmt: skip
    run.report.add("monitoring", not_applicable=NO_IMAGES.format(what="the monitoring baseline"))
    for area, item, reason in IMAGE_AUDITS:
        run.report.check(area, item, "not_applicable", reason)
