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
  # Pin the CPU build: an unpinned torch can pull a multi-GB CUDA build. On a GPU cluster, install
  # the CUDA build of the same version first and this line keeps it.
  pip install -q "torch==2.13.0"
  pip install -q -e ".[test,federated,cluster]"
  # torchattacks (a test and benchmark peer) declares torchvision, whose PyPI wheel is CUDA-linked and
  # breaks next to the CPU torch; torchattacks itself never imports it.
  pip install -q --no-deps "torchattacks==3.5.1"
  touch "$stamp"
fi
