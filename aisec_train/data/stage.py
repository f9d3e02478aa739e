"""The data stage of the pipeline: load and split the data, run the sanity checks, build and check the model
factory, open the privacy budget's account under DP, and report the data's identity and checks.

    load_dataset (manifest, pinned hash, split) -> sanity (pixel checks; text_run.py for token ids)
    -> ModelFactory + one forward pass (a model that does not fit is refused before the ledger store is touched)
    -> privacy admission (privacy/admission.py: the dataset ledger, locked for the run)
    -> ``data`` and ``model`` report sections, the integrity and sanity checklist items
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from aisec_train.data.dataset import load_dataset
from aisec_train.data.errors import DataError
from aisec_train.data.items import check_finite_split
from aisec_train.data.manifest import summary
from aisec_train.data.sanity import check_training_split
from aisec_train.data.views import labels_of
from aisec_train.errors import ConfigError
from aisec_train.models.factory import ModelFactory
from aisec_train.models.finetune import KEYS as FINETUNE_KEYS
from aisec_train.privacy.admission import open_spend
from aisec_train.report.outputs import write_json
from aisec_train.text_run import check_token_ids, is_text, text_sanity
from aisec_train.train.config import PrivacyMode
from aisec_train.train.launch import env_rank
from aisec_train.train.loop import resolve_device

if TYPE_CHECKING:
    from aisec_train.run_state import Run

SANITY = "sanity checks before training (NaN/inf, range, labels, balance, duplicates, outliers)"


def stage_data(run: Run) -> None:
    cfg = run.cfg
    run.device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed, train=run.user.train, test=run.user.test)
    check_finite_split(data.test, "the test split")  # scores on it are reported: NaN there is refused too
    check_normalize(cfg.dataset.normalize, data.input_shape)
    text_evidence = None
    if is_text(data):  # token ids: the pixel checks do not apply (text_run.py says which ran)
        sanity, text_evidence = text_sanity(data)
    else:
        sanity = check_training_split(
            data.train,
            data.num_classes,
            cfg.dataset.outlier_z,
            max_samples=cfg.dataset.sanity_samples,
            seed=data.split_seed,
            test_labels=labels_of(data.test),
        )
        check_attack_scale(cfg, sanity["stats"]["value_range"])
        check_l2_radius(cfg, data.input_shape)
    data.record("sanity_checks", findings=len(sanity["findings"]), coverage=sanity["coverage"])
    run.data = data
    run.factory = _factory(run)
    # Before the budget's account is opened: a model that does not fit the data used to be refused only after
    # the dataset's record set had been written to the ledger store.
    run.factory.check()  # the model takes these images and returns one logit per class, before any training
    if is_text(data):
        check_token_ids(run)  # every token id indexes the model's embedding (text_run.py)
    run.spend = open_spend(run) if env_rank() == 0 else None  # torchrun: rank 0 alone charges the job's one ledger
    if len(data.manifest["files"]) > 100:
        write_json(data.manifest, run.run_dir / "data_manifest.json")
    run.report.add(
        "data",
        name=data.name,
        manifest_sha256=data.manifest_sha256,
        manifest=summary(data.manifest),
        n_train=len(data.train),
        n_test=len(data.test),
        duplicates_removed=data.duplicates_removed,
        records=data.records_summary(),
        num_classes=data.num_classes,
        shape=list(data.input_shape),
        split_seed=data.split_seed,
        augmentation=[s for s in data.lineage if s["step"] == "augment"],
        sanity=sanity,
    )
    run.report.add("model", **run.factory.describe())
    _check_integrity(run)
    _check_sanity(run, sanity, text_evidence)


ATTACK_SCALE, SCALE_SLACK = (0.0, 1.0), 1e-6  # what robust/outcome.check_inputs holds the attacks' inputs to


def check_attack_scale(cfg: Any, value_range: list[float]) -> None:
    """The attacks (and adversarial training) project onto an eps-ball clamped to [0, 1] pixels: on data of another
    scale the clamp moved the images themselves, and the evasion item passed at robust accuracy = clean accuracy.
    The robustness stage refuses such inputs (robust/outcome.py); here it is refused before training and the
    budget's charge, by the training split's range (the sanity check's, on its sample)."""
    if not cfg.robustness.evaluate and cfg.robustness.mode.value == "none":
        return  # nothing attacks these images: the range stays a sanity finding
    lo, hi = value_range
    if lo >= ATTACK_SCALE[0] - SCALE_SLACK and hi <= ATTACK_SCALE[1] + SCALE_SLACK:
        return
    raise DataError(
        f"the training images span [{lo:.4g}, {hi:.4g}]; robustness evaluation and adversarial training attack "
        "images on the [0, 1] pixel scale: scale the images to [0, 1] (uint8 files are scaled on read) and put "
        "any normalisation in the model (dataset.normalize), or turn the attacks off (robustness.evaluate=false "
        "robustness=none)"
    )


def check_l2_radius(cfg: Any, input_shape: tuple[int, ...]) -> None:
    """An L2 radius at or above half the [0, 1] box's diameter (sqrt(D) / 2) holds the all-grey image in every ball:
    no model can be robust to it. The config checks Linf radii (< 0.5); an L2 one needs D, known here, before
    training (robust/outcome.check_radius holds the attacks to the same bound)."""
    limit = 0.5 * math.sqrt(math.prod(input_shape))
    rob = cfg.robustness
    radii = []
    if rob.evaluate:
        radii.append(("robustness.attack.eps", rob.attack.eps, rob.attack.norm.value))
    if rob.mode.value != "none":
        radii.append(("robustness.eps", rob.eps, rob.norm.value))
    for key, eps, norm in radii:
        if norm == "l2" and eps is not None and eps >= limit:
            raise ConfigError(
                f"{key}={eps} is not allowed: an l2 radius on [0, 1] images of {math.prod(input_shape)} values "
                f"must be < {limit:.4g} (at half the box's diameter every image's ball holds the all-grey image: no "
                "model can be robust)"
            )


def check_normalize(normalize: Any, input_shape: tuple[int, ...]) -> None:
    """Per-channel statistics must fit the images: one value for every channel, or one per channel. Found here,
    where the channel count is known; otherwise the model's first layer fails on it and the refusal names the
    model."""
    if normalize.mean is None or len(input_shape) != 3:  # token ids take no pixel normalisation (config.py)
        return
    channels = input_shape[0]
    allowed = "1 value" if channels == 1 else f"1 value (every channel) or {channels} (one per channel)"
    for key in ("mean", "std"):
        values = list(getattr(normalize, key) or [])
        if len(values) not in (1, channels):
            raise ConfigError(
                f"dataset.normalize.{key}={values!r} is not allowed: the images have {channels} channel(s); give "
                f"{allowed}"
            )


def _factory(run: Run) -> ModelFactory:
    """The one model factory, from the ``model`` config (or the API's model object), with the data's shape."""
    cfg, data = run.cfg, run.data
    assert data is not None
    normalize = cfg.dataset.normalize
    return ModelFactory(
        None if run.user.model is not None else cfg.model,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        private=cfg.privacy.mode is PrivacyMode.dpsgd,
        normalize=(normalize.mean, normalize.std) if normalize.mean is not None else None,
        template=run.user.model,
        device=str(run.device),
        template_tuning={k: v for k, v in cfg.model.items() if k in FINETUNE_KEYS}
        if run.user.model is not None
        else None,
    )


def _check_integrity(run: Run) -> None:
    data = run.data
    assert data is not None
    pinned = run.cfg.dataset.sha256 is not None
    run.report.check(
        "data pipeline",
        "data integrity verified against a pinned hash",
        "pass" if pinned else "fail",
        f"manifest SHA-256 {data.manifest_sha256}"
        + (" matched dataset.sha256" if pinned else "; no dataset.sha256 pin was given, so nothing was verified"),
        fix=f"aisec-train dataset.sha256={data.manifest_sha256} (with this run's other overrides)",
    )


def _check_sanity(run: Run, sanity: dict, text_evidence: str | None) -> None:
    if text_evidence is not None:  # not "pass": the criterion's pixel checks did not run
        run.report.check("data pipeline", SANITY, "not_applicable", text_evidence)
        return
    coverage, findings = sanity["coverage"], sanity["findings"]
    run.report.check(
        "data pipeline",
        SANITY,
        "pass",
        f"{len(findings)} finding(s): {', '.join(f['check'] for f in findings) or 'none'}; streamed over "
        + ("every training sample" if coverage["mode"] == "all" else f"a seeded sample of {coverage['checked']}")
        + f" of {coverage['of']} (labels: all)",
    )
