"""Config as an attack surface, and the Python API's refusals against the command line's.

Code runs only from what the user's own command line (or Python call) names: nothing read back from a run folder
(a pickle, ``.hydra/config.yaml``, ``report.json``, ``federated/job.json``), a checkpoint or a model folder is
instantiated or unpickled. ``aisec_train.compose`` / ``run`` / ``fit`` refuse what the CLI refuses, in the same one
line, and a refused ``run`` leaves nothing on disk. The payloads are harmless: they create a marker file.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

import aisec_train
from aisec_train.errors import ConfigError, Refusal


class Marker:
    """Unpickled, it creates ``path`` (what a hostile pickle's code would do, minus the harm)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("aisec-train: error: "), lines
    return lines[0].removeprefix("aisec-train: error: ")


# ---- A. nothing read back from a run folder is run -------------------------------------------------------------


def test_experimental_rerun_is_refused_before_hydra_unpickles_the_file(tmp_path):
    """Hydra's --experimental-rerun pickle.loads a run folder's .hydra/config.pickle: whoever could write the
    folder chose the code. Refused in one line, before Hydra reads it (abbreviated and = forms too)."""
    marker = tmp_path / "ran"
    planted = tmp_path / "run" / ".hydra" / "config.pickle"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(pickle.dumps(Marker(marker)))
    for argv in (["--experimental-rerun", str(planted)], [f"--experimental-rerun={planted}"], ["--exp", str(planted)]):
        line = _error_line(run_cli(*argv, cwd=tmp_path, timeout=120))
        assert line.startswith("--experimental-rerun ") and "same hydra.run.dir" in line
        assert not marker.exists(), f"{argv}: the planted pickle ran"


def test_an_unimportable_target_is_one_line_with_its_reason_once(caplog):
    """hydra.utils.get_object logged three ERROR lines before raising, and the chained cause was printed again after
    the refusal's own words: four lines on stderr, the reason twice."""
    from aisec_train import cli
    from aisec_train.components import check_target
    from aisec_train.preflight import check_hydra_targets

    refusals = []
    with caplog.at_level(logging.DEBUG):
        for key, call in (
            ("model._target_", lambda: check_target({"_target_": "no_such_pkg.nets.Net"}, "model")),
            ("hydra.callbacks.x._target_", lambda: check_hydra_targets(["+hydra.callbacks.x._target_=no_such_pkg.Cb"])),
        ):
            with pytest.raises(ConfigError) as err:
                call()
            refusals.append((key, cli.message(err.value)))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for key, line in refusals:
        assert line.startswith(f"{key}='no_such_pkg.") and "cannot be imported" in line, line
        assert line.count("No module named") == 1, line


@pytest.mark.slow
def test_an_unimportable_target_is_one_line_on_the_command_line(tmp_path):
    line = _error_line(
        run_cli("model._target_=no_such_pkg.nets.Net", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    )
    assert line.count("No module named") == 1 and not (tmp_path / "run").exists()


def _hf_folder(folder: Path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    config = transformers.BertConfig(vocab_size=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=8, max_position_embeddings=8, num_labels=2)  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_a_model_folder_runs_none_of_its_code_and_unpickles_no_objects(tmp_path):
    """model=hf: a folder's own Python (auto_map) never runs (trust_remote_code stays off), and a pickled
    pytorch_model.bin is loaded weights-only: refused in one ConfigError line, its code never run."""
    from aisec_train.models.hf import hf_model

    marker = tmp_path / "ran"
    remote = tmp_path / "remote"
    _hf_folder(remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil-arch", auto_map={"AutoConfig": "evil.Config",
                                                    "AutoModelForSequenceClassification": "evil.Model"})  # fmt: skip
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import BertConfig as Config\n")
    with pytest.raises(ConfigError) as err:
        hf_model(str(remote), num_classes=2)
    assert "\n" not in str(err.value) and not marker.exists()

    pickled = tmp_path / "pickled"
    _hf_folder(pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": Marker(marker)}, pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="holds Python objects besides tensors") as err:
        hf_model(str(pickled), num_classes=2)
    assert "\n" not in str(err.value) and not marker.exists()


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
            yield node


def test_every_load_in_the_package_is_weights_only_and_every_hub_load_trusts_no_remote_code():
    """A source check: torch.load always with weights_only=True, from_pretrained always with an explicit
    trust_remote_code (off unless the user's own config says otherwise), pickle.load(s) only in the two places that
    read what this process (or its launcher) wrote moments ago."""
    pickles = set()
    for path in sorted((REPO / "aisec_train").rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(REPO))
        for call in _calls(tree, "torch.load"):
            given = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert given.get("weights_only") == "True", f"{where}:{call.lineno}: torch.load without weights_only=True"
        for call in _calls(tree, ".from_pretrained"):
            assert "trust_remote_code" in {k.arg for k in call.keywords}, f"{where}:{call.lineno}"
        pickles |= {where for name in ("pickle.load", "pickle.loads") for _ in _calls(tree, name)}
    assert pickles == {"aisec_train/train/distributed.py", "aisec_train/tracking/sidecar.py"}


def test_a_resumed_deployment_refuses_code_planted_in_its_flower_app_folder(tmp_path):
    """flwr run packs every .py/.toml/.json file of the app folder into the app it ships, and the ServerApp and each
    SuperNode's ClientApp import from it first: a planted aisec_train/federated/client_app.py in a resumed run's
    federated/aisecfed/ ran instead of the installed package, on every client. Refused before it is shipped."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from aisec_train.federated.deploy import write_app
    from aisec_train.federated.settings import ServerSettings
    from aisec_train.store.errors import IntegrityError

    app = tmp_path / "run" / "federated" / "aisecfed"
    write_app(app, ServerSettings(job="job.json", state_dir="server"))  # a first run: our pyproject.toml only
    assert [n for n in zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist() if n[0] != "."] == [
        "pyproject.toml"
    ]
    planted = app / "aisec_train" / "federated" / "client_app.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("open('marker', 'w')\napp = None\n")
    shipped = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert "aisec_train/federated/client_app.py" in shipped  # what flwr run would send the SuperNodes
    with pytest.raises(IntegrityError, match="holds aisec_train: aisec-train writes only pyproject.toml") as err:
        write_app(app, ServerSettings(job="job.json", state_dir="server"))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_resumed_run_folder_names_no_target_that_is_built(tmp_path, monkeypatch):
    """A run folder another party can write: a .hydra/config.yaml, report.json and federated/job.json naming a
    model whose constructor leaves a marker. Resuming the run (the CLI), monitoring it and registering it build the
    model the command line, or model.pt's keyed tag, names; never the planted one."""
    from aisec_train.audit import monitor
    from aisec_train.audit.registry import Registry

    marker = tmp_path / "ran"
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "planted_net.py").write_text(
        textwrap.dedent(f"""
        from torch import nn

        class Net(nn.Module):
            def __init__(self, **kwargs):
                open({str(marker)!r}, "w")
                super().__init__()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path / "plant"))
    env = {"PYTHONPATH": str(tmp_path / "plant")}
    run = tmp_path / "run"
    small = ["experiment=smoke", "privacy=none", "audit=off", f"hydra.run.dir={run}"]
    first = run_cli(*small, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    planted = {"_target_": "planted_net.Net"}

    def plant():
        (run / ".hydra" / "config.yaml").write_text(f"model:\n  _target_: {planted['_target_']}\n")
        report = json.loads((run / "report.json").read_text())
        report["model"] = {**report.get("model", {}), **planted, "spec": planted}
        (run / "report.json").write_text(json.dumps(report))
        (run / "federated").mkdir(exist_ok=True)
        (run / "federated" / "job.json").write_text(json.dumps({"config": {"model": planted}, "manifest_sha256": ""}))

    plant()
    again = run_cli(*small, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    plant()
    monitor.load_run(run)
    with contextlib.suppress(Refusal):  # it may refuse the edited report: what matters is what it built
        Registry(tmp_path / "registry.json").register(run)
    assert not marker.exists()
    from aisec_train.components import build

    build(dict(planted), "model")  # the payload is live: built, it leaves the marker
    assert marker.exists()


# ---- B. the Python API refuses what the command line refuses, in the same line -----------------------------------

CLI_REFUSALS = [
    ["dataset.channels_last=2"],  # a bool key: OmegaConf would read any nonzero number as true
    ["dataset=npz", "dataset.path=data.npz", "dataset.channels_last=-1"],  # ... where the key is read
    ["train.epochs=0"],  # a range
    ["+train.no_such_key=1"],  # an unknown key
    ["model=no_such_model"],  # an unknown group option
    ["privacy=1"],  # a group given a non-name
    ["train.epochs=1,2"],  # a sweep without -m
]


@pytest.mark.parametrize("overrides", CLI_REFUSALS, ids=lambda o: " ".join(o))
def test_compose_run_and_fit_refuse_what_the_cli_refuses_in_its_words(overrides, tmp_path):
    (tmp_path / "data.npz").write_bytes(b"")  # exists: only the override is wrong
    line = _error_line(run_cli(*overrides, f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path, timeout=120))
    for call in (
        lambda: aisec_train.compose(overrides),
        lambda: aisec_train.run(overrides, run_dir=tmp_path / "api" / "run"),
        lambda: aisec_train.fit(torch.nn.Linear(2, 2), torch.utils.data.DataLoader([]), overrides),
    ):
        with pytest.raises(ConfigError) as err:
            with monkeypatch_cwd(tmp_path):
                call()
        assert str(err.value) == line.replace("\\'", "'")  # the CLI line escapes quotes in one Hydra message
    assert not (tmp_path / "cli").exists() and not (tmp_path / "api").exists()


@contextlib.contextmanager
def monkeypatch_cwd(path: Path):
    import os

    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.mark.parametrize(
    "override, instead",
    [
        ("hydra.run.dir=elsewhere", "run_dir="),
        ("hydra.sweep.dir=sweeps", "-m/--multirun"),
        ("hydra/launcher=local", "-m/--multirun"),
        ("hydra.job.chdir=true", "aisec-train command only"),
        ("+hydra.callbacks.mine._target_=aisec_train.sweep.SweepSummary", "aisec-train command only"),
    ],
)
def test_compose_refuses_hydra_settings_the_api_would_ignore(override, instead, tmp_path):
    """compose returns the job's config: Hydra's run folder, launcher, sweeps and callbacks used to be dropped
    without a word (the run written to outputs/api/..., the sweep never launched)."""
    with pytest.raises(ConfigError) as err:
        aisec_train.compose([override])
    assert str(err.value).startswith(f"{override} is not allowed with the Python API: ") and instead in str(err.value)
    with pytest.raises(ConfigError):
        aisec_train.run([override, "train.epochs=1"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = aisec_train.compose(["hydra.searchpath=[pkg://aisec_train.configs]", "train.epochs=2"])  # still composes
    assert cfg.train.epochs == 2


def test_a_refused_run_leaves_no_folder_or_lock_behind(tmp_path):
    """run made its folder (and parents) before the preflight, and a missing data file was refused by the data
    stage after the run's lock file was written; the CLI refuses both before Hydra makes the folder."""
    run_dir = tmp_path / "a" / "b"
    cases = [
        (["optimizer._target_=builtins.print"], "optimizer._target_='builtins.print' is not allowed"),
        (["dataset=npz", f"dataset.path={tmp_path / 'missing.npz'}"], "does not exist or is not a file"),
    ]
    for overrides, words in cases:
        with pytest.raises(ConfigError, match=words):
            aisec_train.run(overrides, run_dir=run_dir)
        assert not (tmp_path / "a").exists(), overrides
    with pytest.raises(ConfigError, match="test_dataset is not allowed without train_dataset"):
        aisec_train.run(["train.epochs=1"], test_dataset=[(torch.zeros(1, 8, 8), 0)], run_dir=run_dir)
    assert not (tmp_path / "a").exists()


def test_a_config_edited_after_compose_is_checked_again_on_a_copy(tmp_path):
    """A Config is a plain dataclass: edited after compose, it reached training unchecked (batch size -5: torch's
    traceback once the run had started; epochs 0: a refusal blaming the target epsilon)."""
    loader = torch.utils.data.DataLoader([(torch.zeros(1, 8, 8), 0)] * 4, batch_size=2)
    for key, value, words in (
        ("epochs", 0, "train.epochs=0 is not allowed: must be >= 1"),
        ("batch_size", -5, "train.batch_size=-5 is not allowed: must be >= 1"),
        ("batch_size", "x", "Value 'x' of type 'str' could not be converted to Integer"),
    ):
        cfg = aisec_train.compose(["privacy=none", "audit=off"])
        setattr(cfg.train, key, value)
        for call in (
            lambda cfg=cfg: aisec_train.run(cfg, run_dir=tmp_path / "run"),
            lambda cfg=cfg: aisec_train.fit(
                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), loader, cfg
            ),
        ):
            with pytest.raises(ConfigError) as err:
                call()
            assert str(err.value).startswith(words) and "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "run").exists()


def test_an_override_without_a_key_is_named_as_such():
    """'=1' parses with an empty key, which named the config folder itself as a group: 'config group takes one of
    config'."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from aisec_train.cli import check_group_values

    for given in ("=1", "=a,b"):
        with pytest.raises(
            ConfigError, match=f"^{given} is not allowed: an override needs a key, e.g. train.epochs=10$"
        ):
            check_group_values(OverridesParser.create().parse_overrides([given]))
    with pytest.raises(ConfigError, match="^=1 is not allowed: an override needs a key"):
        aisec_train.compose(["=1"])
