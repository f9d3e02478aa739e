"""Record identity (issue 20, item 2): the budget is charged to records, whatever file, order, container or
lossless dtype held them; duplicates leave the training split; image folders never loop on symlinks."""

from __future__ import annotations

import os
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from aisec_train.data.arrays import to_nchw
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.data.records import digest_arrays, digest_batch, first_occurrences
from aisec_train.data.views import Sample
from aisec_train.privacy import LedgerStore, compose_epsilon
from aisec_train.privacy.record_sets import RecordSets, as_set, register_and_share
from aisec_train.privacy.spend import DatasetSpend
from aisec_train.store import BudgetError
from aisec_train.store.errors import IntegrityError
from tests.conftest import run_cli

FAST = ["experiment=smoke", "audit=off", "robustness.evaluate=false", "train.epochs=1", "privacy.target_epsilon=1"]


def digits_on_grid() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (np.rint(bunch.images / 16 * 255) / 255).astype(np.float32)[:, None], bunch.target.astype(np.int64)


def npz(path, x, y, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    return ["dataset=npz", f"dataset.path={path}"]


# -- identity -------------------------------------------------------------------------------------------------
images = st.tuples(st.integers(1, 6), st.sampled_from([1, 3]), st.integers(1, 5), st.integers(1, 5)).flatmap(
    lambda shape: arrays(np.uint8, shape)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images, st.data())
def test_the_digest_is_invariant_to_lossless_casts_and_layout(pixels, data):
    labels = np.asarray(data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=len(pixels), max_size=len(pixels))))
    reference = digest_arrays(pixels, labels)
    as_float = pixels.astype(np.float32) / 255
    nhwc = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    for copy, y in [
        (as_float, labels),
        (as_float.astype(np.float64), labels),
        (pixels.astype(np.float64) / 255, labels.astype(np.int32)),
        (to_nchw(nhwc, "x") if pixels.shape[1] in (1, 3) and pixels.shape[2] not in (1, 3) else pixels, labels),
        (-0.0 * (pixels == 0) + as_float, labels),  # negative zeros are zeros
    ]:
        assert (digest_arrays(copy, y) == reference).all()
    perm = np.random.default_rng(0).permutation(len(pixels))
    assert (digest_arrays(pixels[perm], labels[perm]) == reference[perm]).all()
    streamed = np.frombuffer(digest_batch(torch.from_numpy(as_float), torch.from_numpy(labels)), dtype="V16")
    assert (streamed == reference).all()
    if pixels.shape[1] == 1:  # a grey image exported as RGB (three equal channels) is the same record
        assert (digest_arrays(np.repeat(pixels, 3, axis=1), labels) == reference).all()
    # float data off the 1/255 grid: identified by the float32 values training reads, in any float width
    off = as_float + np.float32(0.3 / 255)
    assert (digest_arrays(off.astype(np.float64), labels) == digest_arrays(off, labels)).all()
    # uint8 values cast to float without the 1/255 scale are the same records (unless all pixels are 0 or 1,
    # which is on the scaled grid and reads as 0 or 255)
    unscaled = digest_arrays(pixels.astype(np.float32), labels) == reference
    assert unscaled[(pixels.reshape(len(pixels), -1) > 1).any(axis=1)].all()


def test_other_content_or_another_label_is_another_record():
    x, y = digits_on_grid()
    x, y = x[:50], y[:50]
    base = digest_arrays(x, y)
    assert len(as_set(base)) == 50
    changed = x.copy()
    changed[7, 0, 3, 3] = 1.0 - changed[7, 0, 3, 3]
    assert (digest_arrays(changed, y) != base).sum() == 1
    relabelled = y.copy()
    relabelled[9] = (y[9] + 1) % 10
    assert (digest_arrays(x, relabelled) != base).sum() == 1
    assert (digest_arrays(x * 0.5, y) != base).all()  # a darker copy is other data (docs/privacy.md)


def test_first_occurrences_keep_the_first_copy():
    digests = digest_arrays(np.array([[[[1]]], [[[2]]], [[[1]]], [[[3]]], [[[2]]]], dtype=np.uint8), np.zeros(5))
    assert first_occurrences(digests).tolist() == [0, 1, 3]


# -- the data stage --------------------------------------------------------------------------------------------
def test_exact_duplicates_leave_the_training_split(tmp_path):
    x, y = digits_on_grid()
    x, y = np.concatenate([x, x[:5], x[:2]]), np.concatenate([y, y[:5], y[:2]])
    np.savez(tmp_path / "dup.npz", x=x, y=y)
    data = load_dataset(DatasetConfig(name="npz", path=str(tmp_path / "dup.npz")), seed=0)
    assert data.duplicates_removed > 0
    assert len(data.train) == len(as_set(data.record_digests)) == len(data.record_digests)
    assert any(step["step"] == "deduplicate" for step in data.lineage)
    clean = load_dataset(DatasetConfig(name="npz", path=str(tmp_path / "dup.npz")), seed=0, train=Sample(
        torch.from_numpy(x[:100]), torch.from_numpy(y[:100])))  # fmt: skip
    assert clean.duplicates_removed == 0 and len(clean.record_digests) == len(clean.train)


