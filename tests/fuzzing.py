"""Bad command lines and bad ``.npz`` files for the refusal contract of ``aisec-train`` (hypothesis strategies).

The contract: any bad input ends with exit status 2, exactly one stderr line starting ``aisec-train: error:``,
no traceback, and nothing in the run directory but Hydra's ``.hydra/``, the log and the run lock. The command
line runs in-process (Hydra's global state is cleared before each call), a few seconds per case instead of the
interpreter's start-up. Shared by tests/test_fuzz.py and scripts/figures/integrity.py.

    problems = refusal_problems(run_dir, *call_cli([*BASE, "train.lr=nan", f"hydra.run.dir={run_dir}"]))
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from torch.utils.data import Dataset

from tests.drills import screen_lines

BASE = ["experiment=smoke", "audit=off", "robustness.evaluate=false"]
LEFTOVERS = {".hydra", "cli.log", "__main__.log", ".aisec-train.lock"}  # what a refused run may leave
N_TRAIN = 1437  # the digits training split: privacy.delta must be below 1/n

# ---- the command line, in-process -------------------------------------------------------------------------------


def call_cli(args: list[str]) -> tuple[int | None, str, str]:
    """``aisec-train ARGS`` in this process: (exit status, stderr, traceback or ''). Status None: it raised."""
    from hydra.core.global_hydra import GlobalHydra

    from aisec_train import cli

    GlobalHydra.instance().clear()
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["aisec-train", *args]
    out, err, crash, code = io.StringIO(), io.StringIO(), "", None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            except BaseException:  # noqa: BLE001 - a traceback is exactly what the contract forbids
                crash = traceback.format_exc()
    finally:
        sys.argv = saved_argv
        os.environ.pop("HYDRA_FULL_ERROR", None)  # cli.main sets it for its own process
        if saved_env is not None:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        GlobalHydra.instance().clear()
    return code, err.getvalue(), crash


def refusal_problems(run_dir: Path, code: int | None, err: str, crash: str, *, config_only: bool = False) -> list[str]:
    """Everything that breaks the refusal contract ([] when the input was refused cleanly). ``config_only``: a bad
    config value, refused before Hydra makes the run folder, so not even Hydra's LEFTOVERS may be there."""
    problems = []
    if crash:
        problems.append(f"raised: {crash.strip().splitlines()[-1]}")
    if code != 2:
        problems.append(f"exit status {code}")
    lines = screen_lines(err)
    if len(lines) != 1 or not lines[0].startswith("aisec-train: error: "):
        problems.append(f"stderr is not one error line: {err.strip()[-400:]!r}")
    if "Traceback" in err:
        problems.append("Traceback on stderr")
    if config_only and run_dir.exists():
        problems.append(f"made the run directory {run_dir} for a bad config value")
    if run_dir.exists():
        extra = sorted(p.name for p in run_dir.iterdir() if p.name not in LEFTOVERS)
        if extra:
            problems.append(f"wrote {extra} into the run directory")
    return problems


# ---- bad overrides ----------------------------------------------------------------------------------------------
def _floats(low: float | None = None, high: float | None = None) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


_NONFINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
_NEGATIVE = _floats(high=-1e-9) | st.sampled_from([-1e300, -1.0])
_HUGE_INT = st.integers(2**64, 2**80)

