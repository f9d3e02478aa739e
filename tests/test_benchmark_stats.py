"""The DP-step benchmark's statistics, per-phase profile and per-layer table (benchmarks/dpsgd.py, step_profile.py,
bk_per_layer.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bk_per_layer  # noqa: E402
import dpsgd  # noqa: E402
import step_profile  # noqa: E402


def test_paired_ratio_is_per_round_and_its_interval_holds_the_median():
    slow = [2.0, 2.2, 1.8, 2.1, 2.0, 5.0]  # one disturbed round: the median ignores it, the spread shows it
    fast = [1.0, 1.1, 0.9, 1.0, 1.0, 1.0]
    stats = dpsgd.paired_ratio(slow, fast)
    assert stats["median"] == pytest.approx(2.0)
    assert stats["rounds"] == 6
    assert stats["ci95"][0] <= stats["median"] <= stats["ci95"][1]
    assert stats["p25"] <= stats["median"] <= stats["p75"]


def test_ratio_names_follow_the_contract_y_time_over_x_time():
    rows = [
        {"impl": "nonprivate", "model": "cnn", "seconds": 1.0, "times": [1.0, 1.0, 1.0]},
        {"impl": "ours", "model": "cnn", "seconds": 1.2, "times": [1.2, 1.2, 1.2]},
        {"impl": "opacus_ghost", "model": "cnn", "seconds": 2.4, "times": [2.4, 2.4, 2.4]},
    ]
    ratios = dpsgd.ratios_for(rows)
    assert ratios["nonprivate_vs_ours_cnn"] == pytest.approx(1.2)  # the DP cost factor of our step
    assert ratios["ours_vs_opacus_ghost_cnn"] == pytest.approx(2.0)  # above 1: ours is faster


@pytest.mark.parametrize("private", [False, True])
def test_profile_phases_cover_the_step(private):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    phases = step_profile.profile_steps(model, x, y, private, steps=2)
    assert phases["total"] > 0 and phases["forward"] > 0 and phases["backward"] >= 0
    named = sum(v for k, v in phases.items() if k != "total")
    assert named == pytest.approx(phases["total"], rel=0.5)  # medians of parts: close to the median total
    assert (phases["per_sample_norms"] > 0) is private and (phases["noise"] > 0) is private


def test_secret_noise_costs_about_what_global_noise_costs():
    cost = step_profile.noise_cost(100_000, repeats=5)
    assert cost["os_entropy_generator"] > 0 and cost["global_generator"] > 0


def test_interleaved_profile_pairs_the_two_steps_round_by_round():
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    prof = step_profile.profile_pair(build, x, y, steps=3)
    assert prof["steps"] == 3 and prof["ratio"] > 0
    assert prof["ours"]["per_sample_norms"] > 0 and prof["nonprivate"]["per_sample_norms"] == 0
    assert prof["phase_excess"]["noise"] > 0  # only ours draws noise: its excess is its own cost
    assert set(prof["phase_excess"]) == set(step_profile.PHASES)


def test_verdict_needs_both_runs_under_the_goal_and_within_the_agreement():
    run = {"ratios": {"nonprivate_vs_ours_cnn": 1.10, "ours_vs_opake_cnn": 9.0}, "indicative_only": False}
    close = {"ratios": {"nonprivate_vs_ours_cnn": 1.14}, "indicative_only": False}
    far = {"ratios": {"nonprivate_vs_ours_cnn": 0.99}, "indicative_only": False}  # both under 1.15, 0.11 apart
    over = {"ratios": {"nonprivate_vs_ours_cnn": 1.16}, "indicative_only": False}
    assert dpsgd.verdict(run, close)["passed"]
    assert list(dpsgd.verdict(run, close)["ratios"]) == ["nonprivate_vs_ours_cnn"]
    assert not dpsgd.verdict(run, far)["passed"] and not dpsgd.verdict(run, over)["passed"]
    assert not dpsgd.verdict(run, close | {"indicative_only": True})["passed"]  # --quick cannot give the verdict


def test_small_models_time_several_steps_per_sample_on_the_cpu_only_in_a_full_run():
    # One 0.1-0.2 s step per sample let cnn 32x32 and the mixer move by 0.37 and 0.24 between two runs.
    assert dpsgd.steps_per_sample("cnn", "cpu", quick=False) > 1
    assert dpsgd.steps_per_sample("cnn_32", "cpu", quick=False) > 1
    assert dpsgd.steps_per_sample("mixer", "cpu", quick=False) > 1
    assert dpsgd.steps_per_sample("cnn", "cpu", quick=True) == 1  # --quick stays a smoke run
    assert dpsgd.steps_per_sample("cnn", "cuda", quick=False) == 1
    assert dpsgd.batch_size("cnn_32", "cpu", quick=False) >= 256 and dpsgd.batch_size("mixer", "cpu", False) >= 256


def test_memory_is_the_median_of_fresh_interpreters_not_of_forked_children():
    """Forked, a memory child inherits this process' heap, and the mixer's private step measured 1.08x and 1.52x
    non-private in two runs of the same code; each CPU memory figure is now the median of fresh interpreters."""
    memory = dpsgd.peak_memory("cnn", "nonprivate", "cpu", quick=False, repeats=2)
    assert len(memory["peak_mb_runs"]) == 2 and all(peak > 0 for peak in memory["peak_mb_runs"])
    assert min(memory["peak_mb_runs"]) <= memory["peak_mb"] <= max(memory["peak_mb_runs"])


def test_per_layer_table_times_each_rule_inside_the_private_step():
    result = bk_per_layer.per_layer("cnn", steps=1, quick=True, replays=2)
    rows = {r["layer"]: r for r in result["rows"]}
    assert set(rows) == {"conv1", "norm1", "conv2", "norm2", "fc1", "fc2"}
    for r in rows.values():  # timed where they ran, inside the one backward; never left at zero
        assert r["norms_ms"] > 0 and r["clip_ms"] > 0, r
        assert r["excess_ms"] == pytest.approx(r["norms_ms"] + r["clip_ms"] - (r["weight_grad_ms"] or 0.0))
    assert rows["conv2"]["input_grad_ms"] > 0 and rows["norm1"]["input_grad_ms"] > 0
    assert all(rows[name]["weight_grad_ms"] > 0 for name in ("conv1", "conv2", "fc1", "fc2"))
    assert rows["norm1"]["weight_grad_ms"] is None  # formed inside GroupNorm's input-gradient kernel
    assert rows["conv1"]["method"] == "instantiate" and rows["fc1"]["method"] == "ghost"
    assert result["totals"]["excess_ms"] == pytest.approx(sum(r["excess_ms"] for r in rows.values()))
    assert set(result["by_kind"]) == {"Conv2d", "GroupNorm", "Linear"}


@pytest.mark.parametrize(
    "args, needle",
    [(["--models", "vgg,cnn"], "--models vgg is not allowed"), (["--steps", "0"], "--steps=0 is not allowed")],
)
def test_per_layer_script_refuses_bad_input_in_one_line(args, needle):
    script = Path(bk_per_layer.__file__)
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and needle in done.stderr


@pytest.mark.parametrize(
    "args, needle",
    [(["--models", "nope"], "--models nope is not allowed"), (["--impls", "ours,jax"], "--impls jax is not allowed"),
     (["--rounds", "0"], "--rounds=0 is not allowed"),
     (["--device", "tpu"], "--device tpu is not allowed: auto"),
     (["--out", "/proc/nowhere/x.json"], "--out /proc/nowhere/x.json is not allowed: /proc/nowhere is not writable"),
     (["--out", "/"], "--out / is not allowed: it is a folder")],
)  # fmt: skip
def test_dp_benchmark_refuses_bad_input_in_one_line(args, needle):
    """--device and --out used to be read only when used: a bad device failed every round of every implementation,
    and an unwritable --out ended a half-hour run with a traceback and nothing saved."""
    done = subprocess.run([sys.executable, str(Path(dpsgd.__file__)), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and needle in done.stderr


@pytest.mark.parametrize("impls", [dpsgd.IMPLS, ["nonprivate", "ours"], ["opake", "ours", "nonprivate"]])
def test_each_of_the_headline_pair_follows_a_peer_and_its_partner_equally_often(impls):
    """Alternating the two passes, round after round: the step before each of the pair's steps (a cold cache after a
    peer's larger working set) is as often a peer for the non-private step as for ours."""
    passes = dpsgd.interleaved_passes(impls)
    assert all(sorted(p) == sorted(impls) for p in passes) and {passes[0][0], passes[1][0]} == {"nonprivate", "ours"}
    sequence = [impl for _ in range(4) for p in passes for impl in p]
    # cyclic: the first pass follows the last, as every round's first pass follows the previous round's last
    before = {impl: [sequence[i - 1] for i in range(len(sequence)) if sequence[i] == impl] for impl in passes[0]}
    peers = set(impls) - {"nonprivate", "ours"}
    assert sum(b in peers for b in before["nonprivate"]) == sum(b in peers for b in before["ours"])
    assert before["ours"].count("nonprivate") == before["nonprivate"].count("ours")


