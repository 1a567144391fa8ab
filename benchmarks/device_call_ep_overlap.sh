#!/usr/bin/env bash
# parallel.ep_overlap on vs off on 2 GPUs (issue 12): the one-layer profile of both orders at
# 16 and 32 x 1024 tokens per GPU (bytes measured beside the cost model), then weak scaling of
# dp / ep_rows / ep_dim at micro-batch 32 with the overlap off (the default) and ep_rows /
# ep_dim with it on. Run after `source benchmarks/device_env.sh`; about 6 minutes on 2 H200s.
set -uo pipefail
out=${OUT:-ep-overlap}
mkdir -p "$out"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache}
prepare_bench_data "$out/prepare.log"
for tokens in 32768 16384; do
  timeout 90 torchrun --standalone --nproc-per-node 2 benchmarks/profile_expert_parallel.py \
    --modes local,rows,rows_overlap,dim,dim_overlap --tokens "$tokens" \
    --json "$out/ep_profile_$tokens.json" >"$out/ep_profile_$tokens.log" 2>&1
done
timeout 200 python3 benchmarks/weak_scaling.py --gpus 2 --layouts dp ep_rows ep_dim \
  --micro-batch 32 --steps 15 --log-interval 5 --runs-dir "$out/runs_default" \
  --json "$out/weak_overlap_default.json" >"$out/weak_overlap_default.log" 2>&1
timeout 150 python3 benchmarks/weak_scaling.py --gpus 2 --layouts ep_rows ep_dim \
  --micro-batch 32 --steps 15 --log-interval 5 --runs-dir "$out/runs_on" \
  --extra parallel.ep_overlap=true \
  --json "$out/weak_overlap_on.json" >"$out/weak_overlap_on.log" 2>&1
for f in "$out"/*.log; do echo "== $f"; grep -v "USDT\|^ \{11\}[0-9 .]*ms" "$f" | tail -14; done
