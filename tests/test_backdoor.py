"""The backdoor red team and its defence, on real components and any model: BadNets views, the federated red team,
feature-layer resolution, detectors, hook-based Fine-Pruning with its verified bake, report, CLI.

Fast tests share small backdoored models trained in-process on digits (non-private, a few epochs, seconds) and one
short ``experiment=backdoor`` CLI run; the figure checks (full DP preset, second dataset) are ``slow``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from aisec_kernels.channel_stats import channel_stats_reference
from hydra import compose, initialize_config_dir
from torch import nn

from aisec_train import pipeline
from aisec_train.backdoor import badnets, detect, federated_poison, prune, trusted
from aisec_train.backdoor.bake import ChannelMask, bake, install_released_masks
from aisec_train.backdoor.config import BackdoorConfig, WeakTeacher
from aisec_train.backdoor.features import FeatureCache, detection_features, masked_accuracy
from aisec_train.backdoor.layers import find_feature_layer, masked, module_at, resolve_feature_layer
from aisec_train.backdoor.metrics import BackdoorMetrics, der, errors_to_target, measure
from aisec_train.cli import CONFIG_DIR
from aisec_train.config import register_configs, to_config
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.data.errors import DataError
from aisec_train.data.manifest import sha256_array
from aisec_train.data.views import Sample, labels_of, materialize, subset
from aisec_train.errors import ConfigError
from aisec_train.hashing import sha256_file
from aisec_train.models import MLP, ModelFactory, ResNet18GN, SmallCNN
from aisec_train.train.config import TrainConfig
from aisec_train.train.loop import accuracy, train
from tests.conftest import read_report, run_cli

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models and matrices: on two shared cores extra torch/BLAS threads mostly wait (3-25x slower here)."""
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency: BLAS and OpenMP pools

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read by run_cli for its subprocesses
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)
    os.environ.pop("OMP_NUM_THREADS") if env is None else os.environ.__setitem__("OMP_NUM_THREADS", env)


# ------------------------------------------------------------------------------------------------ user models
class PlainCNN(nn.Module):
    """A user's CNN with no ``features_out`` attribute: the analysis layer must be found (``body``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class BNResNet(nn.Module):
    """A user-defined ResNet-style model with BatchNorm (made DP-trainable by the factory's ModuleValidator.fix)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1, self.layer2 = Block(width, width, 1), Block(width, 2 * width, 2)
        self.layer3, self.layer4 = Block(2 * width, 4 * width, 2), Block(4 * width, 8 * width, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8 * width, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TokenBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))  # a residual stream: no weight bake can reproduce a mask here


class TinyViT(nn.Module):
    """Patch embedding then token blocks: auto-detection must refuse it; ``blocks.1`` works when named."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, 2, stride=2)
        self.blocks = nn.Sequential(TokenBlock(dim), TokenBlock(dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


class ConvFeature(nn.Module):
    """The feature layer is a Conv itself: the bake zeroes its own output channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.feat = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.feat(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


class SigmoidAfter(nn.Module):
    """A block ending in norm -> tanh, read through a sigmoid (f(0) != 0): only the block's inner norm bakes."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.GroupNorm(4, 12), nn.Tanh())
        self.fc = nn.Linear(12 * 4, 10)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.sigmoid(self.block(x)), 2).flatten(1))


class SkipReader(nn.Module):
    """The head reads the feature map and a skip path from the input: the cached replay cannot stand in for it."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh())
        self.skip = nn.Conv2d(1, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc((self.feat(x) + self.skip(x)).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------ helpers
def poisoned_run(tmp_path: Path, *overrides: str, stages: int = 2) -> pipeline.Run:
    """A pipeline Run after its real first ``stages`` stages (default: ``data`` and ``backdoor_poison``, no
    training), run as the pipeline runs them: inside the run's resources (under DP, the dataset ledger's lock)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["experiment=backdoor", *overrides]))
    run = pipeline.Run(cfg=cfg, run_dir=tmp_path)
    with run.resources:
        for name, stage in pipeline.STAGES[:stages]:  # the pipeline's own stages, looked up by position
            run.report.stage = name
            stage(run)
    assert [n for n, _ in pipeline.STAGES[:4]] == ["data", "backdoor_poison", "train", "backdoor_defend"]
    return run


def _region(side_h: int, side_w: int, s: int, position: str) -> tuple[slice, slice]:
    rows = slice(0, s) if position.startswith("top") else slice(side_h - s, side_h)
    cols = slice(0, s) if position.endswith("left") else slice(side_w - s, side_w)
    return rows, cols


def _digits_split():
    data = load_dataset(DatasetConfig(), seed=0)
    kept, clean = trusted.carve_reserve(data.train, 0.2, seed=0)
    trigger = badnets.Trigger(size=3)
    poisoned = badnets.poison(kept, rate=0.1, trigger=trigger, target_of=badnets.all_to_one(0), seed=0)
    attack, truth = badnets.triggered(data.test, trigger, badnets.all_to_one(0))
    return data, poisoned, clean, attack, truth


def _backdoor(model: nn.Module, epochs: int = 6) -> dict:
    """``model`` trained (non-private) on BadNets-poisoned digits, with its data."""
    data, poisoned, clean, attack, truth = _digits_split()
    cfg = TrainConfig(epochs=epochs, lr=0.1, batch_size=64, ema_decay=0.0)
    model = train(model, poisoned.view, train_cfg=cfg, device=CPU, progress=False).model
    return {"model": model, "poisoned": poisoned, "trusted": clean, "test": data.test, "attack": attack, "truth": truth}


@pytest.fixture(scope="module")
def backdoored():
    """The SmallCNN preset (feature layer ``features_out``, found automatically)."""
    return _backdoor(ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, (1, 8, 8), 10)(seed=0))


@pytest.fixture(scope="module")
def backdoored_plain():
    """A user's CNN without ``features_out``."""
    torch.manual_seed(0)
    return _backdoor(PlainCNN(), epochs=8)


# ------------------------------------------------------------------------------------------------ red team: views
@pytest.mark.parametrize(
    "overrides, target_of",
    [
        ([], lambda y: np.zeros_like(y)),
        (
            ["backdoor.rate=0.2", "backdoor.target=3", "backdoor.patch_size=2", "backdoor.patch_position=top_left"]
            + ["backdoor.patch_value=0.5"],
            lambda y: np.full_like(y, 3),
        ),
        (["backdoor.mapping=all_to_all"], lambda y: (y + 1) % 10),
    ],
    ids=["default", "custom-trigger", "all_to_all"],
)
def test_poisoning_is_a_view_over_the_training_split(tmp_path, overrides, target_of):
    run = poisoned_run(tmp_path, *overrides)
    bd, state, data = run.cfg.backdoor, run.backdoor, run.data
    fresh = load_dataset(run.cfg.dataset, seed=run.cfg.train.seed)
    kept, reserve = trusted.carve_reserve(fresh.train, bd.clean_fraction, run.cfg.train.seed)

    # the test split and the trusted reserve are the untouched originals; the reserve is a Subset, disjoint
    assert all(torch.equal(a, b) for a, b in zip(materialize(data.test), materialize(fresh.test), strict=True))
    assert state.trusted.indices == reserve.indices and not set(state.trusted.indices) & set(kept.indices)
    assert data.train.base.indices == kept.indices  # the view reads the kept rows, nothing was copied

    # exactly round(rate * N) rows carry the trigger and the attacker's label; every other row is unchanged
    idx = state.poisoned.indices
    assert len(idx) == round(bd.rate * len(kept)) and len(set(idx.tolist())) == len(idx)
    x, y = materialize(data.train)
    x0, y0 = materialize(kept)
    assert np.array_equal(y[idx].numpy(), target_of(y0[idx].numpy())) and np.array_equal(labels_of(data.train), y)
    assert bool((target_of(y0[idx].numpy()) != y0[idx].numpy()).all())  # each one a real attack sample
    rows, cols = _region(8, 8, bd.patch_size, bd.patch_position.value)
    assert bool((x[idx][..., rows, cols] == bd.patch_value).all())
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[rows, cols] = False
    assert torch.equal(x[idx][..., outside], x0[idx][..., outside])
    clean_rows = np.setdiff1d(np.arange(len(kept)), idx)
    assert torch.equal(x[clean_rows], x0[clean_rows]) and torch.equal(y[clean_rows], y0[clean_rows])

    # training reads the view (no augmentation configured); lineage hashes the rows, labels and trigger
    assert data.training_view() is data.train
    step = next(s for s in data.lineage if s["step"] == "badnets_poison")
    assert step["rate"] == bd.rate and step["n_poisoned"] == len(idx) and step["mapping"] == bd.mapping.value
    assert step["indices_sha256"] == sha256_array(idx.astype(np.int64))
    assert step["labels_sha256"] == sha256_array(y[idx].numpy().astype(np.int64))
    assert set(step) >= {"trigger_sha256"} and not any(k in step for k in ("x_sha256", "y_sha256"))
    assert [s["step"] for s in data.lineage][-2:] == ["reserve_trusted_clean", "badnets_poison"]
    assert run.report.get("backdoor.feature_layer") == "features_out"
    # the poison stage answers no checklist item (the lineage item is the pipeline's, written at the end)
    assert "backdoor_poison" not in run.report.owners.values()

    # triggered test inputs are views over the eligible test rows, with attacker and true labels
    attack, truth = badnets.triggered(data.test, state.trigger, state.target_of)
    xa, ya = materialize(attack)
    _, yt = materialize(truth)
    assert bool((xa[..., rows, cols] == bd.patch_value).all()) and np.array_equal(ya.numpy(), target_of(yt.numpy()))
    assert len(attack) == int((target_of(labels_of(data.test)) != labels_of(data.test)).sum())


def test_augmentation_applies_after_the_stamp(tmp_path):
    run = poisoned_run(tmp_path, "dataset.augment.horizontal_flip=true", "privacy=none")
    view, row = run.data.training_view(), int(run.backdoor.poisoned.indices[0])
    stored, _ = run.data.train[row]
    assert not bool((stored[..., 5:, :3] == 1.0).all())  # the stored image has no patch bottom-left
    torch.manual_seed(0)
    corners = set()
    for _ in range(20):
        x, label = view[row]
        assert label == 0
        corners |= {name for name, c in (("right", slice(5, 8)), ("left", slice(0, 3))) if (x[..., 5:, c] == 1).all()}
    assert corners == {"right", "left"}  # the flip moved the stamped patch: stamped first, augmented after


def test_a_poisoned_view_of_a_tensor_labelled_dataset_still_collates():
    base = Sample(torch.rand(40, 1, 8, 8), torch.arange(40) % 4)  # labels as 0-d tensors, like many user datasets
    poisoned = badnets.poison(base, rate=0.5, trigger=badnets.Trigger(2), target_of=badnets.all_to_one(0), seed=0)
    x, y = materialize(poisoned.view)
    rows = poisoned.indices
    assert len(rows) == 20 and (y[rows] == 0).all() and (x[rows, :, 6:, 6:] == 1).all()


def test_trusted_path_keeps_the_whole_training_split(tmp_path):
    digits = load_dataset(DatasetConfig(), seed=0)
    x, y = materialize(digits.test, limit=100)
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=(x[:, 0].numpy() * 255).round().astype(np.uint8), y=y.numpy())
    run = poisoned_run(tmp_path, f"backdoor.trusted_path={clean}")
    assert isinstance(run.backdoor.trusted, Sample) and len(run.backdoor.trusted) == 100 and run.backdoor.from_file
    assert len(run.data.train) == len(digits.train)  # nothing carved out of the training data
    step = next(s for s in run.data.lineage if s["step"] == "trusted_clean_set")
    assert step["sha256"] == sha256_file(clean)
    scope = trusted.privacy_scope(from_file=True, n_trusted=100, n_train=len(run.data.train), private=True)
    assert scope["not_covered_records"] == 0 and scope["covered_records"] == len(digits.train)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((5, 12, 12), np.uint8), y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"backdoor.trusted_path='.*wrong.npz' holds images \(1, 12, 12\)"):
        poisoned_run(tmp_path, f"backdoor.trusted_path={wrong}")

    # Damaged files: a value byte flipped (zipfile's CRC check) and an .npy header numpy cannot tokenize.
    data = clean.read_bytes()
    at = data.index(b"}") + 80
    for name, bad in (
        ("crc.npz", data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]),
        ("header.npz", data.replace(b"'fortran_order': False", b"'fortran_order'[ False", 1)),
    ):
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(DataError, match=rf"backdoor.trusted_path='.*{name}' is not a readable .npz"):
            poisoned_run(tmp_path, f"backdoor.trusted_path={tmp_path / name}")


