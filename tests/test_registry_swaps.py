"""The registry verifies what it registers: a model copied in from another run, a swapped or edited report, a
swapped tag, ... are all refused (tests/swaps.py builds each with the real writers); an honest resume updates the
run's entry instead of flagging it, and a model the budget stopped early is never offered as known-good."""

from __future__ import annotations

import pytest

from aisec_train.audit.registry import Registry
from aisec_train.hashing import sha256_file
from tests.swaps import SWAPS, attempt, cli, make_run, refused

pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


@pytest.mark.parametrize("swap", SWAPS, ids=[s.name for s in SWAPS])
def test_every_artifact_substitution_is_refused(tmp_path, swap):
    code, err = attempt(swap, tmp_path / "swap")
    assert refused(code, err), (swap.what, code, err)
    entries = Registry(tmp_path / "swap" / "inventory" / "registry.json").entries()
    assert not any(e["known_good"] for e in entries)  # nothing substituted ever becomes known-good


def test_the_issue_scenario_names_what_disagrees(tmp_path):
    code, err = attempt(SWAPS[0], tmp_path)
    assert refused(code, err) and "does not belong to this run" in err and "refusing a substituted artifact" in err
    dp = tmp_path / "dp" / "run"
    copied = sha256_file(dp / "model.pt")
    assert not any(e["sha256"] == copied for e in Registry(tmp_path / "inventory" / "registry.json").entries())


def test_an_honest_resume_updates_its_entry(tmp_path):
    reg = tmp_path / "inventory" / "registry.json"
    run = make_run(tmp_path / "dp" / "run")
    assert cli(["--registry", str(reg), "register", str(run)])[0] == 0
    make_run(run, 2.0, epsilon=3.0)  # the resumed run trained further and saved a new model.pt
    assert cli(["--registry", str(reg), "register", str(run)])[0] == 0
    entries = Registry(reg).entries()
    assert len(entries) == 1 and entries[0]["sha256"] == sha256_file(run / "model.pt")
    assert cli(["--registry", str(reg), "list"])[0] == 0


def test_a_known_good_entry_is_kept_as_replaced_after_a_resume(tmp_path):
    reg = tmp_path / "inventory" / "registry.json"
    run = make_run(tmp_path / "dp" / "run")
    first = Registry(reg).register(run)["id"]
    Registry(reg).mark_good(first)
    make_run(run, 2.0, epsilon=3.0)
    Registry(reg).register(run)
    old, new = Registry(reg).entries()
    assert Registry(reg).status(old) == ("replaced", "ok") and Registry(reg).status(new) == ("ok", "-")
    assert cli(["--registry", str(reg), "list"])[0] == 0
    assert cli(["--registry", str(reg), "rollback", "--dest", str(tmp_path / "back" / "model.pt")])[0] == 0


def test_a_whole_run_folder_moved_elsewhere_still_registers_and_says_where_it_ran(tmp_path):
    """A self-consistent run (model, tag and report together) is one run wherever it lies: not a substitution."""
    import shutil

    run = make_run(tmp_path / "first" / "run")
    shutil.copytree(run, tmp_path / "shared" / "run")
    entry = Registry(tmp_path / "registry.json").register(tmp_path / "shared" / "run")
    assert entry["trained_in"] == str(run.resolve()) and entry["run_dir"] == str(tmp_path / "shared" / "run")
