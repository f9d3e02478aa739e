"""The ``aisec-train`` console script: Hydra composes and type-checks the config, the pipeline runs.

Every refusal (bad override, bad data, tampered checkpoint, spent privacy budget) ends with one line on
stderr and exit status 2, before any work is lost; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from contextlib import nullcontext
from importlib.resources import files
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aisec_train import errors
from aisec_train.config import register_configs, to_config, unknown_key
from aisec_train.errors import ConfigError, Refusal
from aisec_train.tracking.config import logger_off

PROG = "aisec-train"
CONFIG_DIR = str(files("aisec_train.configs"))
log = logging.getLogger("aisec_train")


def refusals() -> tuple[type[BaseException], ...]:
    """The errors that mean "bad input", answered in one line with exit 2: every ``Refusal`` (each error class
    says it is one, aisec_train/errors.py), and Hydra's and OmegaConf's errors about the overrides. Matching the
    base class needs no heavy import: a bad override is refused in about a second, before torch and Opacus load."""
    return (Refusal, HydraException, OmegaConfBaseException)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _job(dict_cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = hydra_cfg.runtime.choices.get("experiment", "quickstart")
    try:
        cfg = to_config(dict_cfg)  # type and range checks first: no torch needed to refuse a bad value
        from aisec_train.pipeline import run_pipeline  # heavy imports only once the config is valid
        from aisec_train.privacy.engine import quiet_known_warnings
        from aisec_train.quiet import quiet_library_warnings

        quiet_known_warnings()
        quiet_library_warnings()  # numpy's divide-by-zero at sample rate 1: the summary says what it means
        with errors.stop_on_signals() if answers_signals(cfg) else nullcontext():
            report = run_pipeline(cfg, run_dir, experiment=experiment)
    except refusals() as err:
        refuse(err)  # inside the job, so Hydra adds no banner of its own
    except OSError as err:
        refuse_write(err)
    except errors.Stopped as err:  # Ctrl-C or a scheduler's SIGTERM: the steps taken are charged (train/loop.py)
        errors.stopped(PROG, err)
    from aisec_train.train.launch import env_rank

    if env_rank() != 0:  # a torchrun rank other than 0 only trained: rank 0 writes and prints the report
        return 0.0
    from aisec_train.report.summary import end_of_run

    print(end_of_run(report, run_dir))  # epsilon at delta, accuracy, failing items with their fixes, the files
    return float(report.get("metrics.clean_accuracy"))


def answers_signals(cfg) -> bool:
    """Whether this process turns SIGINT, SIGTERM and SIGHUP into one line after the steps taken are charged: a run
    in this process alone, or one rank of your own ``torchrun`` (its agent passes a scheduler's SIGTERM on to every
    rank, which would otherwise die with rank 0's steps since its last checkpoint uncharged). Not the job process of
    ``train.distributed.nproc`` (its ranks answer for themselves, train/distributed.py), nor a federated run
    (Flower's simulation owns its client processes), nor a submitit task: submitit ignores SIGTERM on purpose and
    requeues on its own signal (USR2 on SLURM) by raising SystemExit, which the training loop charges like any stop."""
    submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
    return cfg.train.distributed.nproc == 1 and cfg.federated.mode.value == "none" and not submitit


def message(err: BaseException) -> str:
    """An error and its cause as one readable line (Hydra's search-path dump and OmegaConf's key dump dropped)."""
    parts = [errors.one_line(err).split(" Config search path:")[0]]
    cause = err.__cause__
    said = errors.one_line(cause).split(" full_key:")[0] if cause is not None else ""
    if said and said not in parts[0]:  # a refusal that quotes its cause ("federated.ckks: {err}") says it once
        parts.append(said)
    return ": ".join(p for p in parts if p)


def refuse(err: BaseException) -> NoReturn:
    errors.refuse(PROG, message(err))


def refuse_write(err: OSError) -> NoReturn:
    """A disk or permission error is the environment's, not a bug: one line; anything else stays a traceback."""
    from aisec_train.preflight import write_failure

    line = write_failure(err)
    if line is None:
        raise err
    refuse(OSError(line))


def check_flags(argv: list[str]) -> argparse.Namespace | None:
    """Parse the flags with Hydra's own parser before Hydra does: an unknown flag or a bad choice is then one line
    (argparse prints its usage too). None for ``--version``, which the parser answers by printing and exiting."""
    from hydra._internal.utils import get_args_parser

    if any(len(a) > 2 and "--version".startswith(a) for a in argv):
        return None
    parser = get_args_parser()
    parser.error = lambda text: errors.refuse(PROG, text)  # type: ignore[method-assign] # a bad --cfg choice
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        flags = ", ".join(sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")}))
        errors.refuse(PROG, f"unknown flag {' '.join(unknown)}: allowed flags are {flags}; the rest are overrides")
    if extra:  # Hydra's parser reads one run of overrides: any after a flag and its value are left over
        errors.refuse(
            PROG, f"unrecognized arguments: {' '.join(extra)}: give all overrides together, before or after the flags"
        )
    if args.experimental_rerun is not None:  # Hydra would pickle.load it: code anyone who can write the file chose
        errors.refuse(
            PROG,
            f"--experimental-rerun {args.experimental_rerun} is not allowed: it unpickles the file (a pickle runs "
            "whatever code its writer chose) and skips every check; to resume a run, run aisec-train again with the "
            "same hydra.run.dir",
        )
    return args


def check_override_syntax(overrides: list[str]) -> None:
    """Each override alone through Hydra's parser: its grammar errors do not always name the override
    (``mismatched input '=' expecting <EOF>`` for ``"logger=csv logger.every_n_steps=0"`` quoted as one argument)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as err:
            said = errors.one_line(err).split(" See https://")[0].removeprefix(f"Error parsing override '{override}' ")
            raise ConfigError(
                f"override {override!r} is not allowed: {said}; allowed: one KEY=VALUE per argument in Hydra's "
                "override grammar (https://hydra.cc/docs/advanced/override_grammar/basic/)"
            ) from None


def group_options(group: str) -> list[str]:
    """The options of config group ``group``: its yaml files (``_``-prefixed ones are partials, not options)."""
    return sorted(p.stem for p in Path(CONFIG_DIR, group).glob("*.yaml") if not p.name.startswith("_"))


def packaged_only(args: argparse.Namespace) -> bool:
    """Whether the config groups are the packaged ones alone (no --config-path/--config-dir, no hydra.searchpath
    adding options of a user's own), so an option name the package lacks is unknown."""
    searchpath = any(o.lstrip("+~").startswith("hydra.searchpath") for o in args.overrides)
    return not (args.config_path or args.config_dir or searchpath)


def check_group_values(overrides: list[Any], known_options: bool = False) -> None:
    """A config group takes an option's name: Hydra raises a bare ValueError (a traceback) for ``train=null`` or
    ``privacy=1``, so refuse it here, naming the group's options. ``~train`` still removes a group."""
    for override in overrides:
        group = override.key_or_group
        if not group:  # "=1": Hydra parses an empty key, which would name the config folder itself as the group
            raise ConfigError(f"{override.input_line} is not allowed: an override needs a key, e.g. train.epochs=10")
        if override.is_delete() or override.is_sweep_override():
            continue  # a sweep's values are checked job by job (check_multirun)
        if "/" not in group and not Path(CONFIG_DIR, group).is_dir():
            continue  # a config key (train.lr=...), not a group
        options = group_options(group)
        allowed = f"one of {', '.join(options)}" if options else "an option's name"
        if not isinstance(override.value(), (str, list, dict)):
            raise ConfigError(f"{override.input_line} is not allowed: config group {group} takes {allowed}")
        # Hydra's own message for an unknown option also offers the `_`-prefixed partials (model=_finetune)
        packaged = known_options and "/" not in group and Path(CONFIG_DIR, group).is_dir()
        if packaged and isinstance(override.value(), str) and options and override.value() not in options:
            raise ConfigError(f"{override.input_line} is not allowed: config group {group} takes {allowed}")


MAX_SWEEP_CHECKS = 64  # configs composed and checked before a multirun starts (several per second)


def sweep_lists(overrides: list[Any]) -> list[list[str]]:
    """Each key's "key=value" strings, as Hydra's BasicSweeper.split_arguments builds them for its product (a
    later override of a key replaces an earlier one; a range or interval sweep is refused as it refuses it)."""
    from hydra.errors import HydraException

    lists: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            lists[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            lists[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(f"BasicSweeper does not support sweep type : {override.value_type.name}")
    return list(lists.values())


def sweep_jobs(lists: list[list[str]]) -> list[tuple[int, list[str]]]:
    """(Hydra's job number, overrides) of the jobs to check: all of them when there are at most MAX_SWEEP_CHECKS;
    beyond, each swept value once with the other keys at their first value, so a bad value is still refused
    before any work (a combination that fails only with another key's later value fails at its job, as before)."""
    total = 1
    for values in lists:
        total *= len(values)
    if total <= MAX_SWEEP_CHECKS:
        return list(enumerate(list(job) for job in itertools.product(*lists)))
    picked: dict[int, list[str]] = {}
    for axis, values in enumerate(lists):
        stride = 1
        for later in lists[axis + 1 :]:
            stride *= len(later)
        for index, value in enumerate(values):
            job = [v[0] for v in lists]
            job[axis] = value
            picked.setdefault(index * stride, job)  # its index in itertools.product, which Hydra numbers jobs by
    return sorted(picked.items())


def check_known_keys(overrides: list) -> None:
    """A typo'd key without ``+`` (``privacy.targt_epsilon=3``): Hydra advised adding it with ``+``, which is then
    refused in turn; name the keys allowed instead (``config.unknown_key``). The CLI and ``aisec_train.compose``."""
    for override in overrides:
        if override.package is None and not override.is_add() and not override.is_force_add():
            typo = unknown_key(override.key_or_group) if "." in override.key_or_group else None
            if typo is not None:
                raise typo


def check_job(
    args: argparse.Namespace, parser: Any, launcher: list[str], job: list[str], number: int | None
) -> tuple[tuple[str, str], Any]:
    """Compose one job's config as Hydra will and check it as the job checks its own (types and ranges, components
    and limits, that its data files exist; no data is read). Returns multirun job ``number``'s (sweep dir, subdir)
    and the checked config."""
    from hydra import compose
    from omegaconf import open_dict

    check_group_values(parser.parse_overrides(job), packaged_only(args))
    check_known_keys(parser.parse_overrides(job))
    try:
        full = compose(config_name=args.config_name or "config", overrides=[*launcher, *job], return_hydra_config=True)
    except (AssertionError, AttributeError) as err:  # OmegaConf on a logger that is off (its node null): a bare
        # assert for logger.csv.path=x, an AttributeError on None for logger.csv={...}
        raise logger_off(parser.parse_overrides(job)) or err from None
    check_bool_values(parser.parse_overrides(job), full)
    folders = ("", "")
    if number is not None:
        with open_dict(full):  # as Hydra's launchers number a job before its folder is joined
            full.hydra.job.num, full.hydra.job.id = number, f"{PROG}_{number}"
        folders = (str(full.hydra.sweep.dir), str(full.hydra.sweep.subdir))
    with open_dict(full):
        full.pop("hydra")
    cfg = to_config(full)  # a bad value is refused before torch loads
    from aisec_train.pipeline import preflight
    from aisec_train.preflight import check_data_paths
    from aisec_train.run_state import UserObjects

    preflight(cfg, UserObjects())
    check_data_paths(cfg.dataset)  # the files a job reads exist: no data is read yet
    return folders, cfg


def check_bool_values(overrides: list[Any], full: Any) -> None:
    """A bool setting takes true or false (null where it may be unset; on/off, yes/no and 1/0 as ever): OmegaConf
    turns any nonzero number into true, so `dataset.channels_last=2` trained as `true`. Checked on the parsed
    override, before that conversion."""
    from omegaconf import BooleanNode

    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or override.is_sweep_override() or "." not in key:
            continue
        parent_key, _, child = key.rpartition(".")
        parent = OmegaConf.select(full, parent_key, throw_on_missing=False)
        node = parent._get_node(child) if isinstance(parent, DictConfig) else None
        value = override.value()
        if isinstance(node, BooleanNode) and not _bool_word(value):
            raise ConfigError(f"{override.input_line} is not allowed: {key} takes true or false (or on/off, 1/0)")


def _bool_word(value: Any) -> bool:
    """true/false, null, and the words YAML and OmegaConf have always read as bools (on/off, yes/no, 1/0)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return value in (0, 1)
    return isinstance(value, str) and value.strip().lower() in {"on", "off", "yes", "no", "true", "false"}


def shared_budget_note(jobs: list[tuple[str, Any]]) -> str | None:
    """A note (not a refusal) when several DP jobs of a sweep charge one dataset's budget: whether the later ones
    fit depends on the ledger and on what the earlier ones spend, which only training tells (docs/cluster.md)."""
    from aisec_train.train.config import BudgetScope, PrivacyMode

    groups: dict[str, list[str]] = {}
    for where, cfg in jobs:
        privacy = cfg.privacy
        if (
            privacy.mode is PrivacyMode.dpsgd
            and privacy.budget_scope is BudgetScope.dataset
            and not privacy.fit_to_budget
            and privacy.ledger_store != "scratch"  # each scratch run has a store of its own
        ):
            groups.setdefault(repr(cfg.dataset), []).append(where)
    shared = next((wheres for wheres in groups.values() if len(wheres) > 1), None)
    if shared is None:
        return None
    return (
        f"{PROG}: note: {shared[0]} and {len(shared) - 1} later job(s) are DP runs charged to one dataset's privacy "
        "budget (privacy.budget_scope=dataset): a later job is refused, after the earlier ones trained, when what is "
        "left cannot hold it. To compare settings on one dataset, sweep with privacy.budget_scope=run "
        "privacy.budget_reason='...' or privacy.fit_to_budget=true (docs/cluster.md)"
    )


def check_run(args: argparse.Namespace) -> None:
    """A single run's config, checked before Hydra writes ``.hydra/`` and ``cli.log`` into the run folder, so a
    refused run leaves nothing behind (the job checks it again, for the Python API and other config folders)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=PROG):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        if any(o.is_sweep_override() for o in parser.parse_overrides(args.overrides)):
            return  # Hydra refuses a sweep without -m itself, before it writes anything
        check_job(args, parser, [], list(args.overrides), None)


def check_multirun(args: argparse.Namespace) -> None:
    """Expand the sweep as Hydra's basic sweeper will and check each job's config as a single run checks its own
    before any work (``check_job``), and that each job has a folder of its own inside the sweep folder, so one bad
    value refuses the whole sweep before the first job trains or charges a ledger."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from aisec_train.preflight import check_job_dirs

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=PROG):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())  # for glob() sweeps
        overrides = parser.parse_overrides(args.overrides)
        for override in overrides:  # Hydra ignores it in a multirun: the jobs went to the default multirun/DATE/
            if override.key_or_group == "hydra.run.dir" and not override.is_delete():
                raise ConfigError(
                    f"{override.input_line} is not allowed with -m/--multirun: a sweep's jobs are written under "
                    "hydra.sweep.dir (one subfolder per job); give hydra.sweep.dir=... instead"
                )
        # hydra.* settings are the launcher's, not a job's (Hydra keeps them apart from the swept overrides too)
        lists = sweep_lists([o for o in overrides if not o.key_or_group.startswith("hydra")])
        launcher = [o.input_line for o in overrides if o.key_or_group.startswith("hydra") and not o.is_sweep_override()]
        dirs, checked = [], []
        for number, job in sweep_jobs(lists):
            swept = " ".join(value for value, values in zip(job, lists, strict=True) if len(values) > 1)
            where = f"multirun job {number}" + (f" ({swept})" if swept else "")
            try:
                (sweep_dir, subdir), cfg = check_job(args, parser, launcher, job, number)
            except refusals() as err:
                raise ConfigError(f"{where} is refused, so no job ran: {message(err)}") from None
            dirs.append((where, sweep_dir, subdir))
            checked.append((where, cfg))
        check_job_dirs(dirs)  # one folder per job, inside the sweep folder
    note = shared_budget_note(checked)
    if note is not None:
        print(note, file=sys.stderr)


def main() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from aisec_train.preflight import cli_preflight
    from aisec_train.train.launch import cli_overrides

    args = check_flags(sys.argv[1:])  # Hydra's flags, one line for an unknown one
    register_configs()
    try:  # before Hydra writes .hydra/ into the run directory or instantiates a callback
        sys.argv += cli_overrides(sys.argv[1:])  # under torchrun: the shared run directory (train/launch.py)
        if args is not None:
            check_override_syntax(args.overrides)
        cli_preflight(sys.argv[1:])
        if args is not None:
            check_group_values(OverridesParser.create().parse_overrides(args.overrides), packaged_only(args))
        shows = args is None or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
        # another config folder: its groups are Hydra's to compose; only the packaged one is checked ahead
        if args is not None and not shows and not (args.config_path or args.config_dir):
            check_multirun(args) if args.multirun else check_run(args)
    except refusals() as err:
        refuse(err)
    # Hydra prints its own multi-line report of errors unless asked to re-raise; we re-raise and print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _job()
    except refusals() as err:
        refuse(err)
    except OSError as err:  # a full disk or a folder made read-only mid-run (Hydra's own writes included)
        refuse_write(err)


if __name__ == "__main__":
    main()
