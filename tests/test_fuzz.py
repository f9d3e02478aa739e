"""No traceback, ever, from input: generated bad overrides and bad .npz files are refused cleanly.

Each case runs ``aisec-train`` in-process (tests/fuzzing.py: Hydra reset between calls) and must exit 2 with one
``aisec-train: error:`` line, no traceback, and nothing in the run directory but ``.hydra/``, the log and the
run lock. The default run draws a fixed (derandomized) set of cases plus the named ones below; ``-m slow`` draws
many more at random. The cases at the end are gaps an earlier fuzzing run found, kept as regressions.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings

from tests.fuzzing import (
    BASE,
    bad_npz_bytes,
    bad_overrides,
    call_cli,
    huge_header,
    npz_bytes,
    refusal_problems,
    valid_arrays,
)

COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
FAST = settings(max_examples=12, derandomize=True, **COMMON)
SLOW = settings(max_examples=150, **COMMON)


class Cases:
    """A fresh run directory per case, and the count of cases tried."""

    def __init__(self, root: Path):
        self.root, self.count = root, itertools.count()
        self.tried = 0

    def refused(self, args: list[str]) -> None:
        self.tried += 1
        run_dir = self.root / f"run{next(self.count)}"
        problems = refusal_problems(run_dir, *call_cli([*BASE, *args, f"hydra.run.dir={run_dir}"]))
        assert not problems, (args, problems)

    def npz_refused(self, data: bytes, *extra: str) -> None:
        path = self.root / f"data{next(self.count)}.npz"
        path.write_bytes(data)
        self.refused(["dataset=npz", f"dataset.path={path}", *extra])


def _object_npz() -> bytes:
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros((8, 8)), [1, 2]]
    return npz_bytes({"x": ragged, "y": np.arange(2)})


def _overrides_property(cases: Cases, scratch: Path, config: settings):
    @config
    @given(bad_overrides(scratch))
    @example(["train.lr=nan"])
    @example(["privacy.target_epsilon=inf"])
    @example(["privacy.delta=0.5"])
    @example(["+zz_unknown=1"])
    @example(["privacy.accountant=zz"])
    def prop(args):
        cases.refused(args)

    return prop


def _npz_property(cases: Cases, config: settings):
    valid = valid_arrays()

    @config
    @given(bad_npz_bytes())
    @example(huge_header((10**6, 10**3, 10**3)))  # a tiny file whose header claims 10^12 float32 elements
    @example(_object_npz())
    @example(npz_bytes({"x": valid["x"].astype(np.complex64), "y": valid["y"]}))
    @example(npz_bytes({"x": valid["x"], "y": valid["y"] - 5}))
    @example(npz_bytes({"x": valid["x"], "y": valid["y"][:-3]}))
    @example(npz_bytes(valid)[:-40])
    def prop(data):
        cases.npz_refused(data)

    return prop


def test_bad_overrides_are_refused_in_one_line(tmp_path):
    cases = Cases(tmp_path)
    _overrides_property(cases, tmp_path, FAST)()
    assert cases.tried >= 12 + 5


def test_bad_npz_files_are_refused_in_one_line(tmp_path):
    cases = Cases(tmp_path)
    _npz_property(cases, FAST)()
    assert cases.tried >= 12 + 6


def test_declared_size_is_refused_before_reading(tmp_path):
    """A header declaring more than dataset.max_bytes is refused by its size, before a byte of data is read."""
    code, err, crash = call_cli([*BASE, "dataset=npz", f"dataset.path={_write(tmp_path, npz_bytes(valid_arrays()))}",
                                 "dataset.max_bytes=1000", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 2 and not crash and "over dataset.max_bytes=1000" in err, err


def _write(folder: Path, data: bytes) -> Path:
    path = folder / "data.npz"
    path.write_bytes(data)
    return path


@pytest.mark.slow
def test_many_bad_overrides_are_refused_in_one_line(tmp_path):
    cases = Cases(tmp_path)
    _overrides_property(cases, tmp_path, SLOW)()
    assert cases.tried >= 150


@pytest.mark.slow
def test_many_bad_npz_files_are_refused_in_one_line(tmp_path):
    cases = Cases(tmp_path)
    _npz_property(cases, SLOW)()
    assert cases.tried >= 150


# ---- gaps the fuzzing found, now refused ------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.seed=-1", f"train.seed={2**70}", "dataset.split_seed=-1"])
def test_out_of_range_seeds_are_refused(tmp_path, override):
    Cases(tmp_path).refused([override])


def test_a_one_sample_npz_is_refused(tmp_path):
    valid = valid_arrays()
    Cases(tmp_path).npz_refused(npz_bytes({"x": valid["x"][:1], "y": valid["y"][:1]}))


def test_a_vanishing_noise_multiplier_is_refused(tmp_path):
    Cases(tmp_path).refused(["privacy.noise_multiplier=1e-300"])


def test_an_npy_header_numpy_cannot_tokenize_is_refused(tmp_path):
    """A flipped byte in an .npy header (``'fortran_order'[ False``) made numpy's header parser raise
    tokenize.TokenError, which escaped as a traceback (found by the slow fuzzing run)."""
    data = npz_bytes(valid_arrays())
    assert data.count(b"'fortran_order': False") == 2
    Cases(tmp_path).npz_refused(data.replace(b"'fortran_order': False", b"'fortran_order'[ False", 1))