# Values each numeric key's schema (or the 1/n rule) refuses: out of range, non-finite, negative, huge.
OUT_OF_RANGE: dict[str, st.SearchStrategy] = {
    "train.epochs": st.integers(-(10**6), 0),
    "train.batch_size": st.integers(-(10**6), 0),
    "train.max_physical_batch_size": st.integers(-100, 0),
    "train.lr": _NONFINITE | _NEGATIVE | st.just(0.0),
    "train.momentum": _NONFINITE | _NEGATIVE | _floats(1.0, 1e300),
    "train.weight_decay": _NONFINITE | _NEGATIVE,
    "train.ema_decay": _NONFINITE | _NEGATIVE | _floats(1.0, 1e9),
    "train.lock_wait_s": _NONFINITE | _NEGATIVE,
    "train.distributed.nproc": st.integers(-100, 0),
    "train.distributed.port": st.integers(-(10**6), -1) | st.integers(65536, 10**7),
    "privacy.target_epsilon": _NONFINITE | _NEGATIVE | st.just(0.0),
    "privacy.delta": _NONFINITE | _NEGATIVE | _floats(1.0 / N_TRAIN * 1.01, 1e300) | st.just(0.0),
    "privacy.max_grad_norm": _NONFINITE | _NEGATIVE | st.just(0.0),
    "privacy.noise_multiplier": _NONFINITE | _NEGATIVE | st.just(0.0),
    "dataset.test_fraction": _NONFINITE | _NEGATIVE | _floats(1.0, 1e300) | st.just(0.0),
    "dataset.outlier_z": _NONFINITE | _NEGATIVE | st.just(0.0),
    "dataset.sanity_samples": st.integers(-(10**6), 99),
    "dataset.workers": st.integers(-(10**6), -1),
    "dataset.max_bytes": st.integers(-(10**9), 0),
}
# Out of range too, but not refused yet (tests/test_fuzz.py holds them as strict xfails until they are).
PENDING: dict[str, st.SearchStrategy] = {
    "train.seed": st.integers(-(2**40), -1) | _HUGE_INT,
    "dataset.split_seed": st.integers(-(2**40), -1) | _HUGE_INT,
    "privacy.noise_multiplier": st.floats(1e-320, 1e-160),
}
ENUMS = {
    "privacy.mode": {"dpsgd", "none"},
    "privacy.accountant": {"prv", "rdp", "gdp"},
    "privacy.grad_sample_mode": {"bk", "ghost", "hooks"},
    "privacy.budget_scope": {"dataset", "run"},
    "train.device": {"auto", "cpu", "cuda"},
    "train.distributed.backend": {"auto", "gloo", "nccl"},
    "robustness.attack.norm": {"linf", "l2", "Linf", "L2"},
}
GROUPS = ("dataset", "model", "optimizer", "privacy", "robustness", "experiment", "audit", "scheduler")
SECTIONS = ("", "train.", "privacy.", "dataset.", "audit.", "robustness.", "model.", "optimizer.")
_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
_WORD = st.from_regex(r"[a-z][a-z_]{1,12}", fullmatch=True).filter(lambda s: s not in {"nan", "inf", "true", "null"})


def _number(value: float | int) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def out_of_range(draw) -> list[str]:
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    return [f"{key}={_number(draw(OUT_OF_RANGE[key]))}"]


@st.composite
def wrong_type(draw) -> list[str]:
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    value = draw(_WORD | st.sampled_from(["[1,2]", "{a:1}", "'3.5x'", "1e", "0x1G"]))
    return [f"{key}={value}"]


@st.composite
def bad_enum(draw) -> list[str]:
    key = draw(st.sampled_from(sorted(ENUMS)))
    value = draw(_WORD.filter(lambda v, k=key: v not in ENUMS[k]))
    return [f"{key}={value}"]


@st.composite
def unknown_key(draw) -> list[str]:
    section, name = draw(st.sampled_from(SECTIONS)), draw(_NAME)
    return [f"+{section}zz_{name}={draw(st.integers(0, 9))}"]  # zz_: never a real key or constructor argument


@st.composite
def bad_group(draw) -> list[str]:
    return [f"{draw(st.sampled_from(GROUPS))}=zz_{draw(_NAME)}"]


def bad_paths(scratch: Path) -> st.SearchStrategy[list[str]]:
    """Paths that do not exist, are directories, are not .npz, or lie under a regular file."""
    a_file = scratch / "plain.txt"
    a_file.write_text("not an npz\n")
    empty = scratch / "empty.npz"
    empty.write_bytes(b"")
    a_dir = scratch / "a_dir"
    a_dir.mkdir(exist_ok=True)
    missing = st.builds(lambda n: str(scratch / f"missing_{n}.npz"), _NAME)
    under_file = st.builds(lambda n: str(a_file / n / "registry.json"), _NAME)
    choices = st.one_of(
        st.builds(lambda p: ["dataset=npz", f"dataset.path={p}"], missing | st.sampled_from([str(a_dir), str(a_file),
                                                                                               str(empty)])),
        st.builds(lambda p: ["dataset=imagefolder", f"dataset.root={p}"], missing | st.sampled_from([str(a_file),
                                                                                                      str(a_dir)])),
        st.builds(lambda p: [f"audit.registry_path={p}"], under_file | st.just(str(a_dir))),
        st.builds(lambda p: [f"privacy.ledger_store={p}"], under_file | st.just(str(a_file))),
    )  # fmt: skip
    return choices


def bad_overrides(scratch: Path) -> st.SearchStrategy[list[str]]:
    return st.one_of(out_of_range(), wrong_type(), bad_enum(), unknown_key(), bad_group(), bad_paths(scratch))


