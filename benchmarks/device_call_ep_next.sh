#!/usr/bin/env bash
# First GPU call of the next round (2 GPUs, issue 12), ~8 minutes: what the ninth session changed
# but could not measure in training, then the next levers. Run after
# `source benchmarks/device_env.sh` (no pipe after `source`: it would run in a subshell).
#   1. graphed weak scaling (the overlap now follows the graphs): dp / ep_rows / ep_dim, two
#      rounds -- ep_dim with its one-chunk dense gradients was never run in training;
#   2. eager weak scaling, one round (the overlap off: its default without graphs);
#   3. the rows combine's pair ranges with 8-bit sort keys (setup was 0.083 ms);
#   4. one graphed layer step under fewer NCCL channels (the exchanges slow the compute they
#      run beside: does a smaller NCCL footprint pay?).
set -uo pipefail
out=${OUT:-ep-next}
mkdir -p "$out"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache}
prepare_bench_data "$out/prepare.log"
weak="python3 benchmarks/weak_scaling.py --gpus 2 --micro-batch 16 --steps 15 --log-interval 5"
timeout 280 $weak --layouts dp ep_rows ep_dim --repeats 2 --timeout 100 \
  --extra trainer.cuda_graphs=mlp --runs-dir "$out/graphed" --json "$out/weak_graphed.json" \
  >"$out/weak_graphed.log" 2>&1
timeout 150 $weak --layouts dp ep_rows ep_dim --timeout 100 --runs-dir "$out/eager" \
  --json "$out/weak_eager.json" >"$out/weak_eager.log" 2>&1
timeout 60 python3 benchmarks/bench_kernels.py --only combine_ranges >"$out/combine.log" 2>&1
profile="torchrun --standalone --nproc-per-node 2 benchmarks/profile_expert_parallel.py
  --tokens 16384 --cuda-graph --iters 30 --modes local,rows_overlap,dim_overlap"
for channels in default 8 4; do
  if [ "$channels" = default ]; then env=(); else env=(NCCL_MAX_NCHANNELS="$channels"); fi
  # shellcheck disable=SC2086  # the command is words
  env "${env[@]}" TORCH_FR_BUFFER_SIZE=0 timeout 60 $profile \
    --json "$out/layer_$channels.json" >"$out/layer_$channels.log" 2>&1
done
for f in "$out"/*.log; do echo "== $f"; grep "^|\|ms/layer" "$f" | tail -12; done