def test_filtering_under_dp_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"backdoor.filter=True is not allowed with privacy=dpsgd.*allowed:"):
        poisoned_run(tmp_path, "backdoor.filter=true")
    assert poisoned_run(tmp_path, "backdoor.filter=true", "privacy=none").backdoor is not None


def test_filter_retrains_a_fresh_factory_model_on_the_kept_rows(tmp_path):
    overrides = ["privacy=none", "backdoor.filter=true", "train.epochs=3", "backdoor.finetune_epochs=2"]
    run = poisoned_run(tmp_path, *overrides, stages=4)  # data, poison, train, defend (detect -> filter -> prune)
    assert run.model is not run.result.model  # the defence replaced the trained model by the retrained one
    found = run.backdoor.detections[run.cfg.backdoor.detection.value]
    step = next(s for s in run.data.lineage if s["step"] == "filter_flagged")
    assert step["dropped"] == len(found.flagged) > 0 and step["n_train"] == len(run.data.train) - len(found.flagged)
    bd = run.report.get("backdoor")
    assert list(bd["stages"]) == ["trained", "filtered", "fine_pruned"] and bd["fine_pruning"]["bake"]["method"]
    assert {c["item"] for c in run.report.checklist if run.report.owners[(c["area"], c["item"])] == "backdoor_defend"}


def test_a_feature_layer_that_does_not_exist_is_refused_in_the_poison_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"^backdoor.feature_layer='nope' is not allowed: no such module \(top-level"):
        poisoned_run(tmp_path, "backdoor.feature_layer=nope")


