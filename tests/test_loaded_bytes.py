"""The report's weight hashes vouch for the bytes the model was built from, never a later copy of the path.

The factory builds a model several times a run (training, audit references, federated clients, the report's own
describe()). ``model.checkpoint_sha256`` used to be hashed from the path at each build: a checkpoint swapped
mid-run was reported as the weights trained from, and a large file was re-read at every build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from aisec_train.errors import ConfigError
from aisec_train.models import SmallCNN, finetune
from aisec_train.models.factory import ModelFactory
from aisec_train.train import checkpoint
from tests.test_finetune_text import tiny_bert  # noqa: F401 - a fixture used by name

SPEC = {"_target_": "aisec_train.models.SmallCNN"}
SHAPE = (1, 8, 8)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=10, image_size=8).state_dict()


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _factory(path: Path, **tuning) -> ModelFactory:
    return ModelFactory({**SPEC, "checkpoint_path": str(path), **tuning}, input_shape=SHAPE, num_classes=10)


def _swap(path: Path, state: dict[str, torch.Tensor]) -> str:
    """Replace ``path`` atomically with other weights, as an attacker (or a careless re-export) would mid-run."""
    other = path.with_name(path.name + ".new")
    digest = _save(state, other)
    os.replace(other, path)
    return digest


def test_a_checkpoint_swapped_between_builds_is_neither_loaded_nor_reported(tmp_path):
    first, second = _weights(1), _weights(2)
    path = tmp_path / "base.pt"
    loaded = _save(first, path)
    factory = _factory(path)
    factory(seed=0)  # the training model: the file is read here
    swapped = _swap(path, second)
    assert swapped != loaded
    again = factory(seed=0)  # an audit reference model or a federated client, built later in the same run
    report = factory.describe()
    assert report["checkpoint_sha256"] == loaded, "the report named a file the model was not built from"
    assert torch.equal(again.state_dict()["conv1.weight"], first["conv1.weight"]), "two builds of one run differ"


def test_the_reader_returns_the_digest_of_exactly_the_bytes_it_parsed(tmp_path):
    state = _weights(3)
    path = tmp_path / "base.pt"
    digest = _save(state, path)
    loaded, got = finetune.read_weights(str(path))
    assert got == digest
    assert torch.equal(loaded["fc2.weight"], state["fc2.weight"])
    loaded, got = finetune.read_weights(str(path), digest)  # a right pin loads, from the same single read
    assert got == digest


@pytest.mark.usefixtures("keyed")
def test_a_tagged_checkpoint_is_pinned_and_reported_by_the_bytes_its_tag_verified(tmp_path):
    state = _weights(4)
    path = tmp_path / "model.pt"
    digest = checkpoint.save(state, path, root=tmp_path)
    loaded, got = finetune.read_weights(str(path), digest)
    assert got == digest == checkpoint.recorded_hash(path, root=tmp_path)
    assert torch.equal(loaded["fc2.bias"], state["fc2.bias"])
    with pytest.raises(ConfigError, match="model.checkpoint_sha256 pins 0{64}; refusing changed weights"):
        finetune.read_weights(str(path), "0" * 64)
    factory = _factory(path, checkpoint_sha256=digest)
    report = factory.describe()
    assert report["checkpoint_sha256"] == digest
    assert report["checkpoint_verified"].startswith("keyed tag verified")


@pytest.mark.usefixtures("keyed")
def test_a_tagged_checkpoint_swapped_with_another_tagged_one_mid_run_keeps_the_first_verdict(tmp_path):
    path = tmp_path / "model.pt"
    digest = checkpoint.save(_weights(5), path, root=tmp_path)
    factory = _factory(path)
    factory(seed=0)
    path.with_name("model.pt.tag").unlink()  # the verdict (keyed tag) must describe the read, not the path now
    _swap(path, _weights(6))
    report = factory.describe()
    assert report["checkpoint_sha256"] == digest
    assert report["checkpoint_verified"].startswith("keyed tag verified")


def _hf_factory(folder: Path) -> ModelFactory:
    return ModelFactory({"_target_": "aisec_train.models.hf.hf_model", "path": str(folder)}, (16,), num_classes=2)


def _reweigh(folder: Path, scale: float) -> None:
    """Replace the folder's weights (as a re-export or an attacker would), keeping every name and shape."""
    from safetensors.torch import load_file, save_file

    state = {k: v * scale for k, v in load_file(folder / "model.safetensors").items()}
    save_file(state, folder / "model.safetensors.new", metadata={"format": "pt"})
    os.replace(folder / "model.safetensors.new", folder / "model.safetensors")


def test_a_hf_folder_changed_between_builds_of_one_run_is_refused_not_mixed(tiny_bert, tmp_path):  # noqa: F811
    pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    factory = _hf_factory(folder)
    factory(seed=0)  # the training model
    first = factory.describe()["weights_sha256"]
    assert len(first) == 64
    factory(seed=1)  # another build of the same folder (a fresh head, another seed): the same loaded weights
    assert factory.describe()["weights_sha256"] == first
    _reweigh(folder, 0.5)
    with pytest.raises(ConfigError, match=r"model.path=.* changed during the run: .*refusing to train or report a mix"):
        factory(seed=0)  # an audit reference model or a federated client, built later in the same run
    assert _hf_factory(folder).describe()["weights_sha256"] != first  # a new run names the new weights


def test_an_npz_renamed_into_place_after_its_arrays_were_read_is_not_the_one_the_manifest_names(tmp_path, monkeypatch):
    """The arrays trained on and the file hash the manifest records (and a dataset.sha256 pin checks) come from
    one open file: the file used to be parsed, then hashed again by path, so a file renamed into place between the
    two was trained on under another file's hash."""
    import hashlib

    import numpy as np

    from aisec_train.data.config import DatasetConfig
    from aisec_train.data.dataset import load_dataset

    rng = np.random.default_rng(0)
    path, other = tmp_path / "d.npz", tmp_path / "other.npz"
    np.savez(path, x=rng.random((40, 4, 4)), y=np.arange(40) % 2)
    np.savez(other, x=rng.random((40, 4, 4)), y=np.arange(40) % 2)
    trained_from = hashlib.sha256(path.read_bytes()).hexdigest()
    real_load = np.load

    def load_then_swap(*args, **kwargs):  # the attacker's rename lands right after the arrays were parsed
        loaded = real_load(*args, **kwargs)
        if other.exists():
            other.replace(path)
        return loaded

    monkeypatch.setattr(np, "load", load_then_swap)
    data = load_dataset(DatasetConfig(name="npz", path=str(path)), seed=0)
    assert data.manifest["files"]["d.npz"] == trained_from
    assert hashlib.sha256(path.read_bytes()).hexdigest() != trained_from  # the swap did happen
