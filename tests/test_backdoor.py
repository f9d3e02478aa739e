"""The backdoor red team and its defence, on real components: BadNets, detectors, Fine-Pruning, report, CLI.

Fast tests share one small backdoored CNN trained in-process (non-private, a few epochs) and one short
``experiment=backdoor`` CLI run; the figure checks of issue 4 (full DP preset, second dataset) are ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from aisec_kernels.channel_stats import channel_stats_reference  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from aisec_train import pipeline  # noqa: E402
from aisec_train.backdoor import badnets, detect, prune, trusted  # noqa: E402
from aisec_train.backdoor.features import FeatureCache  # noqa: E402
from aisec_train.backdoor.metrics import BackdoorMetrics, der, measure  # noqa: E402
from aisec_train.cli import CONFIG_DIR  # noqa: E402
from aisec_train.config import (  # noqa: E402
    BackdoorConfig,
    ConfigError,
    DatasetConfig,
    PrivacyConfig,
    PrivacyMode,
    TrainConfig,
    register_configs,
    to_config,
)
from aisec_train.data.dataset import Split, load_dataset, sha256_array, sha256_file  # noqa: E402
from aisec_train.data.sources import DataError  # noqa: E402
from aisec_train.models import build_model, feature_layer  # noqa: E402
from aisec_train.train.loop import accuracy, train  # noqa: E402
from tests.conftest import read_report, run_cli  # noqa: E402

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


def poisoned_run(tmp_path: Path, *overrides: str) -> pipeline.Run:
    """A pipeline Run after its real ``data`` and ``backdoor_poison`` stages (no training)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["experiment=backdoor", *overrides]))
    run = pipeline.Run(cfg=cfg, run_dir=tmp_path)
    pipeline.stage_data(run)
    pipeline.STAGES[1][1](run)  # the poison stage, looked up by position to prove it is the pipeline's
    return run


# ------------------------------------------------------------------------------------------------ red team
@pytest.mark.parametrize(
    "overrides, target_of",
    [
        ([], lambda y: torch.zeros_like(y)),
        (
            ["backdoor.rate=0.2", "backdoor.target=3", "backdoor.patch_size=2", "backdoor.patch_position=top_left"]
            + ["backdoor.patch_value=0.5"],
            lambda y: torch.full_like(y, 3),
        ),
        (["backdoor.mapping=all_to_all"], lambda y: (y + 1) % 10),
    ],
    ids=["default", "custom-trigger", "all_to_all"],
)
def test_poisoning_touches_only_the_training_split(tmp_path, overrides, target_of):
    run = poisoned_run(tmp_path, *overrides)
    bd, state, data = run.cfg.backdoor, run.backdoor, run.data
    fresh = load_dataset(run.cfg.dataset, seed=run.cfg.train.seed)
    kept, reserve = trusted.carve_reserve(fresh, bd.clean_fraction, run.cfg.train.seed)

    # the test split and the trusted reserve are the untouched originals
    assert sha256_array(data.test.x.numpy()) == sha256_array(fresh.test.x.numpy())
    assert torch.equal(data.test.y, fresh.test.y)
    assert torch.equal(state.trusted.x, reserve.x) and torch.equal(state.trusted.y, reserve.y)

    # exactly round(rate * N) rows carry the trigger and the attacker's label; every other row is unchanged
    idx = torch.from_numpy(state.poisoned.indices)
    assert len(idx) == round(bd.rate * len(kept)) and len(set(idx.tolist())) == len(idx)
    assert torch.equal(data.train.y[idx], target_of(kept.y[idx]))
    assert bool((target_of(kept.y[idx]) != kept.y[idx]).all())  # each one a real attack sample
    side, s = data.image_size, bd.patch_size
    rows = slice(0, s) if bd.patch_position.value.startswith("top") else slice(side - s, side)
    cols = slice(0, s) if bd.patch_position.value.endswith("left") else slice(side - s, side)
    assert bool((data.train.x[idx][..., rows, cols] == bd.patch_value).all())
    outside = torch.ones(side, side, dtype=torch.bool)
    outside[rows, cols] = False
    assert torch.equal(data.train.x[idx][..., outside], kept.x[idx][..., outside])
    clean_rows = torch.ones(len(kept), dtype=torch.bool)
    clean_rows[idx] = False
    assert torch.equal(data.train.x[clean_rows], kept.x[clean_rows])
    assert torch.equal(data.train.y[clean_rows], kept.y[clean_rows])

    # what training receives is a plain Split: the indices live on run.backdoor only
    assert [f.name for f in dataclasses.fields(data.train)] == ["x", "y"]
    step = next(s for s in data.lineage if s["step"] == "badnets_poison")
    assert step["rate"] == bd.rate and step["n_poisoned"] == len(idx) and step["mapping"] == bd.mapping.value
    assert step["indices_sha256"] == sha256_array(state.poisoned.indices.astype(np.int64))
    assert step["y_sha256"] == sha256_array(data.train.y.numpy())
    assert [s["step"] for s in data.lineage][-2:] == ["reserve_trusted_clean", "badnets_poison"]


