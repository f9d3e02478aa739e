"""Red-team edges of the data sources and the model factory: each bad input is one DataError / ConfigError line
naming the value, before anything is hashed, split, charged or trained (docs/open-model.md, "Refusals").

Every test here calls the loaders, the manifest or the model factory directly (under a second each); the one CLI
run is marked slow.
"""

from __future__ import annotations

import gzip
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.data.errors import DataError
from aisec_train.data.manifest import sha256_items
from aisec_train.data.views import Sample
from aisec_train.errors import ConfigError
from aisec_train.models import SmallCNN
from aisec_train.models.factory import ModelFactory
from tests.conftest import run_cli

HERE = "tests.test_data_model_edges"  # importable (tests/ is a package) in the CLI too: dataset=custom targets


class Items(Dataset):
    """A user's map-style dataset of 1x6x6 images with one defect chosen by ``kind``."""

    def __init__(self, n: int = 40, kind: str = "ok", k: int = 3):
        self.n, self.kind, self.k = n, kind, k

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(i)
        x = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(i))
        y = i % self.k
        if self.kind == "float64":
            return x.double(), y
        if self.kind == "str_label":
            return x, "cat"
        if self.kind == "triple":
            return x, y, 0
        if self.kind == "raises" and i == 11:
            raise RuntimeError("disk gone")
        if self.kind == "dict":
            return {"image": x, "label": y}
        return x, y


class Targets(Items):
    """A ``targets`` attribute (what splits and class counts read) that is not what the items say."""

    def __init__(self, n: int = 40, k: int = 3, targets: str = "shifted"):
        super().__init__(n, "ok", k)
        labels = [i % k for i in range(n)]
        self.targets = {"shifted": [(v + 1) % k for v in labels], "fractional": [v + 0.5 for v in labels],
                        "strings": ["a"] * n}[targets]  # fmt: skip


def custom(train: dict, test: dict | None = None) -> DatasetConfig:
    return DatasetConfig(name="custom", train=train, test=test)


# ---- dataset=custom: items are checked as the Python API checks them -------------------------------------------
@pytest.mark.parametrize(
    "node, needle",
    [
        ({"kind": "float64"}, "dataset.train item 0: image is a torch.float64 tensor"),
        ({"kind": "str_label"}, "dataset.train item 0: label 'cat' (str) is not allowed"),
        ({"kind": "triple"}, "dataset.train item 0 is a 3-tuple"),
        ({"kind": "raises"}, "dataset.train item 11 cannot be read (RuntimeError: disk gone)"),
        ({"kind": "dict"}, "dataset.train item 0 is dict"),
    ],
)
def test_a_custom_datasets_bad_items_are_one_line_before_hashing(node, needle):
    """Before: float64 images passed every check and crashed the first training step (after the dataset's ledger
    was opened); a string label, a 3-tuple, a dict item or a failing __getitem__ raised ValueError / RuntimeError /
    TypeError, a traceback on the command line."""
    with pytest.raises(DataError) as err:
        load_dataset(custom({"_target_": f"{HERE}.Items", **node}), seed=0)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_custom_test_dataset_is_checked_too():
    with pytest.raises(DataError, match=r"dataset.test item 0: image is a torch.float64 tensor"):
        load_dataset(custom({"_target_": f"{HERE}.Items"}, {"_target_": f"{HERE}.Items", "kind": "float64"}), seed=0)


@pytest.mark.parametrize(
    "targets, needle",
    [
        ("shifted", "dataset.train.targets[0]=1 but dataset.train item 0 has label 0"),
        ("fractional", "Targets.targets holds 0.5 (float64); labels must be integer class indices"),
        ("strings", "Targets.targets holds 'a'"),
    ],
)
def test_a_targets_attribute_must_be_the_items_integer_labels(targets, needle):
    """Before: fractional targets were cast (0.5 became class 0), string targets raised a ValueError traceback, and
    targets that disagreed with the items stratified the split and sized the model on labels training never saw."""
    with pytest.raises(DataError) as err:
        load_dataset(custom({"_target_": f"{HERE}.Targets", "targets": targets}), seed=0)
    assert needle in str(err.value)


def test_a_good_custom_dataset_still_loads():
    data = load_dataset(custom({"_target_": f"{HERE}.Items"}), seed=0)
    assert data.input_shape == (1, 6, 6) and data.num_classes == 3 and len(data.train) + len(data.test) == 40


