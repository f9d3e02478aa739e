"""Output preflight: every folder a run writes is proved writable before the first step is charged.

A folder is probed for real (``os.access`` answers yes to root and knows nothing of read-only mounts, immutable
folders or quotas): a temp file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` inside a directory reached
without following a symlink, a byte is written and fsynced, and the file is unlinked. The folders: the run
directory, its ``checkpoints/``, the registry's folder and, under DP, the ledger store. A failure is one line
naming the setting that chose the folder; nothing has been trained or charged yet.

The command line also checks, before Hydra writes ``.hydra/`` into it, that the run directory (parsed with Hydra's
own override parser, so quoting cannot hide it) is no symlink, holds none where Hydra writes, and can be created.

    >>> probe_dir(Path("outputs/run"), "hydra.run.dir")   # ConfigError('hydra.run.dir: ... not writable ...')
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aisec_train.errors import ConfigError
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import _parent_dir, staged_file

# Errors from the disk or its permissions, not from our code: one line at any point of a run (aisec_train/cli.py).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO}
HYDRA_FILES = (".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "cli.log", "__main__.log")


def probe_dir(folder: Path, what: str, *, root: Path | None = None) -> None:
    """Create, fsync and unlink a temp file in ``folder`` (created if missing, below ``root`` without following a
    symlink); ConfigError naming ``what`` when any step fails."""
    folder = Path(os.path.abspath(folder))
    root = Path(os.path.abspath(root)) if root is not None else folder
    if root.is_symlink():
        raise ConfigError(f"{what}: {root} is a symlink; aisec-train never writes through one")
    name = f".aisec-train-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with _parent_dir(folder / name, root) as (dir_fd, leaf):
            with staged_file(dir_fd, leaf, perms=0o600) as (fh, tmp):  # the same create + write + fsync as a run's
                fh.write(b"\0")
            os.unlink(tmp, dir_fd=dir_fd)
    except IntegrityError as err:
        raise ConfigError(f"{what}: {err}") from None
    except OSError as err:
        raise ConfigError(
            f"{what}: {folder} is not writable ({err.strerror}); nothing was trained or charged. "
            "Choose a writable folder or fix its permissions"
        ) from None


def output_file(value: str) -> Path:
    """An argparse ``type`` for a script's ``--out FILE`` (benchmarks/, scripts/figures/): the file's folder is made
    and probed when the flags are read, so a folder that cannot be written is refused in one line, exit 2, before
    the work, not after a benchmark of half an hour. The file itself is written only at the end."""
    path = Path(value)
    problem = "it is a folder" if path.is_dir() else None
    if problem is None:
        try:
            probe_dir(path.parent, str(path.parent))
        except ConfigError as err:
            problem = str(err).split("; nothing was trained")[0].split(": ", 1)[-1]
    if problem is not None:
        print(f"{Path(sys.argv[0]).stem}: --out {value} is not allowed: {problem}; allowed: a file in a writable "
              "folder", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    return path


def check_outputs(cfg: Any, run_dir: Path) -> None:
    """Probe every folder the run will write, before any data is read or any step charged."""
    from aisec_train.audit.registry import Registry, RegistryError, resolve_registry_path
    from aisec_train.privacy import resolve_store_path
    from aisec_train.train.config import PrivacyMode

    private = cfg.privacy.mode is PrivacyMode.dpsgd
    # The store's path first: a refused one (relative) must leave no folder behind, the registry's included
    store = resolve_store_path(cfg.privacy.ledger_store) if private else None
    probe_dir(run_dir, "hydra.run.dir")
    check_key_file()  # before the registry: its entries are verified under this key, and would blame the registry
    checkpoints = run_dir / "checkpoints"
    if os.path.lexists(checkpoints):  # a new one is made in the probed run directory; a refused run leaves none
        probe_dir(checkpoints, f"{checkpoints} (the run's checkpoints)", root=run_dir)
    registry = resolve_registry_path(cfg.audit.registry_path)
    probe_dir(registry.parent, "audit.registry_path")
    try:  # a registry that would refuse this run's entry at the end (forged, another key) refuses it now
        Registry(registry).entries()
    except RegistryError as err:
        raise ConfigError(f"audit.registry_path: {err}; nothing was trained or charged") from None
    if store is not None:
        probe_dir(store, "privacy.ledger_store")


def check_state_paths() -> None:
    """The key file's and anchor folder's paths alone, before any folder is made: a relative one is refused here, not
    after the registry's folder (``outputs/`` by default) was created in the working directory."""
    from aisec_train.store.anchors import anchor_dir
    from aisec_train.store.keys import key_path

    try:
        key_path()
        anchor_dir()
    except IntegrityError as err:
        raise ConfigError(f"{err}; nothing was trained or charged") from None


