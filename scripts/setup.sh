#!/usr/bin/env bash
# Set up aisec-train in ./.venv on a fresh machine with only Python 3.11 and pip. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# pip's builds print hundreds of packaging warnings (setuptools' notes on the configs/ data folders, pip's
# "Location ... is ignored" for absent local indexes): each step's output goes to .venv/setup.log, and only
# pip's own ERROR/WARNING lines are shown, those known-harmless Location lines excepted; a failing step
# prints the end of its log and stops the script.
quietly() {
  if "$@" >.venv/setup.log 2>&1; then
    grep -E '^(ERROR|WARNING):' .venv/setup.log | grep -vE "^WARNING: Location '.*' is ignored" >&2 || true
  else
    status=$?
    tail -n 40 .venv/setup.log >&2
    echo "setup: failed: $* (exit $status); full output in .venv/setup.log" >&2
    exit "$status"
  fi
}
# Every install step, pip's build environments included, is constrained to constraints.txt: the locked environment
# CI last passed with (see its header), so a new release of any dependency cannot change a clean clone's set-up.
# AISEC_TRAIN_UNLOCKED=1 installs the newest releases pyproject.toml allows instead (scripts/relock.sh uses it).
unlocked=${AISEC_TRAIN_UNLOCKED:-0}
if [ "$unlocked" != 1 ]; then
  export PIP_CONSTRAINT="$PWD/constraints.txt"
fi
stamp=.venv/.aisec-setup-$( (cat pyproject.toml scripts/setup.sh constraints.txt; echo "$unlocked") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  quietly pip install -q --upgrade pip
  # torch and torchvision are pinned as a matching pair: PyPI's torchvision wheels are CUDA builds that
  # fail to import beside a CPU-only torch, so both come as the CUDA 13 build (it runs on the CPU too, and
  # is what a GPU cluster needs). An unpinned torch could pull a newer, mismatched pair.
  quietly pip install -q "torch==2.14.1" "torchvision==0.29.1"
  quietly pip install -q -e ".[test,federated,cluster,timm,finetune,bench,tracking,figures]"
  # torchattacks (a test and benchmark peer) declares torchvision, whose PyPI wheel is CUDA-linked and
  # breaks next to the CPU torch; torchattacks itself never imports it.
  quietly pip install -q --no-deps "torchattacks==3.5.1"
  touch "$stamp"
fi
# Marks an environment set up unlocked on purpose: tests/test_packaging.py then skips its lock check.
if [ "$unlocked" = 1 ]; then touch .venv/.aisec-unlocked; else rm -f .venv/.aisec-unlocked; fi
echo "aisec-train is ready. Next: .venv/bin/aisec-train experiment=smoke  (a first run in about a minute)"