# ---- the manifest of a streamed dataset frames every item -------------------------------------------------------
def _image(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw, np.float32).copy()).view(*shape)


def test_the_item_hash_frames_shape_and_label():
    """Before, sha256_items hashed each image's bytes then str(label) with nothing between items: labels 1, 23
    against 12, 3 with the second image's bytes shifted by one gave other records the same manifest hash (so the
    same dataset.sha256 pin), and so did the same bytes under another shape."""
    img0 = np.full(4, 0.5, np.float32).tobytes()
    img1 = bytearray(np.full(4, 0.25, np.float32).tobytes())
    img1[0] = ord("2")
    shifted = (img0 + b"1" + bytes(img1) + b"23")[18:34]  # img1[1:] + b"2"
    a = Sample(torch.stack([_image(img0, (1, 2, 2)), _image(bytes(img1), (1, 2, 2))]), torch.tensor([1, 23]))
    b = Sample(torch.stack([_image(img0, (1, 2, 2)), _image(shifted, (1, 2, 2))]), torch.tensor([12, 3]))
    assert not torch.equal(a.x, b.x) and sha256_items(a) != sha256_items(b)
    flat = Sample(a.x.reshape(2, 1, 4, 1), a.y)  # the same bytes as 4x1 images
    assert sha256_items(flat) != sha256_items(a)
    assert sha256_items(a) == sha256_items(Sample(a.x.clone(), a.y.clone()))  # still a function of the content


# ---- torchvision-style roots -----------------------------------------------------------------------------------
def _mnist(root, *, damage=None, type_code=8, rank=None):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(30) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(10),
    }
    for name, arr in arrays.items():
        header = bytes([0, 0, type_code, rank or arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        data = gzip.compress(header + arr.astype(np.uint8).tobytes())
        if damage is not None and name.startswith("train-images"):
            data = damage(data)
        (raw / f"{name}.gz").write_bytes(data)
    return DatasetConfig(name="mnist", root=str(root))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: d[: len(d) // 2], "cannot be read: Compressed file ended"),  # EOFError: a traceback before
        (lambda d: b"not gzip at all", "cannot be read: Not a gzipped file"),  # BadGzipFile
        (lambda d: d[:-8] + bytes([d[-8] ^ 0xFF]) + d[-7:], "cannot be read: CRC check failed"),
    ],
)
def test_a_damaged_gzip_idx_file_is_one_line(tmp_path, damage, needle):
    with pytest.raises(DataError, match=needle):
        load_dataset(_mnist(tmp_path, damage=damage), seed=0)


def test_an_idx_file_of_another_type_or_rank_is_refused_naming_its_magic(tmp_path):
    """Before: a float idx file (type code 0x0D) was read as bytes, and a rank byte of 200 printed 200 header
    integers in the refusal."""
    with pytest.raises(DataError, match=r"not a valid idx file of unsigned bytes: its magic is 00000d03"):
        load_dataset(_mnist(tmp_path / "a", type_code=0x0D), seed=0)
    with pytest.raises(DataError) as err:
        load_dataset(_mnist(tmp_path / "b", rank=200), seed=0)
    assert "its magic is 000008c8" in str(err.value) and len(str(err.value)) < 300


def _cifar(root, batch):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    return DatasetConfig(name="cifar10", root=str(root))


@pytest.mark.parametrize(
    "batch, needle",
    [
        # before: cast to uint8 in silence (every float pixel in [0, 1) became 0), 0.5 became class 0
        ({b"data": np.full((10, 3072), 0.5), b"labels": list(range(10))}, "its data is float64, expected uint8"),
        ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0.5] * 10}, "its labels are float64"),
        # before: OverflowError, a traceback
        ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [10**30] * 10}, "its labels are object"),
    ],
)
def test_a_cifar_batch_of_other_types_is_refused_not_cast(tmp_path, batch, needle):
    with pytest.raises(DataError) as err:
        load_dataset(_cifar(tmp_path, batch), seed=0)
    assert "data_batch_1 is not a CIFAR-10 batch" in str(err.value) and needle in str(err.value)


