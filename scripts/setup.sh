#!/usr/bin/env bash
# Set up aisec-train in ./.venv on a fresh machine with only Python 3.11 and pip. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
stamp=.venv/.aisec-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip
  # torch and torchvision are pinned as a matching pair: PyPI's torchvision wheels are CUDA builds that
  # fail to import beside a CPU-only torch, so both come as the CUDA 13 build (it runs on the CPU too, and
  # is what a GPU cluster needs). An unpinned torch could pull a newer, mismatched pair.
  pip install -q "torch==2.14.1" "torchvision==0.29.1"
  pip install -q -e ".[test,federated,cluster,timm,bench]"
  # torchattacks (a test and benchmark peer) declares torchvision, whose PyPI wheel is CUDA-linked and
  # breaks next to the CPU torch; torchattacks itself never imports it.
  pip install -q --no-deps "torchattacks==3.5.1"
  touch "$stamp"
fi
