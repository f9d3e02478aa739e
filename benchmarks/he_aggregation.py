"""CKKS-encrypted FedAvg (aisec_train.crypto) against plaintext FedAvg (numpy weighted mean), one run.

Stages per size: encrypt (one client's update, median over the clients), aggregate (server, all clients),
decrypt (one client). Bytes per parameter are measured on the serialized upload. SEAL is single-threaded,
so the script also times one client's encryption spread over a thread pool and a process pool.

    python benchmarks/he_aggregation.py --quick --out he.json
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tenseal as ts
from common import emit, parse_args, ratio, time_it

from aisec_train.crypto import (
    CkksParams,
    aggregate,
    decrypt_aggregate,
    encrypt_update,
    generate_keys,
    load_public_context,
    load_secret_context,
)

N_CLIENTS = 10
_worker_ctx: ts.Context | None = None


def _init_worker(secret_path: str) -> None:
    global _worker_ctx
    _worker_ctx = load_secret_context(Path(secret_path))


def _encrypt_chunk(chunk: np.ndarray) -> bytes:
    return ts.ckks_vector(_worker_ctx, chunk.tolist()).serialize()


def _split(x: np.ndarray, slots: int) -> list[np.ndarray]:
    return [x[i : i + slots] for i in range(0, x.size, slots)]


def bench_size(n: int, secret, public, rng: np.random.Generator) -> list[dict]:
    xs = [rng.normal(0.0, 0.05, n) for _ in range(N_CLIENTS)]
    weights = rng.integers(1, 500, N_CLIENTS)
    reference = np.average(np.stack(xs), axis=0, weights=weights)

    enc_times, wire = [], []
    for x, w in zip(xs, weights, strict=True):
        start = time.perf_counter()
        wire.append(encrypt_update(x, int(w), secret).to_bytes())
        enc_times.append(time.perf_counter() - start)
    bpp = float(np.mean([len(b) for b in wire])) / n
    repeats = 3 if n <= 100_000 else 1
    agg = aggregate(wire, public)
    err = float(np.abs(decrypt_aggregate(agg, secret) - reference).max())
    t_agg = time_it(lambda: aggregate(wire, public), "cpu", repeats=repeats, warmup=0)
    t_dec = time_it(lambda: decrypt_aggregate(agg, secret), "cpu", repeats=repeats, warmup=0)
    stacked = np.stack([x.astype(np.float32) for x in xs])  # what a plaintext Flower client sends
    t_plain = time_it(lambda: np.average(stacked, axis=0, weights=weights), "cpu", repeats=5)
    plain_err = float(np.abs(np.average(stacked, axis=0, weights=weights) - reference).max())

    common = {"n_params": n, "clients": N_CLIENTS}
    return [
        {"impl": "ckks", "stage": "encrypt", "seconds": float(np.median(enc_times)), **common,
         "bytes_per_param": bpp, "max_abs_error": err},
        {"impl": "ckks", "stage": "aggregate", "seconds": t_agg, **common,
         "bytes_per_param": bpp, "max_abs_error": err},
        {"impl": "ckks", "stage": "decrypt", "seconds": t_dec, **common,
         "bytes_per_param": bpp, "max_abs_error": err},
        {"impl": "plaintext", "stage": "aggregate", "seconds": t_plain, **common,
         "bytes_per_param": 4.0, "max_abs_error": plain_err},
    ]  # fmt: skip


def bench_parallel_encrypt(n: int, secret, secret_path: Path, workers: int) -> list[dict]:
    """One client's encryption over ``workers`` threads and processes (SEAL itself uses one core)."""
    x = np.random.default_rng(1).normal(0.0, 0.05, n)
    slots = CkksParams().slots

    def threads() -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda c: ts.ckks_vector(secret, c.tolist()).serialize(), _split(x, slots)))

    rows = [{"impl": "ckks", "stage": "encrypt_1core", "n_params": n,
             "seconds": time_it(lambda: encrypt_update(x, 1, secret), "cpu", repeats=1, warmup=0)},
            {"impl": f"ckks_threads{workers}", "stage": "encrypt", "n_params": n,
             "seconds": time_it(threads, "cpu", repeats=1, warmup=0)}]  # fmt: skip
    # Processes pay a context load per worker once (as a long-lived client pool would), not per call.
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(secret_path),)) as pool:
        list(pool.map(_encrypt_chunk, _split(x[: workers * slots], slots)))  # warm the workers
        t = time_it(lambda: list(pool.map(_encrypt_chunk, _split(x, slots), chunksize=8)), "cpu", repeats=1)
    rows.append({"impl": f"ckks_processes{workers}", "stage": "encrypt", "n_params": n, "seconds": t})
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes = [10_000, 100_000] if args.quick else [100_000, 1_000_000]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_keys(CkksParams(), Path(tmp) / "client", Path(tmp) / "server")
        secret, public = load_secret_context(keys.secret_context), load_public_context(keys.public_context)
        rows = [row for n in sizes for row in bench_size(n, secret, public, rng)]
        workers = max(2, os.cpu_count() or 1)
        rows += bench_parallel_encrypt(sizes[-1], secret, keys.secret_context, workers)

    ratios = {}
    for n in sizes:
        ratios[f"plaintext_vs_ckks_aggregate_{n}"] = ratio(rows, "plaintext", "ckks", n_params=n, stage="aggregate")
    for impl in (f"ckks_threads{workers}", f"ckks_processes{workers}"):
        par = next(r for r in rows if r["impl"] == impl)
        one = next(r for r in rows if r["stage"] == "encrypt_1core")
        ratios[f"{impl}_vs_ckks_encrypt_{sizes[-1]}"] = one["seconds"] / par["seconds"]
    emit("he_aggregation", "cpu", rows, ratios, args.out)


if __name__ == "__main__":
    main()
