"""scripts/figures/backdoor_twin_pairs.py: repaired backdoored models against their never-poisoned twins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "figures" / "backdoor_twin_pairs.py"


def _write(tmp_path: Path, backdoored: dict[int, float], twins: dict[int, float], case="natural/blended/dp"):
    matrix = tmp_path / "m.json"
    rows = [{"case": case, "seed": s, "asr_after": a} for s, a in backdoored.items()]
    matrix.write_text(json.dumps({"rows": [*rows, {"case": case, "seed": 99, "failed": "killed"}]}))
    floor = tmp_path / "t.jsonl"
    floor.write_text(
        "".join(json.dumps({"case": case, "seed": s, "asr_floor_after": a}) + "\n" for s, a in twins.items())
    )
    return matrix, floor


def _run(matrix: Path, floor: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--matrices", str(matrix), *extra, "--twins", str(floor),
                           "--out", str(out)], capture_output=True, text=True)  # fmt: skip


def test_a_repair_that_leaves_a_backdoor_is_told_from_the_data_floor(tmp_path):
    twins = {s: 0.05 + 0.005 * (s % 3) for s in range(9)}  # the data's own pull: about the bar
    left = {s: 0.12 + 0.01 * s for s in range(9)}  # every backdoored run far above its twin
    done = _run(*_write(tmp_path, left, twins), tmp_path / "o.json")
    assert done.returncode == 0, done.stderr
    case = json.loads((tmp_path / "o.json").read_text())["cases"]["natural/blended/dp"]
    assert case["pairs"] == 9 and case["wilcoxon_p"] < 0.01 and case["mannwhitney_p"] < 0.01
    assert case["above_every_twin"] == list(range(9)) and case["backdoored_above_bar"] == 9
    assert case["twins_above_bar"] == 6  # seeds whose twin is at 0.055 or 0.06

    at_floor = {s: twins[(s + 1) % 9] for s in range(9)}  # the same values, shuffled over the seeds
    done = _run(*_write(tmp_path, at_floor, twins), tmp_path / "o.json")
    case = json.loads((tmp_path / "o.json").read_text())["cases"]["natural/blended/dp"]
    assert case["wilcoxon_p"] > 0.3 and case["mannwhitney_p"] > 0.3 and case["above_every_twin"] == []
    assert case["backdoored_asr_mean"] == case["twin_asr_mean"] and abs(case["difference_median"]) <= 0.005


def test_a_later_matrix_replaces_a_cell_and_no_pairs_is_refused(tmp_path):
    matrix, floor = _write(tmp_path, {0: 0.2, 1: 0.2}, {0: 0.04, 1: 0.05})
    rerun = tmp_path / "rerun.json"
    rerun.write_text(json.dumps({"rows": [{"case": "natural/blended/dp", "seed": 1, "asr_after": 0.01}]}))
    done = _run(matrix, floor, tmp_path / "o.json", str(rerun))
    seeds = json.loads((tmp_path / "o.json").read_text())["cases"]["natural/blended/dp"]["per_seed"]
    assert [s["backdoored_asr"] for s in seeds] == [0.2, 0.01]

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"case": "digits/badnets/none", "seed": 0, "asr_floor_after": 0.0}) + "\n")
    done = _run(matrix, other, tmp_path / "none.json")
    assert done.returncode == 2 and "no (case, seed) is in both" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "none.json").exists()


def test_a_missing_or_foreign_input_is_refused_in_one_line(tmp_path):
    matrix, floor = _write(tmp_path, {0: 0.02}, {0: 0.03})
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"cases": {}}))  # valid JSON, but no matrix rows
    for args in ([str(tmp_path / "missing.json")], [str(foreign)]):
        done = subprocess.run([sys.executable, str(SCRIPT), "--matrices", *args, "--twins", str(floor), "--out",
                               str(tmp_path / "o.json")], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and "cannot read the inputs" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "o.json").exists()
