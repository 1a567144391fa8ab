#!/usr/bin/env bash
# The next round's first GPU calls, ready to run from the repository root after
# `source benchmarks/device_env.sh` (no pipe after `source`: it would run in a subshell).
#   bash benchmarks/device_call_next.sh ep          # 2 GPUs, ~8 min (issue 12)
#   bash benchmarks/device_call_next.sh throughput  # 1 GPU, ~7 min (issue 13)
# ep: the copy-engine probe (benchmarks/probe_copy_engine.py, never run yet); graphed weak
#     scaling dp / ep_rows / ep_dim, two rounds; one graphed layer step per mode
#     under NCCL's default, "efficiency" and "zero" CTA policies (NCCL_CTA_POLICY=0/1/2: fewer or
#     no SMs for the exchanges, which today run beside the compute and slow it; the eleventh
#     session's numbers: rows 0.85-0.86x, dim 0.86-0.88x of DP, NCCL kernels 0.5-0.7 ms per
#     layer step).
# throughput: bench_training at a80m, OmniMoE and the matched dense model, under the baseline,
#     CUDA graphs, and CUDA graphs + bf16 coefficients; the default cases (statistics on/off).
set -uo pipefail
what=${1:?"usage: device_call_next.sh ep|throughput"}
out=${OUT:-device-next}
mkdir -p "$out"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache}
prepare_bench_data "$out/prepare.log"
case $what in
ep)
  # Copy-engine exchanges vs NCCL beside compute (values, graph capture, contention): ~30 s.
  timeout 90 torchrun --standalone --nproc-per-node 2 benchmarks/probe_copy_engine.py \
    --json "$out/probe_ce.json" >"$out/probe_ce.log" 2>&1
  weak="python3 benchmarks/weak_scaling.py --gpus 2 --micro-batch 16 --steps 15 --log-interval 5"
  timeout 280 $weak --layouts dp ep_rows ep_dim --repeats 2 --timeout 100 \
    --extra trainer.cuda_graphs=mlp --runs-dir "$out/graphed" --json "$out/weak_graphed.json" \
    >"$out/weak_graphed.log" 2>&1
  for policy in 0 1 2; do
    NCCL_CTA_POLICY=$policy TORCH_FR_BUFFER_SIZE=0 timeout 70 torchrun --standalone \
      --nproc-per-node 2 benchmarks/profile_expert_parallel.py --tokens 16384 --cuda-graph \
      --iters 30 --modes local,rows_overlap,dim_overlap --json "$out/layer_cta$policy.json" \
      >"$out/layer_cta$policy.log" 2>&1
  done
  rm -rf "$out/graphed"
  ;;
throughput)
  bench="python3 benchmarks/bench_training.py --scales a80m --steps 20 --timeout 120"
  CUDA_VISIBLE_DEVICES=0 timeout 330 $bench --variants baseline cuda_graphs \
    --runs-dir "$out/levers" --json "$out/levers.json" >"$out/levers.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 120 $bench --models omnimoe --runs-dir "$out/bf16" \
    --variants cuda_graphs --override model.expert_grad_coef=bf16 \
    --json "$out/bf16.json" >"$out/bf16.log" 2>&1
  rm -rf "$out/levers" "$out/bf16"
  ;;
*) echo "device_call_next.sh: unknown part '$what' (ep or throughput)" >&2; exit 2 ;;
esac
for f in "$out"/*.log; do echo "== $f"; grep "^|\|ms/layer\|_ms:\|equal\|diff" "$f" | tail -14; done