def test_a_uint64_label_past_int64_is_named_as_it_is(tmp_path):
    """Before: cast to int64 first, the refusal named label -9223372036854775803 for 9223372036854775813."""
    path = tmp_path / "big.npz"
    y = np.arange(40, dtype=np.uint64) % 4
    y[3] = 2**63 + 5
    np.savez(path, x=np.random.default_rng(0).random((40, 8, 8)).astype(np.float32), y=y)
    with pytest.raises(DataError, match=r"holds label 9223372036854775813; labels must be class indices"):
        load_dataset(DatasetConfig(name="npz", path=str(path)), seed=0)


def test_a_crop_padding_past_half_the_image_is_refused(tmp_path):
    """Before: accepted (preflight caps it at 256 pixels whatever the image): padding 40 on 8x8 images gave blank
    training crops every time, each one spending privacy budget on nothing."""
    from aisec_train.data.config import AugmentConfig

    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).random((40, 8, 8)).astype(np.float32), y=np.arange(40) % 4)
    cfg = DatasetConfig(name="npz", path=str(path), augment=AugmentConfig(random_crop_padding=40))
    with pytest.raises(ConfigError, match=r"random_crop_padding=40 is not allowed for 8x8 images: at most half"):
        load_dataset(cfg, seed=0)
    cfg.augment.random_crop_padding = 4
    assert load_dataset(cfg, seed=0).train_transform is not None


def test_a_resize_past_pils_bomb_limit_is_refused_by_the_config():
    """Before: dataset.resize=[30000,30000] was accepted and the first image decoded to 10.8 GB of float32 (11 GB
    peak RSS on 10 PNGs of 8x8); larger sizes were killed for memory, no one-line refusal."""
    with pytest.raises(ConfigError, match=r"dataset.resize=\[30000, 30000\] is not allowed: at most 89478485 pixels"):
        DatasetConfig(name="imagefolder", root="/data", resize=[30000, 30000])
    DatasetConfig(name="imagefolder", root="/data", resize=[224, 224])


# ---- image folders ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("other", [None, "val"])
def test_an_image_folder_with_train_but_no_test_is_refused_naming_both(tmp_path, other):
    """Before: DIR/train/<class>/ alone became one class named "train" (refused as a single class, a puzzle), and
    DIR/train/ + DIR/val/ became two classes "train" and "val": a model trained to tell the splits apart."""
    for part in ["train", *([other] if other else [])]:
        for c in ("cat", "dog"):
            (tmp_path / part / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / part / c / f"{i}.png")
    with pytest.raises(DataError, match=r"has train/ with class folders but no test/"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)), seed=0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_image_folder_entry_that_is_not_a_regular_file_is_refused(tmp_path):
    """Before: x.png -> /dev/zero was read (for its hash) until memory ran out, and a FIFO named x.png blocked the
    run forever. Without the fix this test's reader blocks on the FIFO until the timer writes nothing to it."""
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    fifo = tmp_path / "cat" / "pipe.png"
    os.mkfifo(fifo)
    unblock = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_WRONLY)))
    unblock.daemon = True
    unblock.start()
    try:
        with pytest.raises(DataError, match=r"pipe.png is not a regular file"):
            load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)), seed=0)
    finally:
        unblock.cancel()


# ---- text records ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["true", "1e30", "Infinity"])
def test_a_text_label_that_is_not_a_class_index_is_one_line(tmp_path, label):
    """Before: JSON true was class 1, and 1e30 overflowed the label tensor (a ValueError traceback)."""
    from aisec_train.data.text import read_records

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n{"text": "odd", "label": ' + label + "}\n")
    with pytest.raises(DataError, match=r"row 1: 'label' must be an integer class index"):
        read_records(path)


# ---- models ----------------------------------------------------------------------------------------------------
FINETUNE = {"checkpoint_path": None, "checkpoint_sha256": None, "pretrained": False, "trainable": "all",
            "batchnorm": "auto", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}}  # fmt: skip


def _factory(target: str, **kwargs) -> ModelFactory:
    return ModelFactory({"_target_": target, **FINETUNE, **kwargs}, (1, 8, 8), 10, private=True)