# ------------------------------------------------------------------------------------------------ federated red team
def test_federated_red_team_poisons_the_first_k_clients_shards(tmp_path):
    if importlib.util.find_spec(federated_poison.PARTITION_MODULE) is None:
        pytest.skip(f"{federated_poison.PARTITION_MODULE} is not written yet")
    run = poisoned_run(tmp_path, "federated=fedavg", "backdoor.malicious_clients=2", "backdoor.rate=0.3")
    state, data, bd = run.backdoor, run.data, run.cfg.backdoor
    parts = state.client_indices
    assert state.malicious_clients == (0, 1) and len(parts) == run.cfg.federated.clients
    # the (IID, default) shards partition the kept training rows; the trusted reserve (carved first) is in none
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(data.train)))
    assert not set(state.trusted.indices) & set(data.train.base.indices)
    # the same partition the federated package computes for these labels and settings
    again = federated_poison.client_partition(labels_of(data.train.base), run.cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # rate of each malicious shard, drawn among its eligible rows; honest shards hold no poison
    clean_labels = labels_of(data.train.base)
    for client, shard in enumerate(parts):
        mine = np.intersect1d(state.poisoned.indices, shard)
        if client < 2:
            eligible = int((clean_labels[shard] != bd.target).sum())
            assert len(mine) == min(round(bd.rate * len(shard)), eligible) == state.poisoned_per_client[client] > 0
            assert (labels_of(data.train)[mine] == bd.target).all()
        else:
            assert len(mine) == 0
    step = next(s for s in data.lineage if s["step"] == "badnets_poison")
    assert step["malicious_clients"] == 2 and step["rate_of"] == "each malicious client's shard"
    import pickle

    assert pickle.loads(pickle.dumps(state)).client_rows(1).tolist() == parts[1].tolist()  # travels to clients


# ------------------------------------------------------------------------------------------------ feature layers
@pytest.mark.parametrize(
    "model, shape, path",
    [
        (SmallCNN(1, 10, 8), (1, 8, 8), "features_out"),
        (MLP(1, 10, 8), (1, 8, 8), "features_out"),
        (ResNet18GN(3, 10, 8), (3, 8, 8), "features_out"),
        (PlainCNN(), (1, 8, 8), "body"),
    ],
    ids=["cnn", "mlp", "resnet18_gn", "plain-cnn"],
)
def test_feature_layer_is_found_on_presets_and_plain_models(model, shape, path):
    assert find_feature_layer(model, shape) == path


def test_feature_layer_of_a_batchnorm_resnet_fixed_by_the_factory():
    factory = ModelFactory({"_target_": "tests.test_backdoor.BNResNet"}, (3, 16, 16), 10, private=True)
    model = factory(seed=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # ModuleValidator.fix replaced them
    layer = resolve_feature_layer(model, (3, 16, 16), None)
    assert (layer.path, layer.found_by, layer.channels, layer.output_shape) == ("layer4", "automatic", 64, (64, 2, 2))


def test_feature_layer_of_timm_resnet18_at_16x16():
    pytest.importorskip("timm")
    spec = {"_target_": "aisec_train.models.timm_model", "arch": "resnet18"}
    factory = ModelFactory(spec, (3, 16, 16), 10, private=True, normalize=([0.5] * 3, [0.25] * 3))
    layer = resolve_feature_layer(factory(seed=0), (3, 16, 16), None)  # inside the input-normalisation wrapper
    assert layer.path == "layer4" and layer.channels == 512


def test_a_vit_needs_an_explicit_path_and_then_masks_its_tokens():
    vit = TinyViT().eval()
    with pytest.raises(ConfigError, match=r"backdoor.feature_layer=None is not allowed.*token-shaped.*blocks.7"):
        find_feature_layer(vit, (1, 8, 8))
    layer = resolve_feature_layer(vit, (1, 8, 8), "blocks.1")
    assert (layer.found_by, layer.channels, layer.output_shape, layer.map_shape) == (
        "backdoor.feature_layer",
        16,
        (16, 16),
        (16, 16, 1),
    )
    x = torch.rand(3, 1, 8, 8)
    feats = detection_features(vit, "blocks.1", Sample(x, torch.zeros(3, dtype=torch.long)), CPU)
    assert feats.shape == (3, 256)
    mask = torch.ones(16)
    mask[:5] = 0
    with masked(vit, "blocks.1", mask), torch.no_grad():
        seen = []
        handle = vit.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        vit(x)
        handle.remove()
    assert bool((seen[0][..., :5] == 0).all()) and bool((seen[0][..., 5:] != 0).any())
    with pytest.raises(ConfigError, match=r"backdoor.feature_layer='blocks.9' is not allowed: no such module"):
        resolve_feature_layer(vit, (1, 8, 8), "blocks.9")


# ------------------------------------------------------------------------------------------------ detection
def _crafted(rng: np.random.Generator, poison: int) -> tuple[np.ndarray, ...]:
    """10 Gaussian classes in 32-d; ``poison`` samples of other classes shifted along one direction, labelled 0."""
    means = rng.normal(0, 4, size=(10, 32))
    labels = np.repeat(np.arange(10), 60)
    feats = means[labels] + rng.normal(0, 1, size=(600, 32))
    source = rng.integers(1, 10, size=poison)
    shift = rng.normal(0, 1, size=32)
    shift *= 6 / np.linalg.norm(shift)
    bad = means[source] * 0.2 + means[0] * 0.8 + shift + rng.normal(0, 1, size=(poison, 32))
    ref_labels = np.repeat(np.arange(10), 25)
    ref = means[ref_labels] + rng.normal(0, 1, size=(250, 32))
    return np.vstack([feats, bad]), np.concatenate([labels, np.zeros(poison, int)]), ref, ref_labels


@pytest.mark.parametrize("method", sorted(detect.DETECTORS))
def test_detectors_find_crafted_poison_and_leave_clean_data_alone(method):
    feats, labels, ref, ref_labels = _crafted(np.random.default_rng(0), poison=60)
    truth = np.arange(600, 660)
    found = detect.DETECTORS[method](feats, labels, ref, ref_labels)
    hits = len(set(found.flagged.tolist()) & set(truth.tolist()))
    assert hits / len(truth) >= 0.95 and hits / max(1, len(found.flagged)) >= 0.85
    scored = detect.score(found, truth, len(labels))
    assert scored["recall"] == pytest.approx(hits / len(truth))
    assert scored["precision"] == pytest.approx(hits / len(found.flagged))

    clean, clean_labels, ref, ref_labels = _crafted(np.random.default_rng(1), poison=0)
    assert len(detect.DETECTORS[method](clean, clean_labels, ref, ref_labels).flagged) <= 0.05 * len(clean)


@pytest.mark.parametrize("which, path", [("backdoored", "features_out"), ("backdoored_plain", "body")])
def test_detectors_find_the_poison_of_a_trained_model(request, which, path):
    case = request.getfixturevalue(which)
    model, poisoned, clean = case["model"], case["poisoned"], case["trusted"]
    feats = detection_features(model, path, poisoned.view, CPU)  # streamed over the view
    ref = detection_features(model, path, clean, CPU)
    assert feats.shape[0] == len(poisoned.view) and feats.shape[1] == ref.shape[1] <= 4096
    truth = set(poisoned.indices.tolist())
    for method, detector in detect.DETECTORS.items():
        found = set(detector(feats, labels_of(poisoned.view), ref, labels_of(clean)).flagged.tolist())
        recall, precision = len(found & truth) / len(truth), len(found & truth) / max(1, len(found))
        assert recall >= 0.8 and precision >= 0.7, (which, method, recall, precision)


# ------------------------------------------------------------------------------------------------ Fine-Pruning
def test_feature_cache_replays_the_masked_model_exactly(backdoored):
    model, clean = backdoored["model"], backdoored["trusted"]
    mask = (torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    cache = FeatureCache.build(model, "features_out", clean, CPU)
    x, _ = materialize(clean, limit=50)
    with masked(model, "features_out", mask):
        want = accuracy(model, clean, CPU)
        logits = model.eval()(x)
    assert cache.accuracy(model, mask) == want
    torch.testing.assert_close(cache.logits(model, slice(0, 50), mask), logits, atol=1e-5, rtol=1e-5)
    assert masked_accuracy(model, "features_out", clean, CPU)[1] == "replay"


def test_masked_accuracy_falls_back_to_forward_passes_when_the_replay_is_wrong():
    torch.manual_seed(0)
    model, data = SkipReader().eval(), Sample(torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    acc, mode = masked_accuracy(model, "feat", data, CPU)
    assert mode == "forward"
    for seed in range(3):
        mask = (torch.rand(8, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
        with masked(model, "feat", mask):
            assert acc(mask) == accuracy(model, data, CPU)
    _, mode = masked_accuracy(model, "feat", data, CPU, max_bytes=1)  # too big to cache: forward too
    assert mode == "forward"


def test_channel_ranking_runs_the_kernel_dispatch_and_equals_the_reference(backdoored, monkeypatch):
    import triton  # a test dependency; tests/conftest.py imported it under the interpreter on a CPU machine
    from triton.runtime.interpreter import InterpretedFunction

    model, clean = backdoored["model"], backdoored["trusted"]
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if device.type == "cpu":
        assert isinstance(triton.language.zeros, InterpretedFunction), "conftest must import triton interpreted"
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    maps = FeatureCache.build(model.to(device), "features_out", subset(clean, range(8)), device).maps
    order, stats = prune.rank_channels(maps, backend="triton")
    want = channel_stats_reference(maps)
    torch.testing.assert_close(stats.mean.cpu(), want.mean.cpu(), atol=1e-5, rtol=1e-5)
    assert order == prune.rank_channels(maps, backend="torch")[0]
    assert order == torch.argsort(maps.float().mean(dim=(0, 2, 3)).cpu(), stable=True).tolist()
    model.to(CPU)


def test_erased_boxes_are_used_only_for_a_model_the_repair_does_not_learn_from(backdoored):
    """``backdoor.repair_erase``: boxes follow the teacher gate's measures. The trained SmallCNN is a teacher (right
    on the trusted rows, or beating fine-tuning alone on held-out ones): no boxes. An untrained model is not: any
    fine-tuning beats it, and it gets them."""
    cfg, rows = BackdoorConfig(finetune_epochs=8), backdoored["trusted"]
    assert BackdoorConfig().repair_erase == 1.0  # on by default, behind the check
    strong = prune.fine_prune(copy.deepcopy(backdoored["model"]), "features_out", rows, CPU, cfg)
    check = strong.erase_check
    assert check["used"] is False and strong.distilled, check
    assert check["trusted_accuracy"] >= 0.95 or check["teacher"] - check["student"] >= 0.02, check
    untrained = ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, (1, 8, 8), 10)(seed=1)
    weak = prune.fine_prune(untrained, "features_out", rows, CPU, cfg)
    assert weak.erase_check["used"] is True and not weak.distilled, weak.erase_check
    assert weak.erase_check["student"] > weak.erase_check["teacher"] + 0.02
    off = prune.fine_prune(copy.deepcopy(untrained), "features_out", rows, CPU,
                           dataclasses.replace(cfg, repair_erase=0.0))  # fmt: skip
    assert off.erase_check is None
    few = subset(rows, range(prune.MIN_HELD_OUT - 1))  # too few rows to measure on: no boxes
    assert prune.fine_prune(copy.deepcopy(untrained), "features_out", few, CPU, cfg).erase_check["used"] is False


def test_fine_pruning_removes_the_backdoor_and_bakes_the_mask(backdoored):
    model = copy.deepcopy(backdoored["model"])
    splits = (backdoored["test"], backdoored["attack"], backdoored["truth"])
    before = measure(model, *splits, CPU)
    assert before.asr >= 0.9  # the red team worked
    cfg = BackdoorConfig()
    pruned = prune.fine_prune(model, "features_out", backdoored["trusted"], CPU, cfg, evaluate={"asr": splits[1]})
    after = measure(model, *splits, CPU)
    # the bars: ASR <= 0.05 within 2 points of clean accuracy (0.05 points before the head re-init)
    assert after.asr <= 0.05 and before.clean_accuracy - after.clean_accuracy <= 0.02, (before, after)
    assert (pruned.head_mode, pruned.head) == ("shift", ["fc2"])  # FST: only the classifier was re-initialised
    assert len(pruned.curve) == 65 and pruned.curve[0]["pruned"] == 0 and "asr" in pruned.curve[0]
    assert pruned.base_accuracy - pruned.accuracy <= cfg.prune_acc_drop and pruned.evaluation == "replay"
    # the saved weights are the pruned model: no hook, the reader ignores every pruned channel
    assert (pruned.baked.method, pruned.baked.module) == ("reader", "fc1")
    reader = model.fc1.weight.detach().view(64, 64, 4)
    dropped = (pruned.mask == 0).nonzero().flatten()
    assert len(dropped) and bool((reader[:, dropped] == 0).all())
    assert not module_at(model, "features_out")._forward_hooks


def test_distillation_loss_is_hintons_and_leaves_the_teacher_alone():
    from torch.nn import functional as F

    from aisec_train.train.objectives import Distillation

    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4).requires_grad_(False)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    before = teacher.weight.clone()
    loss, logits = Distillation(teacher, temperature=2.0, weight=0.3)(student, student, x, y, nn.CrossEntropyLoss())
    p, q = F.softmax(teacher(x) / 2, 1), F.log_softmax(student(x) / 2, 1)
    want = 0.7 * F.cross_entropy(student(x), y) + 0.3 * 4 * (p * (p.log() - q)).sum(1).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None and torch.equal(teacher.weight, before)
    torch.testing.assert_close(logits, student(x))


def test_fine_pruning_distils_only_from_a_teacher_right_on_the_trusted_data(backdoored):
    """The gate reads the pre-repair model's trusted accuracy; a distilled repair stays closer to the teacher."""
    from torch.nn import functional as F

    trusted_set = backdoored["trusted"]
    x, _ = materialize(trusted_set)
    with torch.no_grad():
        want = F.log_softmax(backdoored["model"](x), 1)
    cfg = BackdoorConfig(finetune_epochs=10)
    gate = functools.partial(prune.teacher_for, backdoored["model"], trusted_set, CPU)
    assert gate(0.94, cfg) is None  # below the default gate of 0.95, nothing held out to compare with
    assert gate(0.99, BackdoorConfig(distill_weight=0.0)) is None
    teacher = gate(0.95, cfg)
    assert teacher.mode == "full" and teacher.exclude is None
    assert teacher.model is not backdoored["model"] and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    distances = {}
    for gate in (0.0, 1.0):  # the fixture's trusted accuracy is below 1.0: the second never distils
        model = copy.deepcopy(backdoored["model"])
        gated = dataclasses.replace(cfg, distill_min_teacher_accuracy=gate, distill_weak_teacher=WeakTeacher.off)
        pruned = prune.fine_prune(model, "features_out", trusted_set, CPU, gated)
        assert pruned.distilled is (gate == 0.0) and pruned.base_accuracy < 1.0
        with torch.no_grad():
            got = F.log_softmax(model(x), 1)
        distances[gate] = float(F.kl_div(got, want, log_target=True, reduction="batchmean"))
    assert distances[0.0] < 0.5 * distances[1.0], distances


def test_guarded_distillation_leaves_out_one_class_and_the_rows_the_teacher_gets_wrong():
    from torch.nn import functional as F

    from aisec_train.train.objectives import Distillation

    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4).requires_grad_(False)
    x = torch.randn(8, 6)
    y = teacher(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # the teacher is wrong on the first three rows
    guarded = Distillation(teacher, temperature=2.0, weight=0.4, exclude=1, correct_only=True)
    loss, _ = guarded(student, student, x, y, nn.CrossEntropyLoss())
    keep = [0, 2, 3]
    p, q = F.softmax(teacher(x)[:, keep] / 2, 1), F.log_softmax(student(x)[:, keep] / 2, 1)
    kl = (p * (p.log() - q)).sum(1) * torch.tensor([0.0] * 3 + [1.0] * 5)
    torch.testing.assert_close(loss, 0.6 * F.cross_entropy(student(x), y) + 0.4 * 4 * kl.mean())
    # The soft term alone sends no gradient to the excluded class's logit, nor through the wrong rows.
    soft_only = Distillation(teacher, temperature=2.0, weight=1.0, exclude=1, correct_only=True)
    logits = student(x).detach().requires_grad_(True)
    loss, _ = soft_only(lambda _: logits, None, x, y, nn.CrossEntropyLoss())
    loss.backward()
    assert bool((logits.grad[:, 1] == 0).all()) and bool((logits.grad[:3] == 0).all())
    assert float(logits.grad[3:, keep].abs().sum()) > 0


def test_unlabelled_distillation_adds_the_soft_term_on_drawn_inputs_without_the_excluded_class():
    from torch.nn import functional as F

    from aisec_train.train.objectives import CrossEntropy, UnlabelledDistillation

    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4).requires_grad_(False)
    x, y, pool = torch.randn(5, 6), torch.randint(0, 4, (5,)), torch.randn(40, 6)
    loss, logits = UnlabelledDistillation(CrossEntropy(), teacher, pool, 2.0, 0.3, exclude=1, seed=7)(
        student, student, x, y, nn.CrossEntropyLoss()
    )
    rows = pool[torch.randint(40, (5,), generator=torch.Generator().manual_seed(7))]  # as many rows as the batch
    keep = [0, 2, 3]
    p, q = F.softmax(teacher(rows)[:, keep] / 2, 1), F.log_softmax(student(rows)[:, keep] / 2, 1)
    want = F.cross_entropy(student(x), y) + 0.3 * 4 * (p * (p.log() - q)).sum(1).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logits, student(x))  # accuracy is counted on the labelled batch only

    def term(teacher):
        objective = UnlabelledDistillation(CrossEntropy(), teacher, pool, 2.0, 0.3, exclude=1, seed=7)
        return float(objective(student, student, x, y, nn.CrossEntropyLoss())[0].detach())

    # The teacher's mass on the excluded class (a backdoor's target on triggered inputs) passes on nothing.
    moved = copy.deepcopy(teacher)
    with torch.no_grad():
        moved.bias[1] += 5.0
    assert term(moved) == pytest.approx(term(teacher), abs=1e-6)
    with torch.no_grad():
        moved.bias[2] += 5.0
    assert abs(term(moved) - term(teacher)) > 1e-3


def test_leaning_class_is_the_one_the_model_over_predicts_on_other_classes_rows():
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 0.0]))
    rows = TensorDataset(torch.randn(200, 5), torch.arange(200) % 4)
    leaning, lean = prune.leaning_class(model, rows, CPU)
    assert leaning == 2 and len(lean) == 4 and lean[2] == max(lean) and lean[2] > 2 * sorted(lean)[-2]


