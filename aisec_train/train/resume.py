"""A run directory's identity, for resuming: which model on which data and split, with or without DP, and the
training recipe the report states (the training view's transforms, adversarial training).

Every checkpoint the train stage writes carries it (:class:`CheckpointSlot`); :func:`load_resume` reads the last
one back and refuses, in one line, a config that would continue another run's training (another model, data,
split, privacy mode, training view or adversarial training, or a dataset-ledger account charged at another delta,
accountant or split).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aisec_train.robust.config import training_attack
from aisec_train.train import checkpoint
from aisec_train.train.config import PrivacyMode

if TYPE_CHECKING:
    from aisec_train.run_state import Run

log = logging.getLogger("aisec_train")


def identity(run: Run) -> dict[str, Any]:
    """What a checkpoint of this run records about itself (``meta``)."""
    data = run.data
    assert data is not None
    return {
        "manifest_sha256": data.manifest_sha256,
        "model": model_identity(run),
        "private": run.cfg.privacy.mode is PrivacyMode.dpsgd,
        "split_seed": data.split_seed,
        "training": training_recipe(run),
    }


# Lineage steps that are checks, or that the identity holds under other keys (manifest, split seed): the rest
# transform the training view (deduplication, augmentation, a reserve carved out for a defence, a red team's poison).
_NOT_TRANSFORMS = ("load", "split", "sanity_checks")


def training_recipe(run: Run) -> dict[str, Any]:
    """What the weights were trained on and for beyond model and data, as the report states it: the training view's
    transforms (``data.lineage``) and the adversarial training (``train.adversarial_training``). A resume of a
    finished run trains nothing more, so its report describes this config: a recipe other than the checkpoint's
    released a red team's unrepaired model as "no poisoning red team in this run", or claimed PGD-AT for weights
    trained without it. Plain JSON types, so that it compares equal to a checkpoint's copy."""
    assert run.data is not None
    view = [step for step in run.data.lineage if step.get("step") not in _NOT_TRANSFORMS]
    rob = run.cfg.robustness
    recipe = {"view": view, "adversarial_training": rob.mode.value, "adversarial_attack": training_attack(rob)}
    return json.loads(json.dumps(recipe, default=str))


def _recipe_refusal(run: Run, recorded: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The one-line refusal of a resume whose training recipe differs from its checkpoint's, or None."""
    where = f"{run.run_dir} was trained"
    if recorded.get("view") != wanted["view"]:
        was, now = recorded.get("view") or [], wanted["view"]
        return (
            f"the training view {_view_words(now)} (backdoor.*, dataset.augment) is not allowed on resume: {where} "
            f"on {_view_words(was)} ({_first_difference(was, now)}); a resume would release that model under this "
            "config's report. Allowed: the run's backdoor and augmentation settings, or another hydra.run.dir"
        )
    if any(recorded.get(k) != wanted[k] for k in ("adversarial_training", "adversarial_attack")):
        return (
            f"robustness={_adversarial_words(wanted)} is not allowed on resume: {where} with "
            f"robustness={_adversarial_words(recorded)}; its report would claim adversarial training the weights did "
            "not have. Allowed: the run's robustness settings, or another hydra.run.dir"
        )
    return None


def _view_words(view: list[dict[str, Any]]) -> str:
    return " -> ".join(str(step.get("step")) for step in view) or "the split as loaded (no transform)"


def _first_difference(was: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """The first step that differs, by the settings it records (hashes left out: they follow from the settings)."""
    for i in range(max(len(was), len(now))):
        a, b = (was[i] if i < len(was) else {}), (now[i] if i < len(now) else {})
        if a == b:
            continue
        if a.get("step") != b.get("step"):
            return f"step {i + 1}: {a.get('step', 'none')} then, {b.get('step', 'none')} now"
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k) and not k.endswith("sha256")]
        changed = ", ".join(f"{k} {a.get(k)!r} then, {b.get(k)!r} now" for k in keys[:3]) or "its digests"
        return f"{a.get('step')}: {changed}"
    return "no difference"