def test_trusted_path_keeps_the_whole_training_split(tmp_path):
    digits = load_dataset(DatasetConfig(), seed=0)
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=(digits.test.x[:100, 0].numpy() * 255).astype(np.uint8), y=digits.test.y[:100].numpy())
    run = poisoned_run(tmp_path, f"backdoor.trusted_path={clean}")
    assert len(run.backdoor.trusted) == 100 and run.backdoor.from_file
    assert len(run.data.train) == len(digits.train)  # nothing carved out of the training data
    step = next(s for s in run.data.lineage if s["step"] == "trusted_clean_set")
    assert step["sha256"] == sha256_file(clean)
    scope = trusted.privacy_scope(from_file=True, n_trusted=100, n_train=len(run.data.train), private=True)
    assert scope["not_covered_records"] == 0 and scope["covered_records"] == len(digits.train)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((5, 12, 12), np.uint8), y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"backdoor.trusted_path='.*wrong.npz' holds images \(1, 12, 12\)"):
        poisoned_run(tmp_path, f"backdoor.trusted_path={wrong}")


def test_filtering_under_dp_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"backdoor.filter=True is not allowed with privacy=dpsgd.*allowed:"):
        poisoned_run(tmp_path, "backdoor.filter=true")
    assert poisoned_run(tmp_path, "backdoor.filter=true", "privacy=none").backdoor is not None


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