@pytest.mark.parametrize(
    "target, kwargs, needle",
    [
        ("aisec_train.models.SmallCNN", {"width": 12}, "model.width=12 is not allowed: must be a positive integer mul"),
        ("aisec_train.models.MLP", {"hidden": 0}, "model.hidden=0 is not allowed: must be a positive integer"),
        ("aisec_train.models.wrn.WideResNet", {"depth": 10, "groups": 3}, "model.groups=3 is not allowed"),
        ("aisec_train.models.wrn.WideResNet", {"depth": 10, "width": 1.5}, "model.width=1.5 is not allowed"),
        ("aisec_train.models.wrn.WideResNet", {"depth": 10, "width": True}, "model.width=True is not allowed"),
    ],
)  # fmt: skip
def test_preset_sizes_are_named_when_refused(target, kwargs, needle):
    """Before: torch's own words (``num_channels (6) must be divisible by num_groups (8)``) or, for MLP hidden=0
    and WRN width=True, a model built and trained (an MLP whose output is its bias alone)."""
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _factory(target, **kwargs).check()


def _checkpoint(tmp_path, change):
    state = SmallCNN(1, 10, 8).state_dict()
    change(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda s: s["conv1.weight"].view(-1)[0].fill_(float("nan")), "conv1.weight holds NaN or inf"),
        (lambda s: s["fc2.bias"].fill_(float("inf")), "fc2.bias holds NaN or inf"),
        (lambda s: s.__setitem__("conv1.weight", s["conv1.weight"].long()), "conv1.weight is torch.int64 in the file"),
    ],
)
def test_a_checkpoint_with_non_finite_or_integer_weights_is_refused(tmp_path, change, needle):
    """Before: loaded as they were; training (and its privacy budget) started from NaN weights."""
    with pytest.raises(ConfigError, match=needle):
        _factory("aisec_train.models.SmallCNN", checkpoint_path=_checkpoint(tmp_path, change)).check()


def test_a_finite_float64_checkpoint_still_loads(tmp_path):
    path = _checkpoint(tmp_path, lambda s: s.update({k: v.double() for k, v in s.items()}))
    _factory("aisec_train.models.SmallCNN", checkpoint_path=path).check()


def test_a_model_that_does_not_fit_is_one_line_without_its_cause_repeated():
    """Before: raised ``from err``, so the CLI's message (error: cause) printed torch's text twice."""
    with pytest.raises(ConfigError) as err:
        ModelFactory({"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 4}, (1, 8, 8), 10).check()
    assert "cannot take images of shape (1, 8, 8): mat1 and mat2" in str(err.value) and err.value.__cause__ is None


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_float64_custom_dataset_is_refused_before_the_ledger_opens(tmp_path):
    store = tmp_path / "ledgers"
    env = {
        "AISEC_TRAIN_LEDGER_STORE": str(store),
        "AISEC_TRAIN_KEY_FILE": str(tmp_path / "hmac.key"),
        "AISEC_TRAIN_ANCHOR_DIR": str(tmp_path / "anchors"),
        "AISEC_TRAIN_REGISTRY": str(tmp_path / "reg.json"),
    }
    run_dir = tmp_path / "run"
    proc = run_cli("dataset=custom", f"dataset.train._target_={HERE}.Items", "+dataset.train.kind=float64",
                   "train.epochs=1", f"hydra.run.dir={run_dir}", env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("aisec-train: error: dataset.train item 0: image is a")
    assert not (run_dir / "report.json").exists() and not (run_dir / "model.pt").exists()
    assert not list(store.rglob("*.json")) and not list(store.rglob("*.digests"))  # no ledger was opened


def _isolated(tmp_path):
    return {
        "AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "ledgers"),
        "AISEC_TRAIN_KEY_FILE": str(tmp_path / "hmac.key"),
        "AISEC_TRAIN_ANCHOR_DIR": str(tmp_path / "anchors"),
        "AISEC_TRAIN_REGISTRY": str(tmp_path / "reg.json"),
    }


@pytest.mark.slow
def test_a_model_that_does_not_fit_the_data_is_refused_before_the_store_is_written(tmp_path):
    """Before: the factory's forward check ran after the budget's account was opened, so the refusal left the
    dataset's record set (records/HASH.digests) and an anchor behind in the ledger store."""
    proc = run_cli("model._target_=torch.nn.Linear", "+model.in_features=3", "+model.out_features=4",
                   "train.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", env=_isolated(tmp_path))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("aisec-train: error: model._target_='torch.nn.Linear' cannot take images of shape")
    assert line.count("mat1 and mat2") == 1
    store = tmp_path / "ledgers"
    assert not [p for p in store.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert not (tmp_path / "anchors").exists() or not any((tmp_path / "anchors").iterdir())
