"""`aisec-train-monitor RUN_DIR batch.npz` on clean and shifted digits batches, and on bad input.

The shifted batches are made here with scipy (not with the package's own shift helpers), from held-out digits
the run's baseline never saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from aisec_train.audit import monitor
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.data.views import materialize
from tests.conftest import REPO, read_report


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    """The smoke run's held-out inputs not used to calibrate its baseline (N, 8, 8 float32 in [0, 1])."""
    x, _ = materialize(load_dataset(DatasetConfig(), seed=0).test)
    return x[1::2, 0].numpy()


def clean_batches(x: np.ndarray) -> dict[str, np.ndarray]:
    return {f"clean_{i}": part for i, part in enumerate(np.array_split(x, 3))}  # three disjoint batches of 60


def shifted_batches(x: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    occluded = x.copy()
    occluded[:, 2:6, 2:6] = 1.0  # a bright 4x4 sticker over the middle of the digit
    return {
        "noise": np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32),
        "rotation": np.clip(ndimage.rotate(x, 30, axes=(1, 2), reshape=False, order=1), 0, 1).astype(np.float32),
        "occlusion": occluded,
    }


def monitor_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The console script's entry point, in-process (the subprocess test below covers the installed script)."""
    with pytest.raises(SystemExit) as exit_:
        monitor.main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def save(path: Path, x: np.ndarray) -> Path:
    np.savez(path, x=x)
    return path


def junk(path: Path) -> Path:
    path.write_text("not a zip archive")
    return path


def damaged(path: Path, x: np.ndarray, how: str) -> Path:
    """A real .npz of ``x``, damaged: a flipped CRC byte (zipfile.BadZipFile) or an .npy header numpy cannot
    tokenize (tokenize.TokenError); both escaped as tracebacks before."""
    data = save(path, x).read_bytes()
    if how == "crc":
        at = data.index(b"}") + 80  # a byte of x's values, past its .npy header: its CRC-32 no longer matches
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    else:
        data = data.replace(b"'fortran_order': False", b"'fortran_order'[ False", 1)
    path.write_bytes(data)
    return path


def test_flags_every_shifted_batch_and_no_clean_one(smoke_run, heldout, tmp_path, capsys):
    verdicts = {}
    for name, x in {**clean_batches(heldout), **shifted_batches(heldout[:60])}.items():
        code, out, _ = monitor_cli(capsys, smoke_run, save(tmp_path / f"{name}.npz", x))
        verdicts[name] = (code, out)
    for name, (code, out) in verdicts.items():
        expected_alarm = not name.startswith("clean")
        assert code == (1 if expected_alarm else 0), (name, out)
        assert out.startswith("ALARM: 60 inputs" if expected_alarm else "OK: 60 inputs"), out
        assert "drift score" in out and "mean confidence" in out
    assert "input drift: score" in verdicts["noise"][1] and "top: " in verdicts["noise"][1]


def test_accepts_the_npz_layouts_of_the_dataset_contract(smoke_run, heldout, tmp_path, capsys):
    x = heldout[:60]
    layouts = {
        "uint8_nhw": np.round(x * 255).astype(np.uint8),
        "nhwc": x[..., None],
        "nchw": x[:, None],
    }
    for name, arr in layouts.items():
        code, out, err = monitor_cli(capsys, smoke_run, save(tmp_path / f"{name}.npz", arr))
        assert code == 0 and out.startswith("OK"), (name, out, err)


def test_json_verdict(smoke_run, heldout, tmp_path, capsys):
    verdict = tmp_path / "verdict.json"
    code, _, _ = monitor_cli(
        capsys, smoke_run, save(tmp_path / "n.npz", shifted_batches(heldout)["noise"]), "--json", verdict
    )
    data = json.loads(verdict.read_text())
    assert code == 1 and data["alarm"] and data["drift_score"] > 4 and len(data["feature_z"]) == 128


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d, x: d / "missing.npz", ["does not exist"]),
        (lambda d, x: save(d / "wrong.npz", np.zeros((4, 28, 28), np.float32)), ["[1, 28, 28]", "[1, 8, 8]"]),
        (lambda d, x: save(d / "flat.npz", x.reshape(len(x), -1)), ["shape", "expected (N,H,W)"]),
        (lambda d, x: save(d / "range.npz", x * 5), ["finite values in [0, 1]"]),
        (lambda d, x: junk(d / "junk.npz"), ["not a readable .npz"]),
        (lambda d, x: damaged(d / "crc.npz", x, "crc"), ["not a readable .npz"]),
        (lambda d, x: damaged(d / "header.npz", x, "header"), ["not a readable .npz"]),
    ],
    ids=["missing", "wrong-shape", "flat", "range", "not-npz", "bad-crc", "bad-header"],
)
def test_bad_input_is_one_line_and_exit_2(smoke_run, heldout, tmp_path, capsys, make, words):
    code, out, err = monitor_cli(capsys, smoke_run, make(tmp_path, heldout[:10]))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("aisec-train-monitor: error: ")
    for word in words:
        assert word in err


