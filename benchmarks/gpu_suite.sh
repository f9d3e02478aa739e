#!/usr/bin/env bash
# Everything that needs a GPU, in one command on a CUDA machine (the device tool's `run`), from the repo root:
# the compiled-kernel tests against their torch references, every benchmark (benchmarks/run_all.py; pass --readme
# to refresh README's table), the default job on CUDA; issue 22's bf16 speed-up, multi-GPU scaling (1..8
# ranks), and with two GPUs or more the NCCL runs (2 processes with ddp and with fsdp, and torchrun's own 2-node
# launch) and the tracking overhead. Results go to $OUT (default benchmarks/results/gpu). Pure-Python
# dependencies the machine lacks may travel as wheels in .whl/ (see the device README); the project is installed
# from this tree.
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
# Every job below keeps its own throwaway ledger store: repeated runs on the same data would otherwise spend (and
# then be refused by) the machine's dataset ledger.
JOB="audit=off privacy.ledger_store=scratch"
summary='import json,sys; r=json.load(open(sys.argv[1])); t=r["train"]; p=r["privacy"]
print(sys.argv[2], "world", t.get("world_size"), "steps", p.get("steps"), "train_s", r["run"]["timings"]["train"],
      "acc", r["metrics"]["clean_accuracy"], "eps", p.get("epsilon"), t.get("distributed"))'
( cd /tmp && time python3 -m aisec_train train.device=cuda $JOB hydra.run.dir=/tmp/gpu_run ) 2>&1 | tail -4 \
  | tee "$OUT/default_job_cuda.log" || status=1
gpus=$(nvidia-smi -L | wc -l)
# Issue 22. bf16 against fp32 on the GPU (the same DP job; clipping and noise stay fp32): accuracy and step time.
python3 scripts/figures/precision.py --device cuda --out "$OUT/precision_bf16_cuda.json" || status=1
# Multi-GPU scaling of the default job: 1, 2, 4, 8 ranks (as many as there are GPUs), one privacy ledger each;
# train seconds and steps from each report (the global batch is the same, so steps are too).
for n in 1 2 4 8; do
  [ "$n" -le "$gpus" ] || break
  ( cd /tmp && python3 -m aisec_train train.device=cuda train.distributed.nproc=$n $JOB robustness.evaluate=false \
      hydra.run.dir=/tmp/gpu_scaling_$n >/dev/null 2>&1 ) || status=1
  python3 -c "$summary" /tmp/gpu_scaling_$n/report.json "nproc=$n" | tee -a "$OUT/scaling_nproc.log" || status=1
done
if [ "$gpus" -ge 2 ]; then
  # NCCL, one node: two data-parallel processes (one ledger), replicas (ddp) and shards (FSDP2 + ghost_fsdp).
  for strategy in ddp fsdp; do
    ( cd /tmp && python3 -m aisec_train train.device=cuda train.distributed.nproc=2 \
        train.distributed.strategy=$strategy $JOB hydra.run.dir=/tmp/gpu_nccl_$strategy >/dev/null 2>&1 ) || status=1
    python3 -c "$summary" /tmp/gpu_nccl_$strategy/report.json "nccl $strategy" | tee -a "$OUT/nccl.log" || status=1
  done
  # NCCL through torchrun itself: two "nodes" of gpus/2 ranks each on this machine (c10d rendezvous on loopback);
  # the report must show world_size = gpus, launcher torchrun and equal digests on every rank.
  half=$((gpus / 2)); port=29471; pids=()
  for node in 0 1; do
    ( cd /tmp && CUDA_VISIBLE_DEVICES=$(seq -s, $((node * half)) $((node * half + half - 1))) python3 -m torch.distributed.run \
        --nnodes=2 --nproc-per-node=$half --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:$port --rdzv-id=gpu-suite \
        -m aisec_train train.device=cuda $JOB hydra.run.dir=/tmp/gpu_torchrun ) \
      > "$OUT/torchrun_nccl_node$node.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done  # a bare `wait` would report success regardless
  python3 -c "$summary" /tmp/gpu_torchrun/report.json "torchrun 2 nodes" | tee "$OUT/torchrun_nccl.log" || status=1
else
  echo "one GPU: the NCCL runs (2 processes, FSDP, torchrun nodes) need two" | tee "$OUT/nccl.log"
fi
# Experiment-tracking overhead on the GPU job (every logger against none).
python3 scripts/figures/tracking_overhead.py --repeats 2 --device cuda --out "$OUT/tracking_overhead_cuda.json" || status=1
exit $status
