"""Figure: the privacy budget follows records, not files (issue 20, item 2).

A digits .npz (pixels on the 1/255 grid, float32 N,C,H,W, int64 labels) spends its budget in one real
``aisec-train`` run; then each copy below is run against the same ledger store and must be refused before any
step, charged to the same records:
rename, permuted rows, float32 -> float64, NHWC layout, np.savez_compressed, one duplicated row, uint8 pixels,
int32 labels, and an ImageFolder PNG export. For each copy the figure also gives, in-process, how many of its
training records the original holds. A second store shows composition: a dataset sharing half its records with
the original, after a run on the original, reports its records' spend as both runs composed.

Cost: the default job (``aisec-train``, no arguments) run once; ``data.records.hash_seconds`` (measured inside
the job) over the job's wall time. Memory: 1M records of 8x8 uint8 hashed in a fresh process (digest array
bytes, peak RSS over the process before hashing).

    .venv/bin/python scripts/figures/record_identity.py            # ~6 min on 2 busy cores
    .venv/bin/python scripts/figures/record_identity.py --no-cli   # in-process parts only
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write  # noqa: E402

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

FAST = ["experiment=smoke", "audit=off", "robustness.evaluate=false", "train.epochs=1", "privacy.target_epsilon=1"]


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.rint(bunch.images / 16 * 255) / 255).astype(np.float32)[:, None]  # on the 1/255 grid: uint8-castable
    return x, bunch.target.astype(np.int64)


def export_png(x: np.ndarray, y: np.ndarray, root: Path) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image[0] * 255).astype(np.uint8), mode="L").save(folder / f"{i:05d}.png")


def make_copies(x: np.ndarray, y: np.ndarray, folder: Path) -> dict[str, list[str]]:
    """Each copy as the dataset overrides that read it."""
    perm = np.random.default_rng(1).permutation(len(y))
    np.savez(folder / "original.npz", x=x, y=y)
    shutil.copy(folder / "original.npz", folder / "renamed_copy.npz")
    arrays = {
        "permuted": (x[perm], y[perm]),
        "float64": (x.astype(np.float64), y),
        "nhwc": (np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y),
        "duplicated_row": (np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])),
        "uint8": (np.rint(x * 255).astype(np.uint8), y),
        "int32_labels": (x, y.astype(np.int32)),
    }
    for name, (xa, ya) in arrays.items():
        np.savez(folder / f"{name}.npz", x=xa, y=ya)
    np.savez_compressed(folder / "compressed.npz", x=x, y=y)
    export_png(x, y, folder / "imagefolder")
    npz = ["renamed_copy", *arrays, "compressed"]
    copies = {name: ["dataset=npz", f"dataset.path={folder / (name + '.npz')}"] for name in npz}
    copies["imagefolder_png"] = ["dataset=imagefolder", f"dataset.root={folder / 'imagefolder'}"]
    return copies


def config(overrides: list[str]):
    from aisec_train.api import compose

    return compose(overrides).dataset


def in_process(copies: dict[str, list[str]], original: np.ndarray) -> dict[str, dict]:
    """Per copy: how many of its training records the original's records hold, and duplicates left out."""
    from aisec_train.data.dataset import load_dataset
    from aisec_train.privacy.record_sets import as_set, contains

    known, rows = as_set(original), {}
    for name, overrides in copies.items():
        started = time.perf_counter()
        data = load_dataset(config(overrides), seed=0)
        digests = data.record_digests
        rows[name] = {
            "n_train": len(data.train),
            "records_known_to_original": int(contains(known, digests).sum()),
            "duplicates_removed": data.duplicates_removed,
            "manifest_sha256": data.manifest_sha256[:16],
            "load_seconds": round(time.perf_counter() - started, 3),
        }
    return rows


def cli(args: list[str], run_dir: Path, store: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "AISEC_TRAIN_LEDGER_STORE": str(store), "AISEC_TRAIN_REGISTRY": str(store / "reg.json")}
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "aisec_train", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    return proc, time.perf_counter() - started


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def refusals(copies: dict[str, list[str]], folder: Path) -> dict:
    store = folder / "store"
    proc, seconds = cli([*FAST, *copies["original"]], folder / "runs" / "original", store)
    if proc.returncode != 0:
        raise SystemExit(f"the original run failed:\n{proc.stderr[-2000:]}")
    report = json.loads((folder / "runs" / "original" / "report.json").read_text())
    out = {"original": {"rc": 0, "epsilon": report["privacy"]["epsilon"], "seconds": round(seconds, 1)}}
    for name, overrides in copies.items():
        if name == "original":
            continue
        proc, seconds = cli([*FAST, *overrides], folder / "runs" / name, store)
        line = last_line(proc)
        out[name] = {
            "rc": proc.returncode,
            "refused_by_records": proc.returncode == 2 and "privacy budget exhausted" in line and "record(s)" in line,
            "trained": (folder / "runs" / name / "model.pt").exists(),
            "message": line[:300],
            "seconds": round(seconds, 1),
        }
    return out