def check_key_file() -> None:
    """The HMAC key every checkpoint, ledger record and registry entry is tagged under, loaded (or created) on its
    own: a refused key file (a symlink, group-readable...) is named as the setting that chose it."""
    from aisec_train.store.keys import KEY_ENV, current_key, verify_keys

    try:
        current_key()
        verify_keys()  # $AISEC_TRAIN_OLD_KEY_FILES too: a bad one is named here, not blamed on the registry
    except IntegrityError as err:  # the message names the file: the default path when $KEY_ENV is unset
        where = f"${KEY_ENV}: " if os.environ.get(KEY_ENV) and not str(err).startswith("$") else ""
        raise ConfigError(f"{where}{err}; nothing was trained or charged") from None


PRV_MIN_DELTA = 1e-12  # Opacus' PRV accountant raises below about this (its floating-point limit, measured)


def check_accountant_limits(privacy: Any) -> None:
    """Extremes the accountant cannot answer are refused before any work: a delta Opacus' PRV accountant cannot
    resolve (it raises 'Floating point errors will dominate' near 1e-13, or divides by zero, after the data is
    read), and a target epsilon above the store's ceiling (Opacus' noise search for 1e300 never ends)."""
    from aisec_train.privacy.ledger_rules import MAX_TARGET_EPSILON

    if getattr(privacy.mode, "value", privacy.mode) != "dpsgd":
        return
    if privacy.target_epsilon is not None and privacy.target_epsilon > MAX_TARGET_EPSILON:
        raise ConfigError(
            f"privacy.target_epsilon={privacy.target_epsilon!r} is not allowed: at most {MAX_TARGET_EPSILON:g} (a "
            "larger epsilon guarantees nothing; use privacy=none to train without DP)"
        )
    if getattr(privacy.accountant, "value", privacy.accountant) == "prv" and privacy.delta < PRV_MIN_DELTA:
        raise ConfigError(
            f"privacy.delta={privacy.delta!r} is not allowed with privacy.accountant=prv: it resolves delta down to "
            f"{PRV_MIN_DELTA:g}; use privacy.accountant=rdp (or gdp) for a smaller delta"
        )


MAX_PADDING = 256  # random-crop padding in pixels: more is a typo, and it would allocate (H + 2p) x (W + 2p) images


def check_resource_limits(cfg: Any) -> None:
    """Counts that would start processes or allocate without bound are refused before any work: the schema only
    asks them to be >= 0 or >= 1, and 2^31 DataLoader workers or data-parallel ranks would try to start them all."""
    most = max(8, 4 * (os.cpu_count() or 1))
    limits = [
        ("dataset.workers", cfg.dataset.workers, most, f"at most {most} (4 per CPU core)"),
        ("train.distributed.nproc", cfg.train.distributed.nproc, most, f"at most {most} (4 per CPU core)"),
        ("dataset.augment.random_crop_padding", cfg.dataset.augment.random_crop_padding, MAX_PADDING,
         f"at most {MAX_PADDING} pixels"),
        # torch's thread pool: 100000 threads fail after training (oneDNN cannot create a primitive, or a segfault)
        ("audit.cpu_threads", cfg.audit.cpu_threads, most, f"at most {most} (4 per CPU core; 0: as is)"),
    ]  # fmt: skip
    for key, value, limit, allowed in limits:
        if value > limit:
            raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
    check_synthetic_size(cfg.dataset)
    from aisec_train.federated.config import check_local_limits  # Ray actors, the CA bundle (federated/config.py)

    check_local_limits(cfg.federated)


def check_synthetic_size(dataset: Any) -> None:
    """``dataset=synthetic`` draws its images and class prototypes as float64 arrays: their size is bounded by
    ``dataset.max_bytes`` as an .npz's declared size is, instead of numpy failing to allocate after the run began."""
    if dataset.name != "synthetic":
        return
    pixels = dataset.channels * dataset.image_size**2
    needed = 8 * pixels * (dataset.n_samples + dataset.num_classes)
    if needed > dataset.max_bytes:
        values = ", ".join(
            f"dataset.{key}={getattr(dataset, key)}" for key in ("n_samples", "num_classes", "image_size", "channels")
        )
        raise ConfigError(
            f"{values} are not allowed together with dataset=synthetic: it would draw {needed:.3g} bytes of float64 "
            f"arrays (8 x channels x image_size^2 x (n_samples + num_classes)), over dataset.max_bytes="
            f"{dataset.max_bytes}; lower them, or raise dataset.max_bytes if this machine can hold them"
        )


FLOAT32_MAX = 3.4028234663852886e38