def test_the_training_inputs_excess_names_the_class_a_trigger_sends_them_to():
    """A clean-data lean toward class 2 (a bias) beside a trigger that sends 10% of the training inputs to 0: the lean
    names 2, the training inputs' excess names 0; without triggered inputs the excess follows the lean."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
        model.bias.copy_(torch.tensor([0.0, 0.0, 0.3, 0.0]))
    clean_rows = torch.randn(400, 4, generator=g)
    trusted_rows = TensorDataset(clean_rows, clean_rows.argmax(1))
    assert prune.leaning_class(model, trusted_rows, CPU)[0] == 2
    clean, stamped = torch.randn(900, 4, generator=g), torch.randn(100, 4, generator=g)
    stamped[:, 0] = 4.0
    excess = prune.over_predicted(model, torch.cat([clean, stamped]), trusted_rows, CPU)
    assert int(np.argmax(excess)) == 0 and excess[0] > 0.08 and len(excess) == 4 and abs(sum(excess)) < 1e-3
    assert int(np.argmax(prune.over_predicted(model, clean, trusted_rows, CPU))) == 2
    # a class no trusted label names and the model never predicts still has its entry, as in the lean
    never_three = TensorDataset(clean_rows[:10], torch.tensor([0, 1, 2] * 3 + [0]))
    assert len(prune.over_predicted(model, clean[:5] * 0, never_three, CPU)) == 4


@pytest.mark.parametrize(
    "lean, excess, target",
    [
        # natural BadNets seed 8: the lean names 7, the excess 0 (a learnt backdoor)
        ([0.052, 0.02, 0.018, 0.022, 0.03, 0.017, 0.019, 0.058, 0.02, 0.016],
         [0.088, -0.01, 0.0, 0.018, -0.02, 0.005, -0.01, -0.03, -0.02, -0.015], 0),
        # natural WaNet seed 0: a backdoor never learnt; the lean names 0, the excess (noise) 5
        ([0.139, 0.02, 0.018, 0.022, 0.049, 0.017, 0.019, 0.02, 0.021, 0.016],
         [0.021, -0.01, 0.0, 0.018, -0.02, 0.052, -0.01, -0.03, -0.02, 0.033], 0),
        # both name class 3
        ([0.02, 0.02, 0.018, 0.08, 0.03, 0.017, 0.019, 0.02, 0.02, 0.016],
         [0.0, -0.01, 0.0, 0.09, -0.02, 0.005, -0.01, -0.03, -0.02, -0.015], 3),
        ([0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0], 0),  # no signal at all: no division by zero, a class is named
    ],
    ids=["lean-wrong", "excess-wrong", "agree", "flat"],
)  # fmt: skip
def test_the_suspected_target_is_where_lean_and_excess_point_together(lean, excess, target):
    chosen, scores = prune.suspected_target(lean, excess)
    assert chosen == target and len(scores) == len(lean) and all(np.isfinite(scores))


def test_a_guarded_repair_on_the_training_inputs_weighs_both_signals(backdoored):
    """fine_prune names the excluded class from the lean and the training inputs' excess when it reads them."""
    model, poisoned = copy.deepcopy(backdoored["model"]), backdoored["poisoned"]
    cfg = BackdoorConfig(finetune_epochs=1, distill_min_teacher_accuracy=1.0, distill_min_advantage=-1.0)
    pruned = prune.fine_prune(model, "features_out", backdoored["trusted"], CPU, cfg, unlabelled=poisoned.view)
    distill = pruned.distill
    assert distill["mode"] == "guarded" and distill["exclude_rule"] == "lean+excess", distill
    assert distill["excluded_class"] == 0 == int(np.argmax(distill["excess"])) and distill["excess"][0] > 0.05
    assert distill["excluded_class"] == int(np.argmax(distill["target_scores"]))
    assert distill["lean_class"] == int(np.argmax(distill["lean"]))
    trusted_only = prune.fine_prune(copy.deepcopy(backdoored["model"]), "features_out", backdoored["trusted"], CPU, cfg)
    assert trusted_only.distill["exclude_rule"] == "lean" and trusted_only.distill["excess"] == []
    full_cfg = BackdoorConfig(finetune_epochs=1, distill_min_teacher_accuracy=0.0)
    full = prune.fine_prune(copy.deepcopy(backdoored["model"]), "features_out", backdoored["trusted"], CPU, full_cfg,
                            unlabelled=poisoned.view)  # fmt: skip
    assert full.distill["mode"] == "full" and full.distill["excluded_class"] is None is full.distill["exclude_rule"]