# ---- bad .npz files ---------------------------------------------------------------------------------------------
def valid_arrays(n: int = 60) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"x": rng.random((n, 8, 8), dtype=np.float32), "y": np.arange(n, dtype=np.int64) % 3}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def huge_header(elements_shape: tuple[int, ...]) -> bytes:
    """A tiny .npz whose x.npy header declares ``elements_shape`` float32 elements (10^12 and more)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": elements_shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("x.npy", np.lib.format.magic(1, 0) + header.getvalue() + b"\0" * 64)
        y = io.BytesIO()
        np.save(y, np.zeros(10, np.int64))
        archive.writestr("y.npy", y.getvalue())
    return buf.getvalue()


@st.composite
def bad_arrays(draw) -> dict[str, np.ndarray]:
    """A readable .npz whose content breaks the contract: key names, dtypes, shapes, labels."""
    arrays = valid_arrays()
    n = len(arrays["y"])
    kind = draw(st.sampled_from(["keys", "x_dtype", "x_shape", "labels", "too_few"]))
    if kind == "keys":
        renamed = draw(st.sampled_from([("x", "X"), ("y", "labels"), ("x", "images"), ("y", None), ("x", None)]))
        value = arrays.pop(renamed[0])
        if renamed[1] is not None:
            arrays[renamed[1]] = value
    elif kind == "x_dtype":
        dtype = draw(st.sampled_from([np.bool_, np.complex64, np.complex128, np.int8, np.int16, np.int32, np.int64,
                                      np.uint16, np.uint32]))  # fmt: skip
        arrays["x"] = (arrays["x"] * 255).astype(dtype)
    elif kind == "x_shape":
        shape = draw(st.sampled_from([(n,), (n, 64), (n, 1, 1, 8, 8), (n, 1, 1, 1, 8, 8), (n, 0, 8), (n, 8, 0, 1)]))
        arrays["x"] = np.zeros(shape, np.float32)
    elif kind == "labels":
        how = draw(st.sampled_from(["negative", "float", "bool", "2d", "shorter", "longer", "complex"]))
        y = arrays["y"]
        k = draw(st.integers(1, 20))
        arrays["y"] = {
            "negative": np.where(np.arange(n) == draw(st.integers(0, n - 1)), -draw(st.integers(1, 10**9)), y),
            "float": y.astype(np.float64) + draw(st.sampled_from([0.0, 0.5])),
            "bool": y.astype(bool),
            "2d": np.stack([y, y], 1),
            "shorter": y[: max(0, n - k)],
            "longer": np.concatenate([y, y[:k]]),
            "complex": y.astype(np.complex64),
        }[how]
    else:
        m = draw(st.integers(0, 1))
        arrays = {"x": arrays["x"][:m], "y": arrays["y"][:m]}
    return arrays


def loads_cleanly(data: bytes) -> bool:
    """Whether ``data`` still reads as the valid arrays (a flipped timestamp byte leaves a valid archive)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
            x, y = loaded["x"], loaded["y"]
    except Exception:  # noqa: BLE001 - unreadable in any way: a bad file, as wanted
        return False
    good = valid_arrays()
    return x.dtype == good["x"].dtype and x.shape == good["x"].shape and y.dtype.kind in "iu" and y.shape == (60,)


@st.composite
def bad_npz_bytes(draw) -> bytes:
    """The bytes of a bad .npz: bad arrays, object arrays, a header declaring a huge array, or a damaged zip."""
    kind = draw(st.sampled_from(["arrays", "arrays", "object", "huge", "truncated", "flipped", "junk"]))
    if kind == "arrays":
        return npz_bytes(draw(bad_arrays()))
    if kind == "object":
        ragged = np.empty(3, dtype=object)
        ragged[:] = [np.zeros((8, 8)), np.zeros((4, 4)), [1, 2]]
        buf = io.BytesIO()
        np.savez(buf, x=ragged, y=np.arange(3))
        return buf.getvalue()
    if kind == "huge":
        return huge_header(draw(st.sampled_from([(10**6, 10**3, 10**3), (10**12, 1, 1), (10**4, 10**4, 10**4)])))
    good = npz_bytes(valid_arrays())
    if kind == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for pos in draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=8)):
            data[pos] ^= draw(st.integers(1, 255))
        assume(not loads_cleanly(bytes(data)))
        return bytes(data)
    return draw(st.binary(max_size=512))


# ---- numeric extremes of every config key -----------------------------------------------------------------------
FLOAT_EXTREMES = (5e-324, 1e-300, 1e-12, 1e12, 1e300, float("inf"), float("-inf"), float("nan"), -1.0, 0.0)
INT_EXTREMES = (0, -1, 2**31, 2**63, 10**30)