def _floats(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, float]]:
    """(key, its value, a float in it) for every float field of the typed config and every float in a list field
    (``dataset.normalize.mean``). The ``_target_`` nodes (model, optimizer, scheduler, a custom dataset) are left
    out: they are a constructor's arguments, where inf can mean something (``norm_type=inf``)."""
    import dataclasses

    for field in dataclasses.fields(node):
        key, value = f"{prefix}{field.name}", getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value, value
        elif isinstance(value, list):
            yield from ((key, value, item) for item in value if isinstance(item, float))


def check_finite(cfg: Any) -> None:
    """Every float setting is a finite number. No key takes inf for "no limit" (null says that: ``federated.lr``,
    ``robustness.eps``), and a range check such as ``> 0`` lets inf through and NaN fail with the wrong words: an
    inf lr or radius ran to the end, or failed after training and charging the budget, naming another key."""
    for key, value, number in _floats(cfg):
        if not math.isfinite(number):
            allowed = "must be finite numbers" if isinstance(value, list) else "must be a finite number"
            raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_float_range(cfg: Any) -> None:
    """A float setting beyond float32's range (train.lr=1e300) becomes inf in the first tensor it scales (a
    traceback from torch, or a silent inf): refused by name before any work, as a non-finite one is."""
    check_finite(cfg)
    for key, value, number in _floats(cfg):
        if abs(number) > FLOAT32_MAX:
            raise ConfigError(f"{key}={value!r} is not allowed: beyond float32's range ({FLOAT32_MAX:.3g})")


def check_limits(cfg: Any) -> None:
    """Every limit the schema's per-key ranges cannot express, before any data is read (pipeline and API)."""
    check_float_range(cfg)
    check_accountant_limits(cfg.privacy)
    check_resource_limits(cfg)


DATA_FILES = {"npz": ("path", "test_path"), "text": ("path", "test_path")}  # dataset.KEY: a file the source reads
DATA_FOLDERS = {name: ("root",) for name in ("imagefolder", "mnist", "fashion_mnist", "cifar10")}


def check_data_paths(dataset: Any) -> None:
    """The files and folders a dataset source will read exist (nothing is read): a multirun checks each job's before
    its first job trains, as a single run's data stage refuses them (the same words), so a missing file in the third
    job's sweep value no longer ends the sweep after two jobs trained and charged their budgets."""
    for key in (*DATA_FILES.get(dataset.name, ()), *DATA_FOLDERS.get(dataset.name, ())):
        value, folder = getattr(dataset, key), key == "root"
        if value is None or not str(value).strip():
            if key == "test_path":
                continue  # optional: a hold-out of dataset.test_fraction
            needs = "an existing folder" if folder else "a file path"
            raise ConfigError(f"dataset.{key}={value!r} is not allowed: dataset={dataset.name} needs {needs}")
        path = Path(str(value))  # as the sources open it (no ~ expansion there either)
        if not (path.is_dir() if folder else path.is_file()):
            what = "a folder" if folder else "a file"
            raise ConfigError(f"dataset.{key}={str(value)!r} does not exist or is not {what}")


def check_job_dirs(dirs: list[tuple[str, str, str]]) -> None:
    """A multirun's job folders, (job, sweep dir, subdir) as the launcher joins them: each inside the sweep folder,
    no symlink, and no two jobs in one folder (the second would resume the first's checkpoint as its own result,
    or be refused half-way through the sweep)."""
    seen: dict[str, str] = {}
    for job, sweep_dir, subdir in dirs:
        rel = os.path.normpath(subdir)
        if os.path.isabs(subdir) or rel == ".." or rel.startswith("../") or rel == ".":
            raise ConfigError(
                f"hydra.sweep.subdir={subdir!r} is not allowed ({job}): each job's folder must be a subfolder inside "
                "hydra.sweep.dir (the default ${hydra.job.num} numbers them)"
            )
        if rel in seen:
            raise ConfigError(
                f"hydra.sweep.subdir={subdir!r} is not allowed: {seen[rel]} and {job} would both write into "
                f"{Path(sweep_dir) / rel}, and the second would resume the first's run; give each job its own folder "
                "(e.g. the default ${hydra.job.num})"
            )
        seen[rel] = job
        folder = Path(sweep_dir).expanduser() / rel
        for path in (folder, *(folder / name for name in HYDRA_FILES)):
            if path.is_symlink():
                raise ConfigError(f"{path} is a symlink ({job}): aisec-train never writes through one; remove it")


# ---- the command line, before Hydra runs ------------------------------------------------------------------------