def test_weak_teachers_are_distilled_guarded_only_when_they_beat_fine_tuning_alone(backdoored):
    """Below the accuracy gate: guarded if the teacher beats a student fine-tuned without it (both on held-out
    trusted rows) by distill_min_advantage, not at all otherwise (a DP model the fine-tuning overtakes)."""
    gate = functools.partial(prune.teacher_for, backdoored["model"], backdoored["trusted"], CPU)
    cfg = BackdoorConfig(finetune_epochs=10)
    asked = []

    def held_out(teacher, student):
        return lambda: asked.append(1) or (teacher, student)

    guarded = gate(0.85, cfg, held_out(0.85, 0.80))
    assert guarded.mode == "guarded" and guarded.exclude == int(np.argmax(guarded.lean)) and len(guarded.lean) == 10
    objective = guarded.objective(cfg)
    assert (objective.exclude, objective.correct_only) == (guarded.exclude, True)
    assert gate(0.85, cfg, held_out(0.85, 0.84)) is None  # advantage 0.01 < 0.02
    assert gate(0.85, cfg, held_out(0.70, 0.90)) is None  # the DP case: fine-tuning alone ends above the teacher
    assert gate(0.85, dataclasses.replace(cfg, distill_min_advantage=-1.0), held_out(0.70, 0.90)).mode == "guarded"
    before = len(asked)
    assert gate(0.85, dataclasses.replace(cfg, distill_weak_teacher=WeakTeacher.off), held_out(0.9, 0.5)) is None
    assert gate(0.97, cfg, held_out(0.5, 0.9)).mode == "full" and len(asked) == before  # not measured: not needed


