"""The per-phase profile of the DP step alone (benchmarks/step_profile.py), on the DP benchmark's models, as JSON:

python benchmarks/dpsgd_profile.py --threads 1 --steps 5 --out benchmarks/results/cpu/step_profile_after.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # aisec_train from a checkout without installing

import dpsgd  # noqa: E402
import torch  # noqa: E402
from step_profile import noise_cost  # noqa: E402

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file


def main() -> None:
    """``python benchmarks/dpsgd_profile.py [--models cnn,mixer] [--steps 5] [--threads 1] [--out FILE.json]``"""
    parser = RefusingParser(description=__doc__.splitlines()[0])
    models = list(dpsgd.MODELS)
    parser.add_argument("--models", default=",".join(models), help=f"comma-separated subset of {models}")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per impl (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=output_file, default=None, help="where to write the JSON result")
    parser.add_argument("--label", default="", help="a note kept in the JSON (e.g. the commit or the load)")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(dpsgd.MODELS))
    if unknown or args.steps < 1:
        allowed = f"allowed {list(dpsgd.MODELS)}, >= 1"
        parser.exit(2, f"dpsgd_profile: --models {unknown} / --steps {args.steps}: {allowed}\n")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    result = {"threads": threads, "steps": args.steps, "label": args.label, "load_before": os.getloadavg()}
    result["models"] = {}
    for key in args.models.split(","):
        prof = dpsgd.profile_model(key, "cpu", False, steps=args.steps)
        result["models"][key] = prof
        excess = " ".join(f"{k}={v:+.3f}" for k, v in prof["phase_excess"].items())
        print(f"{key:12s} ours/nonprivate {prof['ratio']:.3f}  excess/nonprivate total: {excess}", flush=True)
    result["load_after"] = os.getloadavg()
    result["noise_cost_11M"] = noise_cost(11_200_000, repeats=5)  # resnet18_gn's parameter count
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