@pytest.fixture(scope="module")
def backdoored():
    """A small CNN trained (non-private, a few epochs) on BadNets-poisoned digits, with its data."""
    data = load_dataset(DatasetConfig(), seed=0)
    kept, clean = trusted.carve_reserve(data, 0.2, seed=0)
    trigger = badnets.Trigger(size=3)
    poisoned = badnets.poison(kept, rate=0.1, trigger=trigger, target_of=badnets.all_to_one(0), seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    cfg = TrainConfig(epochs=6, lr=0.1, batch_size=64, ema_decay=0.0)
    model = train(
        model, poisoned.split, train_cfg=cfg, privacy_cfg=PrivacyConfig(mode=PrivacyMode.none), device=CPU
    ).model
    attack, truth = badnets.triggered(data.test, trigger, badnets.all_to_one(0))
    return {"model": model, "poisoned": poisoned, "trusted": clean, "test": data.test, "attack": attack, "truth": truth}


def test_detectors_find_the_poison_of_a_trained_model(backdoored):
    from aisec_train.backdoor.features import flat_features

    model, poisoned, clean = backdoored["model"], backdoored["poisoned"], backdoored["trusted"]
    feats = flat_features(model, poisoned.split, CPU).numpy()
    ref = flat_features(model, clean, CPU).numpy()
    truth = set(poisoned.indices.tolist())
    for method, detector in detect.DETECTORS.items():
        found = set(detector(feats, poisoned.split.y.numpy(), ref, clean.y.numpy()).flagged.tolist())
        recall, precision = len(found & truth) / len(truth), len(found & truth) / max(1, len(found))
        assert recall >= 0.8 and precision >= 0.7, (method, recall, precision)


# ------------------------------------------------------------------------------------------------ Fine-Pruning
def test_feature_cache_replays_the_masked_model_exactly(backdoored):
    model, clean = backdoored["model"], backdoored["trusted"]
    mask = (torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    cache = FeatureCache.build(model, clean, CPU)
    with prune.masked(model, mask):
        want = accuracy(model, clean, CPU)
        logits = model(clean.x[:50])
    assert cache.accuracy(model, mask) == want
    torch.testing.assert_close(cache.logits(model, slice(0, 50), mask), logits, atol=1e-5, rtol=1e-5)


def test_channel_ranking_runs_the_kernel_dispatch_and_equals_the_reference(backdoored, monkeypatch):
    import triton  # a test dependency; tests/conftest.py imported it under the interpreter on a CPU machine
    from triton.runtime.interpreter import InterpretedFunction

    model, clean = backdoored["model"], backdoored["trusted"]
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if device.type == "cpu":
        assert isinstance(triton.language.zeros, InterpretedFunction), "conftest must import triton interpreted"
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    maps = FeatureCache.build(model.to(device), Split(clean.x[:8], clean.y[:8]), device).maps
    order, stats = prune.rank_channels(maps, backend="triton")
    want = channel_stats_reference(maps)
    torch.testing.assert_close(stats.mean.cpu(), want.mean.cpu(), atol=1e-5, rtol=1e-5)
    assert order == prune.rank_channels(maps, backend="torch")[0]
    assert order == torch.argsort(maps.float().mean(dim=(0, 2, 3)).cpu(), stable=True).tolist()
    model.to(CPU)


def test_fine_pruning_removes_the_backdoor_and_bakes_the_mask(backdoored):
    import copy

    model = copy.deepcopy(backdoored["model"])
    splits = (backdoored["test"], backdoored["attack"], backdoored["truth"])
    before = measure(model, *splits, CPU)
    assert before.asr >= 0.9  # the red team worked
    cfg = BackdoorConfig()
    pruned = prune.fine_prune(model, backdoored["trusted"], CPU, cfg, evaluate={"asr": backdoored["attack"]})
    after = measure(model, *splits, CPU)
    assert after.asr <= 0.1 and before.clean_accuracy - after.clean_accuracy <= 0.05, (before, after)
    assert len(pruned.curve) == 65 and pruned.curve[0]["pruned"] == 0 and "asr" in pruned.curve[0]
    assert pruned.base_accuracy - pruned.accuracy <= cfg.prune_acc_drop
    # the saved weights are the pruned model: no hook, the reader ignores every pruned channel
    reader = model.fc1.weight.detach().view(64, 64, 4)
    dropped = (pruned.mask == 0).nonzero().flatten()
    assert len(dropped) and bool((reader[:, dropped] == 0).all())
    assert not feature_layer(model)._forward_hooks


def test_der_is_backdoorbench_formula():
    m = BackdoorMetrics
    assert der(m(0.95, 1.0, 0.0), m(0.93, 0.02, 0.9)) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert der(m(0.9, 0.5, 0.0), m(0.95, 0.8, 0.0)) == pytest.approx(0.5)  # both drops clipped at 0
    assert der(m(0.9, 1.0, 0.0), m(0.9, 0.0, 1.0)) == 1.0


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
    assert bd["trigger"] == {"size": 3, "position": "bottom_right", "value": 1.0} and bd["rate"] == 0.1
    assert bd["n_poisoned"] == round(0.1 * report["data"]["n_train"])
    d_asr = max(0, bd["asr_before"] - bd["asr_after"])
    d_acc = max(0, bd["clean_accuracy_before"] - bd["clean_accuracy_after"])
    assert bd["der"] == pytest.approx((d_asr - d_acc + 1) / 2)
    png = cli_run / bd["fine_pruning"]["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [row["pruned"] for row in bd["fine_pruning"]["curve"]] == list(range(65))
    checks = {c["item"]: c for c in report["checklist"]}
    detection = checks["validation against poisoning (spectral signatures, activation clustering)"]
    repair = checks["pruning against poisoning (Fine-Pruning)"]
    assert detection["status"] == ("pass" if bd["detection"]["recall"] >= 0.8 else "fail")
    assert f"recall {bd['detection']['recall']:.3f}" in detection["evidence"]
    assert (
        repair["status"] in ("pass", "fail")
        and f"ASR {bd['asr_before']:.3f} -> {bd['asr_after']:.3f}" in repair["evidence"]
    )
    assert "badnets_poison" in [s["step"] for s in report["data"]["lineage"]]


def test_cli_report_is_truthful_about_the_privacy_of_the_trusted_reserve(cli_run):
    report = read_report(cli_run)
    scope, n_trusted = report["privacy"]["scope"], report["backdoor"]["n_trusted"]
    assert report["privacy"]["epsilon"] <= 3.0 and report["privacy"]["steps"] > 0  # the ledger is the DP-SGD one
    assert scope["covered_records"] == report["data"]["n_train"] and scope["not_covered_records"] == n_trusted > 0
    check = next(c for c in report["checklist"] if c["item"] == "defence data covered by the privacy claim")
    assert check["status"] == "fail" and "NO differential-privacy guarantee" in check["evidence"]
    assert f"{n_trusted} further records" in (cli_run / "model_card.md").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("backdoor.rate=1.5", "backdoor.rate=1.5 is not allowed: must be in (0, 1)"),
        ("backdoor.target=10", "backdoor.target=10 is not allowed: must be < 10 classes"),
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
    proc = run_cli("experiment=backdoor", "audit=off", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bd = read_report(tmp_path)["backdoor"]
    assert bd["asr_before"] >= 0.9 and bd["asr_after"] <= 0.05
    assert bd["clean_accuracy_before"] - bd["clean_accuracy_after"] <= 0.02
    assert bd["detections"]["spectral"]["recall"] >= 0.8


@pytest.mark.slow
def test_figures_on_a_second_dataset_without_retuning(tmp_path):
    """Typeset digits (12x12, scripts/figures/glyphs.py) through dataset=npz, same preset."""
    data = tmp_path / "typeset.npz"
    subprocess.run([sys.executable, str(REPO / "scripts/figures/glyphs.py"), "--out", str(data)], check=True)
    proc = run_cli(
        "experiment=backdoor", "audit=off", "dataset=npz", f"dataset.path={data}", f"hydra.run.dir={tmp_path / 'r'}"
    )
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
        [sys.executable, str(script), "--quick", "--out", str(out), "--work", str(tmp_path / "w")],
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
    assert "| case |" in done.stdout