def test_the_held_out_comparison_fine_tunes_a_copy_and_scores_both_on_unseen_rows(backdoored):
    model, trusted_set = backdoored["model"], backdoored["trusted"]
    state = copy.deepcopy(model.state_dict())
    mask = torch.ones(64)
    teacher, student = prune.cross_fitted(model, "features_out", mask, trusted_set, trusted_set, CPU,
                                          BackdoorConfig(finetune_epochs=5), seed=0)  # fmt: skip
    rows = np.sort(np.random.default_rng(0).permutation(len(trusted_set))[len(trusted_set) // 2 :])
    assert teacher == accuracy(model, subset(trusted_set, rows), CPU)  # the model itself, on the scored half
    assert 0.3 < student <= 1.0 and student != teacher
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is left alone
    assert not any(m._forward_hooks for m in model.modules())
    # Through fine_prune: the report's record says what was compared and chosen.
    forced = BackdoorConfig(finetune_epochs=5, distill_min_teacher_accuracy=1.0, distill_min_advantage=-1.0)
    pruned = prune.fine_prune(copy.deepcopy(model), "features_out", trusted_set, CPU, forced)
    assert pruned.distilled and pruned.distill["mode"] == "guarded" and pruned.distill["excluded_class"] in range(10)
    assert 0 < pruned.distill["held_out_teacher_accuracy"] <= 1 and 0 < pruned.distill["held_out_student_accuracy"]
    assert pruned.distill["unlabelled_rows"] == 0  # none given
    # Too few trusted rows to hold half out: no comparison, so no guarded distillation (and no empty fine-tuning).
    few = subset(trusted_set, range(prune.MIN_HELD_OUT - 1))
    pruned = prune.fine_prune(copy.deepcopy(model), "features_out", few, CPU, forced)
    assert not pruned.distilled and pruned.distill["held_out_student_accuracy"] is None


def test_a_guarded_teacher_is_also_distilled_on_the_unlabelled_training_inputs(backdoored):
    """Given the training split's inputs (a non-private run), a guarded repair follows its teacher on them (the
    leaning class left out) much more closely than one that reads the trusted rows alone; a full teacher is never
    distilled on them (its leaning class is not reliably the target: the backdoor came back), nor when switched off."""
    from aisec_train.train.objectives import soft_term

    model, trusted_set, train_split = backdoored["model"], backdoored["trusted"], backdoored["poisoned"].view
    forced = BackdoorConfig(finetune_epochs=5, distill_min_teacher_accuracy=1.0, distill_min_advantage=-1.0)
    x, _ = materialize(train_split)
    kl = {}
    switched_off = dataclasses.replace(forced, distill_unlabelled_weight=0.0)
    runs = [("trusted_only", forced, None), ("unlabelled", forced, train_split), ("off", switched_off, train_split)]
    for name, cfg, given in runs:
        repaired = copy.deepcopy(model)
        pruned = prune.fine_prune(repaired, "features_out", trusted_set, CPU, cfg, unlabelled=given)
        exclude = pruned.distill["excluded_class"]
        assert pruned.distill["mode"] == "guarded" and exclude in range(10)
        rows, dropped = pruned.distill["unlabelled_rows"], pruned.distill["unlabelled_dropped"]
        assert (rows + dropped == len(x) and 0 < dropped < 0.3 * len(x)) if name == "unlabelled" else rows == 0
        with torch.no_grad():
            kl[name] = float(soft_term(repaired(x), model(x), 1.0, exclude).mean())
    assert kl["unlabelled"] < 0.6 * kl["trusted_only"] and kl["off"] == pytest.approx(kl["trusted_only"]), kl
    full_teacher = BackdoorConfig(finetune_epochs=2, distill_min_teacher_accuracy=0.0)
    full = prune.fine_prune(
        copy.deepcopy(model), "features_out", trusted_set, CPU, full_teacher, unlabelled=train_split
    )
    assert full.distill["mode"] == "full" and full.distill["unlabelled_rows"] == 0


def test_the_unlabelled_inputs_leave_out_what_the_teacher_sends_to_its_leaning_class(backdoored):
    """The poisoned rows (the trigger sends them to the target, 0) are left out; most clean rows stay."""
    model, poisoned = backdoored["model"], backdoored["poisoned"]
    teacher = prune.Teacher(copy.deepcopy(model).eval(), "guarded", exclude=0)
    kept, dropped = prune.unlabelled_inputs(teacher, poisoned.view, CPU)
    x, _ = materialize(poisoned.view)
    stamped = {tuple(row.flatten().tolist()) for row in x[poisoned.indices]}
    left = sum(tuple(row.flatten().tolist()) in stamped for row in kept)
    assert left <= 0.1 * len(poisoned.indices) and len(kept) + dropped == len(x) and len(kept) > 0.75 * len(x)
    assert prune.unlabelled_inputs(teacher, subset(poisoned.view, poisoned.indices[:5]), CPU) == (None, 5)


@pytest.mark.parametrize(
    "overrides, reads_training_split",
    [
        (["privacy=none"], True),
        ([], False),
        (["privacy=none", "federated=fedavg", "backdoor.malicious_clients=2"], False),
        (["privacy=none", "backdoor.distill_unlabelled_weight=0", "backdoor.relearn=false"], False),
    ],
    ids=["non-private", "dp", "federated", "switched-off"],
)
def test_the_repair_reads_the_training_inputs_only_where_no_claim_or_peer_forbids_it(
    tmp_path, overrides, reads_training_split
):
    """Under DP the fine-tuning would read private records without noise; a federated server holds no training
    data: there the repair's distillation reads the trusted rows alone."""
    from aisec_train.backdoor import stage

    run = poisoned_run(tmp_path, *overrides)
    given = stage.unlabelled_split(run, run.backdoor)
    assert (given is run.data.train) if reads_training_split else given is None


def test_after_the_filter_the_repair_reads_only_the_training_inputs_it_kept(tmp_path):
    from aisec_train.backdoor import stage

    run = poisoned_run(tmp_path, "privacy=none", "backdoor.filter=true", "train.epochs=3", stages=3)
    with run.resources:
        stage._detect(run, run.backdoor)
    flagged = run.backdoor.detections["spectral"].flagged
    given = stage.unlabelled_split(run, run.backdoor)
    assert len(flagged) > 0 and len(given) == len(run.data.train) - len(flagged)
    assert not set(given.indices) & set(np.asarray(flagged).tolist())


def test_relearning_clears_the_target_rows_the_repaired_model_sends_elsewhere():
    from aisec_train.backdoor import relearn

    labels = np.array([0, 0, 0, 1, 2, 0])
    sent = np.array([0, 3, 1, 1, 0, 0])  # rows 1 and 2: labelled 0, sent elsewhere (a triggered row of 3, of 1)
    assert relearn.cleared(sent, labels, target=0).tolist() == [False, True, True, False, False, False]
    assert relearn.cleared(sent, labels, target=1).tolist() == [False] * 6  # row 3 is sent to its label
    shift = relearn.share_shift(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), classes=3)
    assert shift == [0.5, -0.5, 0.0]
    diverged = nn.Linear(2, 2)
    assert relearn.finite(diverged)
    with torch.no_grad():
        diverged.weight[0, 0] = float("nan")
    assert not relearn.finite(diverged)


RELEARN = ["privacy=none", "train.epochs=6", "backdoor.finetune_epochs=20", "backdoor.distill_min_teacher_accuracy=1.0",
           "backdoor.distill_min_advantage=-1.0"]  # fmt: skip  # a guarded teacher reading the training inputs


@pytest.fixture(scope="module")
def relearn_run(tmp_path_factory):
    """A non-private digits BadNets run through its defend stage, the teacher forced below the gate (guarded), so the
    repair names the target from the training inputs and relearning runs."""
    return poisoned_run(tmp_path_factory.mktemp("relearn"), *RELEARN, stages=4)


def test_relearning_retrains_without_the_poisoned_rows_and_releases_that_model(relearn_run):
    run = relearn_run
    bd = run.report.get("backdoor")
    done, distill = bd["fine_pruning"]["relearn"], bd["fine_pruning"]["finetune"]["distill"]
    named = bd["fine_pruning"]["named_target"]
    assert distill["exclude_rule"] == "lean+excess" and done["target"] == distill["excluded_class"] == named["class"]
    assert named["class"] == 0 == int(np.argmax(named["scores"])) and named["excess"] == distill["excess"]
    assert done["blend"] == 0.25 and done["max_shift"] == 0.05 and len(done["shift"]) == 10
    assert done["trained_on"] == len(run.data.train) - done["cleared_rows"] + len(run.backdoor.trusted)
    poisoned = len(run.backdoor.poisoned.indices)
    clean_target_rows = int((labels_of(run.data.train) == 0).sum()) - poisoned
    assert 0.9 * poisoned <= done["cleared_rows"] <= poisoned + 0.5 * clean_target_rows  # the poison, few clean rows
    assert done["poisoned_cleared"] + done["poisoned_kept"] == poisoned  # the red team's count of what was cleared
    assert done["poisoned_cleared"] >= 0.9 * poisoned and done["poisoned_cleared"] <= done["cleared_rows"]
    assert done["released"] == "relearned" and max(done["shift"]) <= 0.05
    assert list(bd["stages"]) == ["trained", "fine_pruned", "relearned"]
    assert bd["asr_before"] >= 0.9 and bd["asr_after"] == done["metrics"]["asr"] <= 0.05
    assert bd["clean_accuracy_after"] == done["metrics"]["clean_accuracy"] >= bd["clean_accuracy_before"] - 0.02
    assert run.model is not run.result.model and isinstance(run.model, SmallCNN)  # fresh, no pruning mask wrapper
    assert accuracy(run.model, run.data.test, CPU) == bd["clean_accuracy_after"]  # the released model is that one
    evidence = next(c["evidence"] for c in run.report.checklist if c["item"].startswith("pruning against poisoning"))
    assert f"released: a fresh model retrained without the {done['cleared_rows']} rows labelled class 0" in evidence


def test_every_relearning_round_is_reported_and_clears_a_superset_of_the_last(relearn_run):
    done = relearn_run.report.get("backdoor")["fine_pruning"]["relearn"]
    by_round, kept = done["cleared_by_round"], done["poisoned_kept_by_round"]
    assert len(by_round) == len(kept) == 2  # backdoor.relearn_rounds, default 2
    assert by_round == sorted(by_round) and by_round[-1] == done["cleared_rows"]
    assert kept == sorted(kept, reverse=True) and kept[-1] == done["poisoned_kept"]


def test_a_later_round_clears_the_poisoned_rows_a_failed_first_repair_kept(tmp_path):
    """Relearning from a model that still follows the trigger (here the trained model itself, as if the repair had
    done nothing) clears none of the poisoned rows in its first round, and that retrain learns the trigger again;
    the second round repairs the retrain and reads the rows with it, which sends them to their true classes."""
    from aisec_train.backdoor import stage

    run = poisoned_run(tmp_path, *RELEARN, stages=3)
    splits = (run.data.test, *badnets.triggered(run.data.test, run.backdoor.trigger, run.backdoor.target_of))
    poisoned = len(run.backdoor.poisoned.indices)
    repair = {"named_target": {"class": 0, "rule": "lean+excess"}}
    with run.resources:
        stage._relearn(run, run.backdoor, splits, repair)
    done = repair["relearn"]
    first, second = done["poisoned_kept_by_round"]
    assert first >= 0.9 * poisoned and second <= 0.1 * poisoned, done["poisoned_kept_by_round"]
    assert done["metrics"]["asr"] <= 0.05, done["metrics"]


def test_a_relearned_model_that_learnt_the_trigger_again_is_not_released(relearn_run):
    """Name the wrong class and the poisoned rows stay in the retraining set: the fresh model learns the trigger
    again and sends them back to the target, which the guard sees on the training inputs alone."""
    from aisec_train.backdoor import stage

    run = relearn_run
    splits = (run.data.test, *badnets.triggered(run.data.test, run.backdoor.trigger, run.backdoor.target_of))
    released = run.model
    wrong = {"named_target": {"class": 3, "rule": "lean+excess"}}
    with run.resources:
        assert stage._relearn(run, run.backdoor, splits, wrong) is None
    done = wrong["relearn"]
    assert done["retrained"] is True and done["target"] == 3 and done["released"] == "repaired"
    assert run.model is released
    assert done["poisoned_cleared"] == 0 and done["poisoned_kept"] == len(run.backdoor.poisoned.indices)
    assert done["shift"][0] == max(done["shift"]) > 0.05  # the trigger's rows went back to class 0 ...
    assert done["metrics"]["asr"] > 0.5  # ... because the retrained model learnt the backdoor again


def test_relearning_reads_a_trusted_file_beside_the_training_rows(tmp_path):
    """A trusted file's rows (tensor labels) and the training split's rows (int labels) train together."""
    digits = load_dataset(DatasetConfig(), seed=0)
    x, y = materialize(digits.test, limit=100)
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=(x[:, 0].numpy() * 255).round().astype(np.uint8), y=y.numpy())
    run = poisoned_run(tmp_path, *RELEARN, f"backdoor.trusted_path={clean}", stages=4)
    done = run.report.get("backdoor")["fine_pruning"]["relearn"]
    assert done["retrained"] is True and done["trained_on"] == len(run.data.train) - done["cleared_rows"] + 100


def test_poison_spread_over_every_label_is_not_relearnt(tmp_path):
    """All-to-all poison (every label gets poisoned rows) is not in one class: clearing the named class would leave
    the rest in, and the retrained model learnt the trigger again (digits: ASR 0.80 against the repair's 0.01)."""
    run = poisoned_run(tmp_path, *RELEARN, "backdoor.mapping=all_to_all", stages=4)
    bd = run.report.get("backdoor")
    done = bd["fine_pruning"]["relearn"]
    assert done["retrained"] is False and done["released"] == "repaired" and "all_to_all" in done["reason"]
    assert list(bd["stages"]) == ["trained", "fine_pruned"] and bd["asr_after"] == bd["stages"]["fine_pruned"]["asr"]
    evidence = next(c["evidence"] for c in run.report.checklist if c["item"].startswith("pruning against poisoning"))
    assert "no relearning (backdoor.mapping=all_to_all: relearning clears one class's rows" in evidence


