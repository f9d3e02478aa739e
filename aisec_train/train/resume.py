"""A run directory's identity, for resuming: which model on which data and split, with or without DP.

Every checkpoint the train stage writes carries it (:class:`CheckpointSlot`); :func:`load_resume` reads the last
one back and refuses, in one line, a config that would continue another run's training (another model, data,
split or privacy mode, or a dataset-ledger account charged at another delta, accountant or split).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    }


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