def composition(x: np.ndarray, y: np.ndarray, folder: Path) -> dict:
    """Half of the original's records plus as many new ones (mirrored digits): the records' spend composes."""
    store, half = folder / "store_composed", len(y) // 2
    np.savez(folder / "orig_c.npz", x=x, y=y)
    mixed_x = np.concatenate([x[:half], x[half:, :, :, ::-1]])
    np.savez(folder / "half_overlap.npz", x=mixed_x, y=y)
    fixed = ["privacy.noise_multiplier=2.0", "privacy.target_epsilon=8"]
    rows = {}
    for name in ("orig_c", "half_overlap"):
        args = [*FAST[:-1], *fixed, "dataset=npz", f"dataset.path={folder / (name + '.npz')}"]
        proc, _ = cli(args, folder / "runs" / name, store)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
        budget = json.loads((folder / "runs" / name / "report.json").read_text())["privacy"]["budget"]
        rows[name] = {
            "dataset_epsilon": budget["dataset_epsilon"],
            "records_epsilon_max": budget["records"]["epsilon_max"],
            "shared_with": budget["records"]["shared_with"],
        }
    return rows


def hashing_cost(folder: Path) -> dict:
    proc, seconds = cli([], folder / "runs" / "default_job", folder / "store_default")
    if proc.returncode != 0:
        raise SystemExit(f"the default job failed:\n{proc.stderr[-2000:]}")
    report = json.loads((folder / "runs" / "default_job" / "report.json").read_text())
    hashed = report["data"]["records"]["hash_seconds"]
    stages = report.get("run", {}).get("stage_seconds", {})
    return {
        "hash_seconds_in_job": hashed,
        "job_wall_seconds": round(seconds, 2),
        "stage_seconds_total": round(sum(stages.values()), 2) if stages else None,
        "share_of_wall": hashed / seconds,
        "n_records": report["data"]["records"]["n"],
    }


MEMORY_PROBE = """
import json, re, sys, time, tracemalloc, numpy as np
def peak_mib():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's peak across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
from aisec_train.data.records import digest_arrays
from aisec_train.privacy.record_sets import as_set
x = np.random.default_rng(0).integers(0, 256, size=(N, 1, 8, 8), dtype=np.uint8)
y = np.zeros(N, dtype=np.int64)
before = peak_mib()
t = time.perf_counter(); d = digest_arrays(x, y); hashed = time.perf_counter() - t
t = time.perf_counter(); s = as_set(d); sorted_ = time.perf_counter() - t
after = peak_mib()
del d, s
tracemalloc.start()  # a second pass, traced (tracing slows it: the times above are untraced)
d = digest_arrays(x, y); s = as_set(d)
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"n": N, "digest_bytes": d.nbytes, "set_bytes": s.nbytes, "input_bytes": x.nbytes,
                  "hash_seconds": hashed, "set_seconds": sorted_, "torch_imported": "torch" in sys.modules,
                  "peak_rss_mib_before_hashing": before, "peak_rss_mib_after": after,
                  "peak_rss_growth_mib": after - before, "traced_peak_mib": traced_peak / 2**20}))
"""


def memory(n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE.replace("N", str(n))], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cli", action="store_true", help="skip the real runs (in-process parts only)")
    parser.add_argument("--records", type=int, default=1_000_000, help="records for the memory probe")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    x, y = digits()
    from aisec_train.data.records import digest_arrays

    result: dict = {"figure": "record_identity", "cpus": os.cpu_count(), "note": "timings on a shared, busy machine"}
    with tempfile.TemporaryDirectory(prefix="record_identity-") as tmp:
        folder = Path(tmp)
        copies = {"original": ["dataset=npz", f"dataset.path={folder / 'original.npz'}"]}
        copies |= make_copies(x, y, folder)
        result["same_records"] = in_process(copies, digest_arrays(x, y))
        result["memory"] = memory(args.records)
        if not args.no_cli:
            result["refused_after_original_spent"] = refusals(copies, folder)
            result["composition"] = composition(x, y, folder)
            result["hashing_cost_default_job"] = hashing_cost(folder)
    print(json.dumps(result, indent=1))
    print("wrote", write("record_identity", result, args.out))


if __name__ == "__main__":
    main()
