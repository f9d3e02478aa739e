"""scripts/figures/backdoor_pass_rates.py: the per-cell pass rates of issue 24's bars over pooled matrix seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "figures" / "backdoor_pass_rates.py"


def _row(case: str, seed: int, asr_after: float, clean_drop: float, p: float | None = None) -> dict:
    return {"case": case, "seed": seed, "asr_after": asr_after, "clean_drop": clean_drop, "target_share_p_after": p}


def _matrix(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_rates_pool_seeds_across_files_and_judge_each_bar(tmp_path):
    first = _matrix(tmp_path / "a.json", [
        _row("natural/blended/dp", 0, 0.030, -0.10, 0.5),
        _row("natural/blended/dp", 1, 0.056, -0.08, 0.10),  # ASR miss
        _row("natural/wanet/none", 0, 0.011, 0.0275, 0.9),  # drop miss
        {"case": "natural/wanet/none", "seed": 9, "failed": "killed"},  # failed cells are not counted
    ])  # fmt: skip
    second = _matrix(tmp_path / "b.json", [
        _row("natural/blended/dp", 3, 0.050, 0.02, 0.01),  # both bars met exactly at the limit; p < 0.05
        _row("natural/wanet/none", 3, 0.060, 0.030, None),  # both missed
    ])  # fmt: skip
    out = tmp_path / "rates.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(first), str(second), "--out", str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    cells = json.loads(out.read_text())["cells"]
    blended, wanet = cells["natural/blended/dp"], cells["natural/wanet/none"]
    assert blended["seeds"] == [0, 1, 3]
    assert (blended["asr_after_ok"]["passed"], blended["clean_drop_ok"]["passed"], blended["both_ok"]["passed"]) == (
        2, 3, 2)  # fmt: skip
    assert blended["target_share_p_below_0.05"] == 1 and blended["asr_after.worst"] == 0.056
    assert (wanet["asr_after_ok"]["passed"], wanet["clean_drop_ok"]["passed"], wanet["both_ok"]["runs"]) == (1, 0, 2)
    low, high = blended["both_ok"]["ci95"]
    assert 0 < low < 2 / 3 < high < 1  # an exact binomial interval around 2 of 3
    assert json.loads(out.read_text())["both_ok"]["passed"] == 2 and "2 of 5 runs" in done.stdout


def test_a_seed_in_two_files_is_refused(tmp_path):
    rows = [_row("digits/badnets/none", 0, 0.0, 0.01)]
    first, second = _matrix(tmp_path / "a.json", rows), _matrix(tmp_path / "b.json", rows)
    done = subprocess.run([sys.executable, str(SCRIPT), str(first), str(second), "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "digits/badnets/none seed 0 is in two files" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o.json").exists()


def test_a_later_file_supersedes_the_cells_it_re_ran_only_when_asked(tmp_path):
    first = _matrix(tmp_path / "a.json", [_row("natural/wanet/none", 0, 0.011, 0.0275), _row("digits/badnets/none", 0,
                                                                                            0.0, 0.01)])  # fmt: skip
    rerun = _matrix(tmp_path / "b.json", [_row("natural/wanet/none", 0, 0.0, -0.005)])  # the same cell after a change
    out = tmp_path / "rates.json"
    subprocess.run([sys.executable, str(SCRIPT), str(first), str(rerun), "--supersede", "--out", str(out)],
                   capture_output=True, text=True, check=True)  # fmt: skip
    result = json.loads(out.read_text())
    wanet = result["cells"]["natural/wanet/none"]
    assert wanet["seeds"] == [0] and wanet["both_ok"]["passed"] == 1 and wanet["clean_drop.worst"] == -0.005
    assert result["cells"]["digits/badnets/none"]["seeds"] == [0]  # the cell the later file did not re-run stays
    assert result["superseded"] == [{"case": "natural/wanet/none", "seed": 0, "by": str(rerun)}]