def numeric_keys() -> dict[str, str]:
    """Every int or float key of the typed config (``{"train.lr": "float", ...}``), read from the schema itself."""
    import dataclasses
    import typing

    from aisec_train.config import Config

    def walk(cls: type, prefix: str) -> typing.Iterator[tuple[str, str]]:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kinds = [a for a in (typing.get_args(hints[field.name]) or (hints[field.name],)) if a is not type(None)]
            if len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]):
                yield from walk(kinds[0], f"{prefix}{field.name}.")
            elif bool not in kinds and (float in kinds or int in kinds):
                yield f"{prefix}{field.name}", "float" if float in kinds else "int"

    return dict(walk(Config, ""))


def extremes(kind: str) -> tuple[float | int, ...]:
    return FLOAT_EXTREMES + INT_EXTREMES[3:] if kind == "float" else INT_EXTREMES + (1e300,)


def config_outcome(overrides: list[str]) -> str:
    """'accepted', 'refused' (one of the CLI's refusal types) or the traceback of anything else, from composing
    and type-checking the config (no training)."""
    import aisec_train
    from aisec_train.cli import refusals

    try:
        aisec_train.compose(overrides)
    except refusals():
        return "refused"
    except Exception:  # noqa: BLE001 - a traceback is what the contract forbids
        return traceback.format_exc()
    return "accepted"


# ---- malformed Dataset items through the Python API -------------------------------------------------------------
class Items(Dataset):
    """A map-style Dataset over a list of items, any kind (as a user's own class would return them)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        if isinstance(self.items[index], BaseException):
            raise self.items[index]
        return self.items[index]


def good_item(i: int) -> tuple:
    import torch

    return torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i)), i % 2


def _bad_item(kind: str, i: int):  # noqa: C901 - one branch per kind, a table would hide the values
    import torch
    from PIL import Image

    x, y = good_item(i)
    return {
        "dict item": {"image": x, "label": y},
        "string label": (x, "cat"),
        "3-tuple": (x, y, 0),
        "1-tuple": (x,),
        "float64 image": (x.double(), y),
        "float16 image": (x.half(), y),
        "uint8 image": ((x * 255).to(torch.uint8), y),
        "numpy image": (x.numpy(), y),
        "PIL image": (Image.new("L", (8, 8)), y),
        "None label": (x, None),
        "negative label": (x, -3),
        "label 10**9": (x, 10**9),
        "float label": (x, 1.0),
        "bool label": (x, True),
        "label tensor of 2": (x, torch.tensor([0, 1])),
        "2-d image": (x[0], y),
        "4-d image": (x[None], y),
        "empty image": (torch.zeros(1, 0, 8), y),
        "NaN pixel": (x.masked_fill(torch.arange(64).view(1, 8, 8) == 5, float("nan")), y),
        "inf pixel": (x.masked_fill(torch.arange(64).view(1, 8, 8) == 7, float("inf")), y),
        "other shape": (torch.rand(1, 9, 8), y),
        "None item": None,
        "string item": "x.png",
        "getitem raises": KeyError(i),
    }[kind]


MALFORMED_KINDS = (
    "dict item", "string label", "3-tuple", "1-tuple", "float64 image", "float16 image", "uint8 image", "numpy image",
    "PIL image", "None label", "negative label", "label 10**9", "float label", "bool label", "label tensor of 2",
    "2-d image", "4-d image", "empty image", "NaN pixel", "inf pixel", "other shape", "None item", "string item",
    "getitem raises",
)  # fmt: skip


def malformed_dataset(kind: str, n: int = 40, at: int = 0) -> Items:
    """``n`` good items with item ``at`` replaced by a malformed one of ``kind`` ('empty': no items at all)."""
    if kind == "empty":
        return Items([])
    items = [good_item(i) for i in range(n)]
    items[at] = _bad_item(kind, at)
    return Items(items)


API_CONFIG = [*BASE, "train.epochs=1", "train.batch_size=16"]


def api_outcome(entry: str, train, test=None, run_dir: Path | None = None) -> str:
    """'accepted', 'refused' (ConfigError / DataError) or the traceback of anything else, from ``aisec_train.run``
    (``entry='run'``) or ``aisec_train.fit`` on a DataLoader (``entry='train'``)."""
    import torch

    import aisec_train
    from aisec_train.data.errors import DataError
    from aisec_train.errors import ConfigError

    try:
        if entry == "run":
            aisec_train.run(API_CONFIG, train_dataset=train, test_dataset=test, run_dir=run_dir)
        else:
            loader = torch.utils.data.DataLoader(train, batch_size=16)
            aisec_train.fit(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), loader,
                              [*API_CONFIG, "privacy=none"], eval_dataset=test)  # fmt: skip
    except (ConfigError, DataError) as err:
        return "refused" if "\n" not in str(err) else f"multi-line refusal: {err}"
    except Exception:  # noqa: BLE001 - a traceback is what the contract forbids
        return traceback.format_exc()
    return "accepted"