def write_png_folder(root, n_per_class=4):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), mode="L").save(root / label / f"{i}.png")


def test_a_symlink_loop_in_an_image_folder_terminates(tmp_path):
    root = tmp_path / "folder"
    write_png_folder(root)
    os.symlink("..", root / "a" / "up")  # a -> a/up -> folder -> a ... torchvision walks it until ELOOP
    os.symlink(".", root / "b" / "self")
    os.symlink(root / "a", root / "b" / "other_class")  # a folder another class already holds
    data = load_dataset(DatasetConfig(name="imagefolder", root=str(root), test_fraction=0.25), seed=0)
    assert len(data.train) + len(data.test) == 8
    assert data.duplicates_removed == 0


def test_an_image_folder_export_is_the_same_records(tmp_path):
    x, y = digits_on_grid()
    x, y = x[:40], y[:40] % 3
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        (tmp_path / "png" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image[0] * 255).astype(np.uint8), mode="L").save(
            tmp_path / "png" / str(label) / f"{i}.png"
        )
    data = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "png")), seed=0)
    assert data.input_shape[0] == 3  # decoded as RGB, as torchvision's ImageFolder does
    assert np.isin(data.record_digests.view("S16"), digest_arrays(x, y).view("S16")).all()


# -- the store -------------------------------------------------------------------------------------------------
def spend_on(store, dataset, digests, run_id, *, steps, target=20.0):
    """Register ``digests`` as ``dataset``'s records, admit a run (noise 1, sample rate 0.1), and charge ``steps``
    (as the loop does)."""
    from aisec_train.privacy.ledger import PrivacyLedger

    with store.open(dataset) as ledger, ExitStack() as hold:
        spend = DatasetSpend(ledger.delegate(), run_id, "dataset", 0, target, 1000)
        spend.shared = register_and_share(ledger, digests, hold=hold)
        run = PrivacyLedger("rdp", 1e-5)
        run.noise_multiplier, run.sample_rate = 1.0, 0.1
        stop = spend.begin(run, planned_steps=steps)
        run.accountant.history.append((1.0, 0.1, min(steps, int(stop))))
        spend.charge(run)
        return spend.summary()


def test_an_overlapping_dataset_composes_with_its_ledger_and_a_copy_is_refused(tmp_path):
    store = LedgerStore(tmp_path / "store")
    x, y = digits_on_grid()
    original = digest_arrays(x[:200], y[:200])
    half = np.concatenate([original[:100], digest_arrays(x[200:300], y[200:300])])
    first = spend_on(store, "a" * 64, original, "run-a", steps=40)
    second = spend_on(store, "b" * 64, half, "run-b", steps=40)
    records = second["records"]
    assert records["shared_with"] == {"a" * 16: 100}
    composed = compose_epsilon([(1.0, 0.1, 80)], delta=1e-5, accountant="rdp")
    assert records["epsilon_max"] == pytest.approx(composed, rel=1e-9)
    assert second["dataset_epsilon"] == pytest.approx(first["dataset_epsilon"])
    assert second["dataset_epsilon"] < composed  # the dataset's own ledger alone under-counts its shared records
    with pytest.raises(BudgetError, match=r"privacy budget exhausted for 100 record\(s\) of dataset cccccccccccccccc"):
        spend_on(store, "c" * 64, half[::-1], "run-c", steps=10, target=composed * 0.99)  # a's and b's records
    assert (
        spend_on(store, "d" * 64, digest_arrays(x[500:600], y[500:600]), "run-d", steps=10)["records"]["shared_with"]
        == {}
    )


def test_a_tampered_or_rolled_back_record_set_is_refused(tmp_path):
    store = LedgerStore(tmp_path / "store")
    x, y = digits_on_grid()
    spend_on(store, "a" * 64, digest_arrays(x[:10], y[:10]), "run-a", steps=1)
    sets = RecordSets(store.path)
    path = sets.path("a" * 64)
    saved = path.read_bytes()
    spend_on(store, "a" * 64, digest_arrays(x[:20], y[:20]), "run-a2", steps=1)
    assert len(sets.load("a" * 64)) == 20
    path.write_bytes(saved)  # an older, validly tagged set: 10 records fewer
    with pytest.raises(IntegrityError):
        sets.load("a" * 64)
    data = bytearray(saved)
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        sets.load("a" * 64)


