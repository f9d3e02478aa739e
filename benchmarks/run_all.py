"""Every benchmark in one command: DP-SGD, PGD, AutoAttack, the activation kernel and HE aggregation.

Runs each script in its own process (so one's memory peak or CUDA state cannot colour another's), writes
their JSON files and one ``summary.md`` into ``benchmarks/results/<device>/``, and with ``--readme`` puts the
summary into README.md between the ``benchmarks:start`` / ``benchmarks:end`` markers.

    python benchmarks/run_all.py --device cuda --readme     # on a GPU node
    python benchmarks/run_all.py --quick                    # CPU, a few minutes
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from aisec_train.errors import RefusingParser

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["dpsgd", "pgd", "autoattack", "activations", "he_aggregation"]
README_MARKERS = ("<!-- benchmarks:start -->", "<!-- benchmarks:end -->")


def device_slug(device: str) -> str:
    """``nvidia-h100`` for "NVIDIA H100 80GB HBM3", ``cpu`` on the CPU: the results folder's name."""
    if not device.startswith("cuda"):
        return "cpu"
    words = torch.cuda.get_device_name(torch.device(device)).lower().split()
    return "-".join(words[:2]) if words[0] == "nvidia" else words[0]


def run_one(name: str, device: str, quick: bool, out: Path) -> dict | None:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--device", device, "--out", str(out)]
    cmd += ["--quick"] if quick else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"{name}: FAILED after {seconds:.0f}s\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"{name}: {seconds:.0f}s -> {out}", file=sys.stderr)
    return json.loads(out.read_text())


def summary_markdown(results: dict[str, dict | None], device: str, quick: bool) -> str:
    first = next((r for r in results.values() if r), None)
    name = first["device"] if first else device
    lines = [
        f"Measured {date.today().isoformat()} on **{name}** with "
        f"`python benchmarks/run_all.py --device {device}{' --quick' if quick else ''}`"
        f"{' (quick sizes)' if quick else ''}. A ratio `X_vs_Y` is Y's time over X's: above 1, X is faster.",
        "",
        "| benchmark | ratio | value |",
        "|---|---|---|",
    ]
    for bench, result in results.items():
        if result is None:
            lines.append(f"| {bench} | failed | - |")
            continue
        lines += [f"| {bench} | `{key}` | {value:.3f} |" for key, value in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, summary: str) -> None:
    start, end = README_MARKERS
    text = readme.read_text()
    block = f"{start}\n{summary}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Latest benchmarks\n{block}\n"
    readme.write_text(text)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU), a few minutes in all")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    parser.add_argument("--results", type=Path, default=HERE / "results", help="parent of the <device> folder")
    parser.add_argument("--readme", action="store_true", help="put the summary into README.md")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    folder = args.results / (device_slug(device) + ("-quick" if args.quick else ""))
    folder.mkdir(parents=True, exist_ok=True)
    results = {name: run_one(name, device, args.quick, folder / f"{name}.json") for name in args.only}
    summary = summary_markdown(results, device, args.quick)
    (folder / "summary.md").write_text(f"# Benchmarks: {folder.name}\n\n{summary}")
    print(summary)
    if args.readme:
        update_readme(HERE.parent / "README.md", summary)
    if any(r is None for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
