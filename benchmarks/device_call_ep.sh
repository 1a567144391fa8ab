#!/usr/bin/env bash
# Issue 12 round on 2 GPUs (fifth session): expert-parallel layer profile with measured bytes
# (NCCL flight recorder on and off), then weak scaling of dp / ep_rows / ep_dim at micro-batch
# 16 and 32 (same per-GPU batch of 128 x 1024 tokens). Run after `source benchmarks/device_env.sh`.
set -uo pipefail
out=${OUT:-ep-round}
mkdir -p "$out"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache}
prepare_bench_data "$out/prepare.log"
for mb in 16 32; do
  timeout 60 torchrun --standalone --nproc-per-node 2 benchmarks/profile_expert_parallel.py \
    --modes local,rows,dim --tokens $((mb * 1024)) --json "$out/ep_profile_mb$mb.json" \
    >"$out/ep_profile_mb$mb.log" 2>&1
done
TORCH_NCCL_TRACE_BUFFER_SIZE=0 timeout 60 torchrun --standalone --nproc-per-node 2 \
  benchmarks/profile_expert_parallel.py --modes rows,dim --json "$out/ep_profile_notrace.json" \
  >"$out/ep_profile_notrace.log" 2>&1
for mb in 32 16; do
  timeout 240 python3 benchmarks/weak_scaling.py --gpus 2 --layouts dp ep_rows ep_dim \
    --micro-batch $mb --steps 15 --log-interval 5 --runs-dir "$out/runs" \
    --json "$out/weak_mb$mb.json" >"$out/weak_mb$mb.log" 2>&1
done
for f in "$out"/*.log; do echo "== $f"; grep -v "USDT\|^ \{11\}[0-9 .]*ms" "$f" | tail -12; done