# -- real runs -------------------------------------------------------------------------------------------------
def test_renamed_permuted_and_cast_copies_are_refused_through_the_api(tmp_path):
    from aisec_train.api import run

    x, y = digits_on_grid()
    run([*FAST, *npz(tmp_path / "original.npz", x, y)], run_dir=tmp_path / "original")
    perm = np.random.default_rng(3).permutation(len(y))
    copies = {
        "renamed": npz(tmp_path / "renamed.npz", x, y),
        "permuted_float64_int32": npz(tmp_path / "p.npz", x[perm].astype(np.float64), y[perm].astype(np.int32)),
        "uint8_values_as_float32_unscaled": npz(tmp_path / "f.npz", np.rint(x * 255).astype(np.float32), y),
        "nhwc_uint8_compressed": npz(
            tmp_path / "u.npz", np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1), y, compressed=True
        ),
    }
    for name, overrides in copies.items():
        with pytest.raises(BudgetError, match=r"privacy budget exhausted for \d+ record\(s\)"):
            run([*FAST, *overrides], run_dir=tmp_path / name)
        assert not (tmp_path / name / "model.pt").exists(), name
    with pytest.raises(BudgetError, match=r"record\(s\)"):  # the same records as a Python dataset, another order
        run(FAST, train_dataset=Sample(torch.from_numpy(x[perm]), torch.from_numpy(y[perm])), run_dir=tmp_path / "py")


@pytest.mark.slow
def test_a_renamed_copy_is_refused_through_the_cli(tmp_path):
    x, y = digits_on_grid()
    proc = run_cli(*FAST, *npz(tmp_path / "original.npz", x, y), f"hydra.run.dir={tmp_path / 'original'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(*FAST, *npz(tmp_path / "copy.npz", x, y), f"hydra.run.dir={tmp_path / 'copy'}")
    assert proc.returncode == 2
    assert "privacy budget exhausted for" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "copy" / "model.pt").exists()


def test_python_api_train_refuses_a_loader_with_duplicate_records():
    """``aisec_train.fit`` trains on the loader's dataset as given, so duplicates are refused there, not dropped."""
    import aisec_train
    from aisec_train.data.errors import DataError
    from aisec_train.models import build_model

    x, y = digits_on_grid()
    x, y = np.concatenate([x[:60], x[:3]]), np.concatenate([y[:60], y[:3]])
    loader = torch.utils.data.DataLoader(Sample(torch.from_numpy(x), torch.from_numpy(y)), batch_size=16)
    with pytest.raises(DataError, match="holds 3 exact duplicate record"):
        aisec_train.fit(build_model("mlp", in_channels=1, num_classes=10, image_size=8), loader, ["train.epochs=1"])


def test_a_dataset_that_names_its_own_records_is_identified_by_them():
    """Text datasets (data/text.py) name their records by normalised text; the data stage takes those digests."""

    class Named(Sample):
        def digests(self):
            return [bytes([i % 7]) * 16 for i in range(len(self))]  # 7 distinct records among 70 items

    x, y = digits_on_grid()
    data = load_dataset(DatasetConfig(), seed=0, train=Named(torch.from_numpy(x[:70]), torch.from_numpy(y[:70])))
    assert len(data.record_digests) == len(data.train) <= 7 and data.duplicates_removed >= 70 - 7 - len(data.test)


@pytest.mark.slow
def test_an_overlapping_dataset_composes_through_the_api(tmp_path):
    """Two real runs: a dataset sharing half its records with an earlier one reports those records' spend as both
    runs composed, above its own dataset ledger's."""
    from aisec_train.api import run

    x, y = digits_on_grid()
    fixed = [*FAST[:-1], "privacy.noise_multiplier=2.0", "privacy.target_epsilon=8"]
    reports = [run([*fixed, *npz(tmp_path / "a.npz", x, y)], run_dir=tmp_path / "a").sections["privacy"]]
    half = len(y) // 2
    mixed = np.concatenate([x[:half], x[half:, :, :, ::-1]])  # the second half mirrored: other records
    reports.append(run([*fixed, *npz(tmp_path / "b.npz", mixed, y)], run_dir=tmp_path / "b").sections["privacy"])
    first, second = (r["budget"] for r in reports)
    assert first["records"]["shared_with"] == {} and len(second["records"]["shared_with"]) == 1
    assert second["records"]["epsilon_max"] > second["dataset_epsilon"] * 1.2
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in reports]  # both runs, composed
    composed = compose_epsilon(history, delta=reports[0]["delta"], accountant=reports[0]["accountant"])
    assert second["records"]["epsilon_max"] == pytest.approx(composed)
