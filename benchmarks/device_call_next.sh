#!/usr/bin/env bash
# The next round's first GPU calls, ready to run from the repository root after
# `source benchmarks/device_env.sh` (no pipe after `source`: it would run in a subshell).
#   bash benchmarks/device_call_next.sh state   # 2 GPUs, ~5 min (issues 12, 13)
#   bash benchmarks/device_call_next.sh grads   # 2 GPUs, ~7 min (issues 12, 13)
#   bash benchmarks/device_call_next.sh swiglu  # 2 GPUs, ~5 min (issue 13)
# state: where main stands. a80m OmniMoE (GPU 0) and the dense model of equal active parameters
#     (GPU 1) side by side, graphed and compile + graphs (issue 13's step ratio, MFU, memory);
#     then weak scaling on both GPUs, DP / ep_dim / ep_rows graphed at micro-batch 32 (issue
#     12's ratios; dim reaches 0.90-0.91 of DP there, 0.88 at micro-batch 16).
#     Measured in the fourteenth session (docs/benchmarks.md).
# swiglu: model.fused_swiglu under the MLP graphs, each model with and without, twice with the
#     GPUs swapped. Measured in the fourteenth and fifteenth sessions (docs/benchmarks.md):
#     OmniMoE +7-8% in three calls, so null (the default) turns it on for OmniMoE with the
#     graphs; dense +-0 graphed, -5% under compile + graphs (0.5 GiB less memory): off.
# grads: the pair kernel's hot-block split (model.expert_grad_segment_pairs) against the dense
#     GEMMs under a trained router's skew. GPU 0: bench_grad_paths on uniform and Zipf 0.45
#     routing with the split at 256 / 1024 / 4096 pairs; GPU 1: the GPU tests of the schedules,
#     then a80m training, graphed, on the dense path (the default) and on the pair kernel split
#     at 1024. Measured in the thirteenth session (docs/benchmarks.md): the split is at par with
#     the dense path in training, 2.2x faster than the unsplit pair kernel there.
set -uo pipefail
what=${1:?"usage: device_call_next.sh state|swiglu|grads"}
out=${OUT:-device-next}
mkdir -p "$out"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache}
prepare_bench_data "$out/prepare.log"
case $what in
state)
  bench="python3 benchmarks/bench_training.py --scales a80m --steps 20 --timeout 150"
  bench="$bench --variants cuda_graphs compile_graphs"
  (CUDA_VISIBLE_DEVICES=0 timeout 330 $bench --models omnimoe --runs-dir "$out/train0" \
     --json "$out/omnimoe.json" >"$out/omnimoe.log" 2>&1) &
  CUDA_VISIBLE_DEVICES=1 timeout 330 $bench --models dense --runs-dir "$out/train1" \
    --json "$out/dense.json" >"$out/dense.log" 2>&1
  wait
  timeout 420 python3 benchmarks/weak_scaling.py --gpus 2 --layouts dp ep_dim ep_rows \
    --micro-batch 32 --steps 15 --extra trainer.cuda_graphs=mlp --runs-dir "$out/weak" \
    --json "$out/weak.json" >"$out/weak.log" 2>&1
  rm -rf "$out/train0" "$out/train1" "$out/weak"
  ;;
swiglu)
  bench="python3 benchmarks/bench_training.py --scales a80m --steps 20 --timeout 110"
  bench="$bench --variants cuda_graphs"
  for model in omnimoe dense; do
    for gpus in "0 1" "1 0"; do
      set -- $gpus
      (CUDA_VISIBLE_DEVICES=$1 timeout 130 $bench --models $model \
         --override model.fused_swiglu=true --runs-dir "$out/train$1" \
         --json "$out/${model}_fused_gpu$1.json" >"$out/${model}_fused_gpu$1.log" 2>&1) &
      CUDA_VISIBLE_DEVICES=$2 timeout 130 $bench --models $model \
        --override model.fused_swiglu=false --runs-dir "$out/train$2" \
        --json "$out/${model}_base_gpu$2.json" >"$out/${model}_base_gpu$2.log" 2>&1
      wait
    done
  done
  rm -rf "$out"/train?
  ;;
grads)
  paths="python3 benchmarks/bench_grad_paths.py --segment-pairs 256 1024 4096"
  (CUDA_VISIBLE_DEVICES=0 timeout 150 $paths --json "$out/paths_uniform.json" \
     >"$out/paths_uniform.log" 2>&1
   CUDA_VISIBLE_DEVICES=0 timeout 150 $paths --zipf 0.45 --json "$out/paths_zipf.json" \
     >"$out/paths_zipf.log" 2>&1) &
  CUDA_VISIBLE_DEVICES=1 timeout 90 python3 -m pytest -q -m gpu \
    tests/kernels/test_atomic_experts.py >"$out/tests.log" 2>&1
  bench="python3 benchmarks/bench_training.py --scales a80m --steps 20 --timeout 120"
  CUDA_VISIBLE_DEVICES=1 timeout 260 $bench --models omnimoe --variants cuda_graphs \
    --runs-dir "$out/train" --json "$out/train_dense.json" >"$out/train_dense.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 130 $bench --models omnimoe --variants cuda_graphs \
    --override model.expert_grad_path=pairs --override model.expert_grad_segment_pairs=1024 \
    --runs-dir "$out/train" --json "$out/train_split.json" >"$out/train_split.log" 2>&1
  wait
  rm -rf "$out/train"
  ;;
*) echo "device_call_next.sh: unknown part '$what' (state, swiglu, grads)" >&2; exit 2 ;;
esac
for f in "$out"/*.log; do echo "== $f"; grep "^|\|PAIR_COLUMN\|passed\|failed" "$f" | tail -14; done