def parsed_overrides(argv: list[str]) -> list[Any]:
    """The overrides as Hydra will read them ([] if they do not parse: Hydra then refuses them in one line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = [a for a in argv if not a.startswith("-")]  # --multirun, --cfg ...: flags, not overrides
    try:
        return OverridesParser.create().parse_overrides(args)
    except HydraException:
        return []


def _resolve(value: str, key: str) -> Path:
    """``value`` with the interpolations Hydra resolves before the job (``${now:...}``, ``${oc.env:...}``)."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    setup_globals()
    try:
        resolved = OmegaConf.create({"v": value}).v
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{key}={value!r} is not allowed: it must resolve before Hydra writes into it ({err.__class__.__name__}); "
            "give a plain path"
        ) from None
    if not str(resolved).strip():  # Path("") is ".": the run's files would land in the launch folder itself
        raise ConfigError(f"{key}={value!r} is not allowed: an empty folder name; give the folder the run writes into")
    return Path(str(resolved)).expanduser()


def run_dirs(argv: list[str]) -> Iterator[tuple[str, Path]]:
    """(key, folder) for every ``hydra.run.dir`` / ``hydra.sweep.dir`` given, however quoted or forced, and the
    default one the job will write into when none is given (``outputs/DATE/TIME``, or ``multirun/...`` with -m):
    a symlinked ``outputs`` in the launch folder is refused as when it is named."""
    given = set()
    for override in parsed_overrides(argv):
        key = override.key_or_group
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            given.add(key)
            value = override.value()
            if isinstance(value, str) and not override.is_delete():
                yield key, _resolve(value, key)
            elif value is None:  # Hydra would write the job into a folder named "None" in the launch folder
                raise ConfigError(f"{key}=null is not allowed: give the folder the run writes into")
    key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in argv) else "hydra.run.dir"
    if key not in given:
        yield key, _resolve(_default_dir(key), key)


def _default_dir(key: str) -> str:
    """The primary config's ``hydra.run.dir`` or ``hydra.sweep.dir``, unresolved (``${now:...}``)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(OmegaConf.load(str(files("aisec_train.configs") / "config.yaml")), resolve=False)
    return str(conf["hydra"][key.split(".")[1]]["dir"])


def check_hydra_targets(argv: list[str]) -> None:
    """A ``_target_`` given under ``hydra.`` (callbacks, launcher, sweeper) is instantiated by Hydra itself, before
    our job: check it for its slot here, before Hydra can call it."""
    from aisec_train.components import check_kind, locate, slot_of

    for override in parsed_overrides(argv):
        key = override.key_or_group
        if not (key.startswith("hydra.") and key.endswith("_target_")):
            continue
        slot = key.rsplit(".", 1)[0]
        if slot_of(slot) != "hydra.callbacks":
            raise ConfigError(f"{key} is not allowed: only hydra.callbacks.NAME._target_ may be overridden")
        found = locate(str(override.value()), key)  # one line when it cannot be imported
        check_kind(found, slot, override.value())


def check_run_dir(key: str, run_dir: Path) -> None:
    """Before Hydra writes ``.hydra/`` and its log: no symlink where it writes, and the folder can be made."""
    for path in (run_dir, *(run_dir / name for name in HYDRA_FILES)):
        if path.is_symlink():
            raise ConfigError(f"{path} is a symlink: aisec-train never writes through one; remove it")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not stat.S_ISDIR(existing.stat().st_mode):
        raise ConfigError(f"{key}={str(run_dir)!r} is not allowed: {existing} is a file, not a folder")
    probe_dir(existing, key)  # the nearest folder that exists: Hydra creates the rest inside it


def ensure_cwd_importable() -> None:
    """``_target_``s in the current directory import as under ``python -m`` (the console script's sys.path holds
    the script's folder instead)."""
    here = os.getcwd()
    if not any(os.path.abspath(p or ".") == here for p in sys.path):
        sys.path.insert(0, here)


def cli_preflight(argv: list[str]) -> None:
    """Everything the command line checks before Hydra runs (ConfigError, one line)."""
    ensure_cwd_importable()
    check_hydra_targets(argv)
    for key, run_dir in run_dirs(argv):
        check_run_dir(key, run_dir)


def write_failure(err: OSError) -> str | None:
    """The one line for a disk or permission error met mid-run; None when ``err`` is not one."""
    if err.errno not in WRITE_ERRNOS:
        return None
    where = f" writing {err.filename}" if err.filename else ""
    return (
        f"{err.strerror}{where}: the run stopped; every file is either complete or absent (atomic writes) and the "
        "privacy budget holds only the steps that ran. Free space or fix permissions, then rerun to resume"
    )


def refuse_symlinks(run_dir: Path) -> None:
    """Before any work: a symlink anywhere in the run directory is refused (every file a run writes is created
    inside it, never through a link; the writers check again, this makes the refusal come first)."""
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink():
                raise IntegrityError(f"{path} is a symlink: aisec-train never writes through one; remove it")