@pytest.mark.parametrize(
    "extra",
    [["backdoor.relearn=false"], ["privacy=dpsgd"]],
    ids=["switched-off", "dp"],
)
def test_relearning_runs_only_when_asked_and_where_the_training_split_may_be_read(tmp_path, extra):
    run = poisoned_run(tmp_path, *RELEARN, *extra, stages=4)
    bd = run.report.get("backdoor")
    assert bd["fine_pruning"]["relearn"] is None
    assert list(bd["stages"]) == ["trained", "fine_pruned"]
    assert (bd["fine_pruning"]["named_target"] is None) is (extra == ["privacy=dpsgd"])  # DP: split never read


def test_hook_fine_pruning_on_a_model_without_features_out(backdoored_plain):
    model = copy.deepcopy(backdoored_plain["model"])
    assert not hasattr(model, "features_out")
    path = resolve_feature_layer(model, (1, 8, 8), None).path
    splits = (backdoored_plain["test"], backdoored_plain["attack"], backdoored_plain["truth"])
    before = measure(model, *splits, CPU)
    assert before.asr >= 0.9, before
    pruned = prune.fine_prune(model, path, backdoored_plain["trusted"], CPU, BackdoorConfig(finetune_epochs=20))
    after = measure(model, *splits, CPU)
    assert after.asr <= 0.1 and before.clean_accuracy - after.clean_accuracy <= 0.05, (before, after)
    assert (pruned.baked.method, pruned.baked.module) == ("reader", "head.2") and not any(
        m._forward_hooks for m in model.modules()
    )


def test_the_repair_falls_back_to_the_whole_head_when_feature_shift_would_cost_the_model_too_much(backdoored_plain):
    """On this ReLU CNN (no hidden layer after the feature map) FST at the default alpha 0.2 collapsed the repaired
    model (0.84 -> 0.71 clean accuracy); the held-out check sees it on half the trusted rows and re-initialises the
    head instead. At alpha 0.05 FST suits it, and the check keeps it."""
    model, path = backdoored_plain["model"], "body"
    splits = (backdoored_plain["test"], backdoored_plain["attack"], backdoored_plain["truth"])
    before = measure(model, *splits, CPU)
    results = {}
    for label, cfg in {"checked": BackdoorConfig(), "unchecked": BackdoorConfig(shift_max_cost=1.0),
                       # boxes off: with them this gentler FST costs the model 4 points (0.839 -> 0.803;
                       # docs/backdoor.md, "Erased boxes in the repair"); the defaults gain 6 (0.844 -> 0.906)
                       "alpha_0.05": BackdoorConfig(shift_weight=0.05, repair_erase=0.0)}.items():  # fmt: skip
        repaired = copy.deepcopy(model)
        pruned = prune.fine_prune(repaired, path, backdoored_plain["trusted"], CPU, cfg)
        results[label] = (pruned, measure(repaired, *splits, CPU))
    checked, after = results["checked"]
    assert BackdoorConfig().shift_weight == 0.2
    assert checked.head_check["chosen"] == "reinit" and checked.head_mode == "reinit"
    assert checked.head_check["shift"] < checked.head_check["reinit"] - 0.1
    assert after.asr <= 0.05 and before.clean_accuracy - after.clean_accuracy <= 0.02, (before, after)
    unchecked, worse = results["unchecked"]
    assert unchecked.head_check is None and unchecked.head_mode == "shift"  # shift_max_cost=1: no check
    assert worse.clean_accuracy < after.clean_accuracy - 0.05  # what the check prevented
    gentle, kept = results["alpha_0.05"]
    assert gentle.head_check["chosen"] == "shift" and gentle.head_mode == "shift"  # alpha 0.05 suits it
    assert kept.asr <= 0.05 and before.clean_accuracy - kept.clean_accuracy <= 0.02, (before, kept)


