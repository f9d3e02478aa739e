#!/usr/bin/env bash
# Everything that needs a GPU, in one command on a CUDA machine (the device tool's `run`), from the repo root:
# the compiled-kernel tests against their torch references, every benchmark (benchmarks/run_all.py; pass --readme
# to refresh README's table), the default job on CUDA, and with two GPUs the 2-process NCCL run. Results go to
# $OUT (default benchmarks/results/gpu). Pure-Python dependencies the machine lacks may travel as wheels in .whl/
# (see the device README); the project is installed from this tree.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT" /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
unset TRITON_INTERPRET
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
status=0
python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_kernels_norms.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python3 benchmarks/run_all.py --device cuda --results "$OUT" "$@" || status=1
( cd /tmp && time python3 -m aisec_train train.device=cuda audit=off hydra.run.dir=/tmp/gpu_run ) 2>&1 | tail -4 \
  | tee "$OUT/default_job_cuda.log" || status=1
# Two data-parallel processes over NCCL (one ledger), when the machine has two GPUs (issue 13).
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  ( cd /tmp && time python3 -m aisec_train train.device=cuda train.distributed.nproc=2 audit=off \
      hydra.run.dir=/tmp/gpu_run_ddp ) 2>&1 | tail -4 | tee "$OUT/default_job_cuda_nproc2.log" || status=1
else
  echo "one GPU: the 2-process NCCL run needs two" | tee "$OUT/default_job_cuda_nproc2.log"
fi
exit $status
