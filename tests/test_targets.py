"""Every ``_target_`` is resolved and checked for its slot before anything is called (allow-by-type).

A target that would print, write, truncate or delete is refused in one line naming the slot and what it accepts,
exit 2, and is never called: the victim files below survive byte for byte. A module in the current directory is
importable for a ``_target_`` as under ``python -m``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aisec_train.components import builds, check_target
from aisec_train.errors import ConfigError
from tests.fuzzing import BASE, call_cli

SLOT_WORDS = {
    "model": "model accepts a torch.nn.Module subclass",
    "optimizer": "optimizer accepts a torch.optim.Optimizer subclass",
    "scheduler": "scheduler accepts a torch.optim.lr_scheduler.LRScheduler subclass",
    "dataset.train": "dataset.train accepts a torch.utils.data.Dataset subclass",
    "hydra.callbacks.evil": "hydra.callbacks.evil accepts a hydra.experimental.callback.Callback subclass",
}


def _cases(victim: Path, folder: Path) -> list[tuple[str, list[str]]]:
    return [
        ("model", ["model._target_=builtins.print", "+model.sep=PRINTED"]),
        ("model", ["model._target_=builtins.open", f"+model.file={victim}", "+model.mode=w"]),
        ("model", ["model._target_=pathlib.Path.unlink", f"+model.self={victim}"]),
        (
            "dataset.train",
            ["dataset=custom", "dataset.train._target_=pathlib.Path.unlink", f"+dataset.train.self={victim}"],
        ),  # fmt: skip
        ("optimizer", ["optimizer._target_=os.remove", f"+optimizer.path={victim}"]),
        ("scheduler", ["scheduler=cosine", "scheduler._target_=shutil.rmtree", f"+scheduler.path={folder}"]),
        (
            "hydra.callbacks.evil",
            ["+hydra.callbacks.evil._target_=pathlib.Path.unlink", f"+hydra.callbacks.evil.self={victim}"],
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("index", range(7))
def test_a_target_that_would_write_or_delete_is_refused_and_never_called(tmp_path, index):
    victim, folder = tmp_path / "ledger.jsonl", tmp_path / "precious"
    victim.write_text("budget spent\n")
    folder.mkdir()
    (folder / "anchor").write_text("a\n")
    slot, args = _cases(victim, folder)[index]
    code, err, crash = call_cli([*BASE, *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert not crash and code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err, crash)
    assert SLOT_WORDS[slot] in err and "is not allowed" in err, err
    assert victim.read_text() == "budget spent\n" and (folder / "anchor").read_text() == "a\n"


@pytest.mark.parametrize(
    "node, message",
    [
        ({"_target_": "aisec_train.models.SmallCNN", "x": {"_target_": "pathlib.Path.unlink"}}, "model.x._target_"),
        ({"_target_": "aisec_train.models.SmallCNN", "_partial_": True}, "model._partial_ is not allowed"),
        ({"_target_": "aisec_train.models.SmallCNN", "_args_": ["/etc/passwd"]}, "model._args_ is not allowed"),
        ({"_target_": "os.system"}, "model accepts"),
        ({"_target_": "tests.test_targets.unannotated"}, "model accepts"),
        ({"_target_": "tests.test_targets.annotated_wrong"}, "model accepts"),
    ],
)
def test_nested_reserved_and_unannotated_targets_are_refused(node, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_target(node, "model", supplied=("num_classes", "in_channels", "image_size", "input_shape"))


def unannotated(num_classes):  # noqa: ANN001, ANN201 - the point: no return annotation to trust
    return torch.nn.Linear(4, num_classes)


def annotated_wrong(num_classes: int) -> torch.optim.Optimizer:  # says it builds an optimizer, not a model
    raise AssertionError("never called")


def annotated_model(num_classes: int) -> torch.nn.Module:
    return torch.nn.Linear(4, num_classes)


def test_what_each_slot_allows():
    import torch.optim.lr_scheduler as sched

    assert builds(torch.nn.Linear, torch.nn.Module) and builds(annotated_model, torch.nn.Module)
    assert builds(torch.optim.AdamW, torch.optim.Optimizer) and builds(sched.OneCycleLR, sched.LRScheduler)
    assert builds(sched.ReduceLROnPlateau, sched.LRScheduler)
    assert not builds(print, torch.nn.Module) and not builds(Path.unlink, torch.nn.Module)
    assert not builds(os.remove, torch.nn.Module) and not builds(torch.optim.SGD, sched.LRScheduler)
    assert not builds(unannotated, torch.nn.Module) and not builds(annotated_wrong, torch.nn.Module)


def test_a_target_in_the_current_directory_is_importable(tmp_path):
    """The installed console script puts its own folder on sys.path, not the current directory: the CLI adds it,
    as ``python -m`` would. The argument error proves ``mynet.Net`` was imported and inspected."""
    (tmp_path / "mynet.py").write_text("from torch import nn\n\nclass Net(nn.Linear):\n    pass\n")
    script = Path(sys.executable).with_name("aisec-train")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(script), *BASE, "model._target_=mynet.Net", "+model.zz_bogus=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "model.zz_bogus=1 is not allowed: mynet.Net takes" in proc.stderr, proc.stderr