# ------------------------------------------------------------------------------------------------ bake
def _bake_case(model: nn.Module, path: str, channels: int, shape=(1, 8, 8)):
    torch.manual_seed(1)
    model.eval()
    probe = torch.rand(16, *shape)
    mask = torch.ones(channels)
    mask[torch.randperm(channels)[: channels // 2]] = 0.0
    with masked(model, path, mask), torch.no_grad():
        want = model(probe)
    baked = bake(model, path, mask, probe)
    with torch.no_grad():
        torch.testing.assert_close(model(probe), want, atol=1e-5, rtol=1e-4)
    assert not any(m._forward_hooks for m in model.modules())
    return baked, mask, probe, want


@pytest.mark.parametrize(
    "make, path, channels, method, module",
    [
        (lambda: SmallCNN(1, 10, 8), "features_out", 64, "reader", "fc1"),
        (ConvFeature, "feat", 12, "own_parameters", "feat"),
        (SigmoidAfter, "block", 12, "inner", "block.1"),
    ],
    ids=["reader", "own", "inner"],
)
def test_bake_tries_verified_candidates_in_order(make, path, channels, method, module):
    baked, *_ = _bake_case(make(), path, channels)
    assert (baked.method, baked.module) == (method, module)


def test_bake_falls_back_to_a_structural_mask_and_the_release_loads(tmp_path):
    vit = TinyViT()
    baked, mask, probe, want = _bake_case(vit, "blocks.1", 16)
    assert baked.method == "structural" and {t.split(":")[0] for t in baked.tried} == {"reader", "inner"}
    assert isinstance(vit.blocks[1], ChannelMask)
    state = vit.state_dict()
    assert torch.equal(state["blocks.1.backdoor_channel_mask"], mask) and "blocks.1.module.norm.weight" in state
    fresh = install_released_masks(TinyViT(), state)
    fresh.load_state_dict(state)  # strict: the wrappers make the keys fit
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(probe), want, atol=1e-5, rtol=1e-4)


def test_der_is_backdoorbench_formula():
    m = BackdoorMetrics
    assert der(m(0.95, 1.0, 0.0), m(0.93, 0.02, 0.9)) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert der(m(0.9, 0.5, 0.0), m(0.95, 0.8, 0.0)) == pytest.approx(0.5)  # both drops clipped at 0
    assert der(m(0.9, 1.0, 0.0), m(0.9, 0.0, 1.0)) == 1.0


def test_errors_to_target_tells_a_chance_share_of_mistakes_from_a_trigger_that_still_steers():
    # 360 triggered inputs, RA 0.6: 144 mistakes; at 1/9 of them the target gets 16, an ASR of 0.044 from errors alone
    chance = errors_to_target(BackdoorMetrics(0.7, 16 / 360, 0.6, 360), num_classes=10)
    assert (chance["errors"], chance["to_target"]) == (144, 16)
    assert chance["chance_share"] == pytest.approx(1 / 9) and chance["asr_from_errors"] == pytest.approx(0.4 / 9)
    assert chance["share"] == pytest.approx(16 / 144) and chance["p_value"] > 0.3
    steered = errors_to_target(BackdoorMetrics(0.7, 40 / 360, 0.6, 360), num_classes=10)  # 40 of the 144
    assert steered["p_value"] < 1e-6 and steered["share"] == pytest.approx(40 / 144)
    backdoored = errors_to_target(BackdoorMetrics(0.9, 0.99, 0.0, 324), num_classes=10)
    assert backdoored["to_target"] == 321 and backdoored["p_value"] < 1e-100
    perfect = errors_to_target(BackdoorMetrics(0.9, 0.0, 1.0, 324), num_classes=10)
    assert perfect["errors"] == 0 and perfect["share"] is None and perfect["p_value"] is None
    two = errors_to_target(BackdoorMetrics(0.9, 0.3, 0.7, 100), num_classes=2)  # every mistake is the target
    assert two["chance_share"] == 1.0 and two["p_value"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ command line
FAST = ["train.epochs=3", "backdoor.finetune_epochs=3", "robustness.evaluate=false", "audit=off"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("backdoor") / "run"
    proc = run_cli("experiment=backdoor", *FAST, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_cli_backdoor_preset_writes_the_contract(cli_run):
    report = read_report(cli_run)
    bd = report["backdoor"]
    for key in ("asr_before", "asr_after", "clean_accuracy_before", "clean_accuracy_after"):
        assert 0.0 <= bd[key] <= 1.0, key
    assert set(bd["detection"]) >= {"method", "precision", "recall"} and bd["detection"]["method"] == "spectral"
    after, n = bd["errors_to_target"]["after"], bd["stages"]["fine_pruned"]["n_triggered"]
    assert n == int((labels_of(load_dataset(DatasetConfig(), seed=0).test) != 0).sum())  # non-target test inputs
    assert after["errors"] == round((1 - bd["robust_accuracy_after"]) * n)
    assert after["to_target"] == round(bd["asr_after"] * n) and after["chance_share"] == pytest.approx(1 / 9)
    assert bd["errors_to_target"]["before"]["to_target"] == round(bd["asr_before"] * n)
    assert bd["trigger"] == {"size": 3, "position": "bottom_right", "value": 1.0} and bd["rate"] == 0.1
    assert bd["n_poisoned"] == round(0.1 * report["data"]["n_train"])
    assert bd["feature_layer"] == "features_out" and bd["feature_layer_detail"]["found_by"] == "automatic"
    d_asr = max(0, bd["asr_before"] - bd["asr_after"])
    d_acc = max(0, bd["clean_accuracy_before"] - bd["clean_accuracy_after"])
    assert bd["der"] == pytest.approx((d_asr - d_acc + 1) / 2)
    png = cli_run / bd["fine_pruning"]["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [row["pruned"] for row in bd["fine_pruning"]["curve"]] == list(range(65))
    # Whether any channel fits the 2-point budget depends on the DP model, and its noise is secret (differs per run).
    pruned_any = bd["fine_pruning"]["pruned_channels"] > 0
    assert bd["fine_pruning"]["bake"]["method"] == ("reader" if pruned_any else "none")
    assert bd["fine_pruning"]["evaluation"] == "replay"
    distill = bd["fine_pruning"]["finetune"]["distill"]
    assert distill["mode"] in ("full", "guarded", "off") and distill["used"] is (distill["mode"] != "off")
    assert distill["weak_teacher"] == "guarded" and distill["min_advantage"] == 0.02
    finetune = bd["fine_pruning"]["finetune"]
    assert finetune["blend"] == 0.15  # backdoor.repair_blend's default (docs/backdoor.md, "Blended inputs")
    erase = finetune["erase_check"]  # boxes (backdoor.repair_erase, default 1.0) only if they cost nothing held out
    assert finetune["erase"] == 1.0 and set(erase) == {"trusted_accuracy", "teacher", "student", "used"}
    assert erase["used"] is (erase["teacher"] is not None and erase["teacher"] - erase["student"] < 0.02)
    check = finetune["head_check"]  # FST against the whole-head re-initialisation, on held-out trusted rows
    assert set(check) == {"shift", "reinit", "max_cost", "chosen"} and check["chosen"] == finetune["head"]
    if finetune["head"] == "shift":
        assert finetune["reinitialised"] == ["fc2"] and finetune["shift_weight"] == 0.2
        assert check["shift"] >= check["reinit"] - check["max_cost"]
    else:
        assert finetune["reinitialised"] == ["squeeze", "fc1", "fc2"] and finetune["shift_weight"] is None
    checks = {c["item"]: c for c in report["checklist"]}
    detection = checks["validation against poisoning (spectral signatures, activation clustering)"]
    repair = checks["pruning against poisoning (Fine-Pruning)"]
    assert detection["status"] == ("pass" if bd["detection"]["recall"] >= 0.8 else "fail")
    assert f"recall {bd['detection']['recall']:.3f}" in detection["evidence"]
    assert repair["status"] in ("pass", "fail")
    assert f"ASR {bd['asr_before']:.3f} -> {bd['asr_after']:.3f}" in repair["evidence"]
    if after["errors"]:
        assert f"the target takes {after['to_target']} of {after['errors']} misclassified" in repair["evidence"]
    baked = "mask baked into the weights (reader: fc1)" if pruned_any else "no channel pruned, nothing to bake"
    assert baked in repair["evidence"]
    assert "badnets_poison" in [s["step"] for s in report["data"]["lineage"]]
    assert checks["data lineage recorded"]["status"] == "pass"


def test_cli_report_is_truthful_about_the_privacy_of_the_trusted_reserve(cli_run):
    report = read_report(cli_run)
    scope, n_trusted = report["privacy"]["scope"], report["backdoor"]["n_trusted"]
    assert report["privacy"]["epsilon"] <= 3.0 and report["privacy"]["steps"] > 0  # the ledger is the DP-SGD one
    assert scope["covered_records"] == report["data"]["n_train"] and scope["not_covered_records"] == n_trusted > 0
    distill = report["backdoor"]["fine_pruning"]["finetune"]["distill"]
    assert distill["unlabelled_weight"] == 1.0 and distill["unlabelled_rows"] == 0  # DP: the training split is not read
    check = next(c for c in report["checklist"] if c["item"] == "defence data covered by the privacy claim")
    assert check["status"] == "fail" and "NO differential-privacy guarantee" in check["evidence"]
    assert f"{n_trusted} further records" in (cli_run / "model_card.md").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("backdoor.rate=1.5", "backdoor.rate=1.5 is not allowed: must be in (0, 1)"),
        ("backdoor.target=10", "backdoor.target=10 is not allowed: must be < 10 classes"),
        ("backdoor.relearn_max_shift=0", "backdoor.relearn_max_shift=0.0 is not allowed: must be in (0, 1]"),
        ("backdoor.relearn_blend=1", "backdoor.relearn_blend=1.0 is not allowed: must be in [0, 1)"),
        ("backdoor.relearn_rounds=0", "backdoor.relearn_rounds=0 is not allowed: must be an integer in [1, 5]"),
        ("backdoor.relearn_rounds=6", "backdoor.relearn_rounds=6 is not allowed: must be an integer in [1, 5]"),
    ],
)
def test_cli_refuses_bad_backdoor_input_in_one_line(tmp_path, override, message):
    proc = run_cli("experiment=backdoor", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"aisec-train: error: {message}"
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ figures (slow)
@pytest.mark.slow
def test_figures_default_preset_on_digits(tmp_path):
    """Issue 4's bar on the default DP preset: ASR >= 0.9 -> <= 0.05, clean drop <= 2 points, recall >= 0.8."""
    # Pinned DP noise, as in the second-dataset check below: a figure check on one trained model, not on the secrecy
    proc = run_cli("experiment=backdoor", "audit=off", "privacy.reproducible_noise=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bd = read_report(tmp_path)["backdoor"]
    assert bd["asr_before"] >= 0.9 and bd["asr_after"] <= 0.05
    assert bd["clean_accuracy_before"] - bd["clean_accuracy_after"] <= 0.02
    assert bd["detections"]["spectral"]["recall"] >= 0.8


@pytest.mark.slow
def test_cli_backdoor_on_a_user_model_without_features_out(tmp_path):
    """The whole backdoor story on a user's class through ``model._target_`` (hook-based, found automatically)."""
    proc = run_cli(
        "experiment=backdoor", *FAST, "privacy=none", "model._target_=tests.test_backdoor.PlainCNN",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bd = read_report(tmp_path)["backdoor"]
    assert bd["feature_layer"] == "body" and bd["fine_pruning"]["bake"]["method"] == "reader"


@pytest.mark.slow
def test_figures_on_a_second_dataset_without_retuning(tmp_path):
    """Typeset digits (12x12, scripts/figures/glyphs.py) through dataset=npz, same preset."""
    data = tmp_path / "typeset.npz"
    subprocess.run([sys.executable, str(REPO / "scripts/figures/glyphs.py"), "--out", str(data)], check=True)
    # Pinned DP noise: a figure check on one trained model; under secret noise one CI run in six saw detection
    # recall 0.05 (five local runs: 0.89-1.0). The secrecy itself is tested in tests/test_secret_noise.py.
    proc = run_cli(
        "experiment=backdoor", "audit=off", "dataset=npz", f"dataset.path={data}", "privacy.reproducible_noise=true",
        f"hydra.run.dir={tmp_path / 'r'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bd = read_report(tmp_path / "r")["backdoor"]
    assert bd["asr_before"] >= 0.9 and bd["asr_after"] <= 0.05
    assert bd["clean_accuracy_before"] - bd["clean_accuracy_after"] <= 0.02
    assert max(d["recall"] for d in bd["detections"].values()) >= 0.8  # spectral is weaker here: docs/backdoor.md


@pytest.mark.slow
def test_figure_script_quick_writes_its_json(tmp_path):
    out = tmp_path / "backdoor.json"
    script = REPO / "scripts/figures/backdoor.py"
    done = subprocess.run(
        # Two seeds, two at a time: each seed needs its own dataset ledger (a shared one refused the second seed's
        # budget and, under --jobs, its lock).
        [
            sys.executable,
            str(script),
            "--quick",
            "--seeds",
            "0",
            "1",
            "--jobs",
            "2",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "w"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "backdoor_figures" and {r["case"] for r in result["rows"]} == {
        "digits",
        "typeset-digits",
        "typeset-letters",
    }
    assert sorted(r["impl"] for r in result["rows"] if r["case"] == "digits") == ["digits/seed0", "digits/seed1"]
    assert "| case |" in done.stdout