def _adversarial_words(recipe: dict[str, Any]) -> str:
    attack = recipe.get("adversarial_attack")
    return str(recipe.get("adversarial_training")) + (f" (attack {attack})" if attack else "")


def model_identity(run: Run) -> dict[str, Any]:
    assert run.factory is not None
    return {
        "target": run.factory.target,
        "arguments": {k: v for k, v in (run.factory.spec or {}).items() if k[0] != "_"},
    }


def load_resume(run: Run) -> dict[str, Any] | None:
    """The run directory's last checkpoint when it continues this config's run; None when there is none."""
    if not run.checkpoint_path.exists():
        return None
    payload = checkpoint.load(run.checkpoint_path, root=run.run_dir)
    meta, data = payload.get("meta", {}), run.data
    assert data is not None
    model = model_identity(run)
    if meta.get("manifest_sha256") != data.manifest_sha256 or meta.get("model") != model:
        raise checkpoint.CheckpointError(
            f"{run.run_dir} holds a run of model {meta.get('model')} on data {meta.get('manifest_sha256')}; "
            f"this config trains {model} on {data.manifest_sha256}. Use another hydra.run.dir"
        )
    check_weights_fit(run, payload)  # a model object of the same class but other shapes (the API)
    if meta.get("split_seed", data.split_seed) != data.split_seed:
        raise checkpoint.CheckpointError(
            f"train.seed={run.cfg.train.seed} draws train/test split {data.split_seed}, but {run.run_dir} was "
            f"trained on split {meta.get('split_seed')}: resuming would turn training records into held-out ones. "
            "Keep the seed (or set dataset.split_seed), or use another hydra.run.dir"
        )
    if run.spend is not None:  # delta, accountant and split recorded in the dataset ledger must not move either
        privacy = run.cfg.privacy
        run.spend.ledger.check_invariants(
            run.spend.run_id, delta=privacy.delta, accountant=privacy.accountant.value, split_seed=data.split_seed
        )
    if meta.get("private") != (run.cfg.privacy.mode is PrivacyMode.dpsgd):
        raise checkpoint.CheckpointError(
            f"{run.run_dir} was trained with privacy={'dpsgd' if meta.get('private') else 'none'}; "
            "privacy cannot be switched on resume. Use another hydra.run.dir"
        )
    recorded = meta.get("training")  # absent from a checkpoint written before the recipe was recorded
    refusal = _recipe_refusal(run, recorded, training_recipe(run)) if isinstance(recorded, dict) else None
    if refusal:
        raise checkpoint.CheckpointError(refusal)
    log.info("resuming %s from epoch %d", run.checkpoint_path, payload["epoch"])
    return payload


def check_weights_fit(run: Run, payload: dict[str, Any]) -> None:
    """The checkpoint's weights must fit this run's model tensor for tensor. The identity names a model object
    (the Python API's ``model=``) by its class only, so another width of the same class used to pass it and fail
    in ``load_state_dict`` with a multi-line traceback once the train stage had begun; refused in one line."""
    import torch

    assert run.factory is not None
    with torch.random.fork_rng(devices=[]):  # a throwaway model: the run's random stream stays as it was
        fresh = run.factory(seed=0).state_dict()
    saved = payload.get("model") or {}
    for key in sorted(set(fresh) | set(saved)):
        there, here = saved.get(key), fresh.get(key)
        if there is None or here is None or tuple(there.shape) != tuple(here.shape):
            shape = lambda t: "absent" if t is None else tuple(t.shape)  # noqa: E731
            raise checkpoint.CheckpointError(
                f"{run.run_dir} holds a run of another {run.factory.target}: {key} is {shape(there)} in its "
                f"checkpoint, {shape(here)} in this model; use another hydra.run.dir (API: run_dir)"
            )


class CheckpointSlot:
    """Writes a checkpoint payload with the run's identity (picklable: data-parallel rank 0 calls it)."""

    def __init__(self, path: Path, meta: dict[str, Any], root: Path):
        self.path, self.meta, self.root = path, meta, root

    def __call__(self, payload: dict[str, Any]) -> None:
        checkpoint.save({**payload, "meta": self.meta}, self.path, root=self.root)
