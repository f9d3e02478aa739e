#!/usr/bin/env bash
# GPU checks of the robustness core, run from the repo root on a CUDA machine (the device tool's `run`):
# compiled-kernel tests against the torch references, then both benchmarks. (The interpreted suite is CI's job on
# the CPU with triton 3.9; triton 3.6's interpreter cannot `range` over a scalar kernel argument.)
# Pure-Python peers (torchattacks, ART) may travel as wheels in .whl/ (see the device README).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT" /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
ln -sfn "$PWD/kernels" /tmp/site/aisec_kernels  # the import name pyproject maps kernels/ to
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
status=0
python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python3 benchmarks/pgd.py --device cuda --out "$OUT/pgd.json" || status=1
python3 benchmarks/activations.py --device cuda --out "$OUT/activations.json" || status=1
exit $status