def test_every_script_with_an_out_file_probes_it_before_any_work(tmp_path):
    """The figure scripts and benchmarks that write one file take it through preflight.output_file: refused in one
    line, exit 2, before a job or a benchmark starts (one real script each, the rest by their flag's type)."""
    repo = Path(dpsgd.__file__).resolve().parents[1]
    scripts = sorted([*repo.glob("scripts/figures/*.py"), *repo.glob("benchmarks/*.py")])
    declares = [p for p in scripts if 'add_argument("--out"' in p.read_text()]
    unchecked = [p.name for p in declares if 'add_argument("--out", type=Path' in p.read_text()
                 and "folder for" not in p.read_text()]  # fmt: skip
    assert len(declares) > 25 and unchecked == [], unchecked
    blocker = tmp_path / "file"
    blocker.write_text("")
    for script in (repo / "scripts/figures/eval_cost.py", repo / "benchmarks/pgd.py"):
        done = subprocess.run([sys.executable, str(script), "--out", str(blocker / "x.json")], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"--out {blocker / 'x.json'} is not allowed: {blocker} is not writable" in done.stderr


def test_every_script_answers_a_usage_error_in_one_line():
    """Every benchmark and figure script builds its parser as errors.RefusingParser: an unknown or malformed flag is
    one line and exit 2, as the console scripts answer, not argparse's usage block (two real scripts, the rest by
    their source)."""
    repo = Path(dpsgd.__file__).resolve().parents[1]
    scripts = sorted([*repo.glob("scripts/figures/*.py"), *repo.glob("benchmarks/*.py")])
    plain = [p.name for p in scripts if "argparse.ArgumentParser(" in p.read_text()]
    assert plain == [], plain
    for script, args in ((repo / "scripts/figures/backdoor_matrix.py", ["--no-such-flag"]),
                         (repo / "benchmarks/pgd.py", ["--quick", "--device"]),
                         # parse_known_args (its child's own flags): a typo in the parent ran the whole figure
                         (repo / "scripts/figures/tracking_overhead.py", ["--loggers-typo", "csv"])):  # fmt: skip
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.count("\n") == 1 and ": error: " in done.stderr, done.stderr