def test_run_without_baseline_is_refused(tmp_path, heldout, capsys):
    code, _, err = monitor_cli(capsys, tmp_path, save(tmp_path / "b.npz", heldout[:10]))
    assert code == 2 and "holds no monitor_baseline.json" in err


def test_installed_console_script_signals_an_alarm(smoke_run, heldout, tmp_path):
    batch = save(tmp_path / "rot.npz", shifted_batches(heldout)["rotation"])
    script = Path(sys.executable).with_name("aisec-train-monitor")
    proc = subprocess.run([script, smoke_run, batch], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout.startswith("ALARM"), proc.stderr


def test_run_self_check_is_in_the_report(smoke_run):
    report = read_report(smoke_run)
    checks = report["monitoring"]["self_check"]
    assert not checks["clean_heldout"]["alarm"]
    assert all(checks[k]["alarm"] for k in ("gaussian_noise", "rotation", "occlusion"))
    assert (smoke_run / report["monitoring"]["baseline"]).is_file()


# ---- load_run: the model is rebuilt from the recipe in model.pt's keyed tag, through the model factory ----------


def _hand_made_run(run_dir: Path, *, private: bool, normalize):
    """A run folder as the pipeline leaves it: model.pt tagged with its recipe, and a monitoring baseline."""
    import torch

    from aisec_train.config import MonitorConfig
    from aisec_train.models import ModelFactory
    from aisec_train.train import checkpoint

    factory = ModelFactory(
        {"_target_": "tests.userland.TinyResNet", "width": 4},
        input_shape=(3, 6, 6),
        num_classes=3,
        private=private,
        normalize=normalize,
    )
    model = factory(seed=3)
    with torch.no_grad():  # weights unlike a fresh seed-0 model: the test sees that they were really loaded
        for p in model.parameters():
            p.add_(0.01)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.save(state, run_dir / "model.pt", root=run_dir, meta={"model": monitor.recipe(factory)})
    x = torch.rand(40, 3, 6, 6)
    meta = {"target": factory.target, "input_shape": [3, 6, 6], "num_classes": 3}
    baseline = monitor.build_baseline(model, x[:20], x[20:], model_meta=meta, cfg=MonitorConfig())
    (run_dir / monitor.BASELINE).write_text(json.dumps(baseline))
    return run_dir, model.eval()


@pytest.mark.parametrize(
    "private, normalize",
    [(True, ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])), (False, None)],
    ids=["dp-fixed-and-normalized", "plain"],
)
def test_load_run_rebuilds_the_recorded_model_through_the_factory(tmp_path, private, normalize):
    import torch

    run_dir, trained = _hand_made_run(tmp_path, private=private, normalize=normalize)
    _, model = monitor.load_run(run_dir)
    names = {type(m).__name__ for m in model.modules()}
    assert ("GroupNorm" in names and "BatchNorm2d" not in names) if private else "BatchNorm2d" in names
    assert ("InputNormalization" in names) == (normalize is not None)
    for (name, a), (_, b) in zip(model.state_dict().items(), trained.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_run_refuses_what_the_keyed_tag_does_not_vouch_for(tmp_path):
    from aisec_train.train import checkpoint

    run_dir, _ = _hand_made_run(tmp_path, private=True, normalize=None)
    baseline = json.loads((run_dir / monitor.BASELINE).read_text())
    baseline["model"]["target"] = "os.system"  # an edited baseline cannot choose what gets built
    (run_dir / monitor.BASELINE).write_text(json.dumps(baseline))
    with pytest.raises(checkpoint.CheckpointError, match="do not belong together"):
        monitor.load_run(run_dir)

    run_dir, _ = _hand_made_run(tmp_path / "b", private=True, normalize=None)
    tag = json.loads((run_dir / "model.pt.tag").read_text())
    tag["meta"]["model"]["spec"]["_target_"] = "os.system"  # an edited recipe breaks the keyed tag
    (run_dir / "model.pt.tag").write_text(json.dumps(tag))
    with pytest.raises(checkpoint.CheckpointError, match="keyed tag does not verify"):
        monitor.load_run(run_dir)

    run_dir = tmp_path / "c"  # a model.pt whose tag records no recipe (a Python-object model): one clear refusal
    import torch

    checkpoint.save({"w": torch.zeros(2)}, run_dir / "model.pt", root=run_dir)
    (run_dir / monitor.BASELINE).write_text(json.dumps({"input_shape": [1, 2, 2], "model": {}}))
    with pytest.raises(checkpoint.CheckpointError, match="records no model config to rebuild it from"):
        monitor.load_run(run_dir)
