#!/usr/bin/env bash
# Every GPU test and benchmark that docs/benchmarks.md quotes, in one command, in parallel lanes
# over the visible GPUs (4 GPUs: one 2-GPU lane and two 1-GPU lanes; fewer: the lanes one after
# another). Run from the repository root on the GPU machine, after `source benchmarks/device_env.sh`:
#   bash benchmarks/gpu_suite.sh [SECONDS]      # hard wall-clock budget, default 540
# Each lane stops at the budget (what finished is kept); logs, JSON and tables go to
# ${OUT:-gpu-suite}/, packed into suite.tar.gz at the end, with suite.md summarising the tables.
set -uo pipefail
budget=${1:-540}
out=${OUT:-gpu-suite}
mkdir -p "$out/lanes"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache} PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpus.txt"
echo "$(date -u +%FT%TZ) $ngpu GPUs: $(head -1 "$out/gpus.txt")" | tee "$out/suite.log"

# The stdlib dataset the 2-GPU and 1-GPU lanes share, prepared once before they start (the
# comparison lane prepares its own, larger one).
python3 - <<'EOF' >>"$out/suite.log" 2>&1
from omnimoe_train.config import DataConfig
from omnimoe_train.data import prepare_data
data = prepare_data(DataConfig(seq_len=1024, max_bytes=3_000_000), rank=0)
print("prepared", data.description)
EOF

lane() {  # lane NAME GPUS COMMAND...: run COMMAND with CUDA_VISIBLE_DEVICES=GPUS, within the budget
  local name=$1 gpus=$2
  shift 2
  local t
  t=$(left)
  if [ "$t" -le 10 ]; then echo "skip $name (budget spent)" >>"$out/suite.log"; return; fi
  echo "$(date -u +%T) start $name on GPU $gpus (${t}s left)" >>"$out/suite.log"
  CUDA_VISIBLE_DEVICES=$gpus timeout "$t" "$@" >"$out/lanes/$name.log" 2>&1
  echo "$(date -u +%T) end $name: exit $?" >>"$out/suite.log"
}

two_gpu_lane() {  # issue 12: weak scaling 1 -> 2 GPUs, then the NCCL equivalence tests
  lane weak_scaling 0,1 python3 benchmarks/weak_scaling.py --gpus 1 2 --steps 20 \
    --log-interval 5 --json "$out/lanes/weak_scaling.json"
  lane nccl_tests 0,1 python3 -m pytest -q -x -p no:cacheprovider tests/parallel/test_layouts_nccl.py
}

compare_lane() {  # issue 14: the six MLPs at A80M, equal active parameters and tokens
  lane compare_mlps "$1" python3 benchmarks/compare_mlps.py --steps 48 --out "$out/lanes/compare"
}

single_gpu_lane() {  # issues 9, 10, 13, 16 on one GPU
  local g=$1
  lane kernel_gpu_tests "$g" python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels
  lane bench_checkpoint "$g" python3 benchmarks/bench_checkpoint.py model=a80m --repeats 2 \
    --json "$out/lanes/checkpoint.json"
  lane bench_training "$g" python3 benchmarks/bench_training.py --scales a80m --steps 20 \
    --json "$out/lanes/training.json"
  lane profile_layer "$g" python3 benchmarks/profile_layer.py --json "$out/lanes/layer.json"
  lane bench_engines "$g" python3 benchmarks/bench_engines.py throughput --engines megatron,zero2 \
    --out "$out/lanes/engines"
}

if [ "$ngpu" -ge 4 ]; then
  two_gpu_lane &
  compare_lane 2 &
  single_gpu_lane 3 &
  wait
elif [ "$ngpu" -ge 2 ]; then
  two_gpu_lane
  compare_lane 0 &
  single_gpu_lane 1 &
  wait
else
  single_gpu_lane 0
  compare_lane 0
fi
echo "$(date -u +%T) done after $(($(date +%s) - start)) s" >>"$out/suite.log"
{
  for f in "$out"/lanes/*.log; do
    echo "## $(basename "$f" .log)"
    grep -E '^\|' "$f" | tail -30
    tail -3 "$f"
  done
} >"$out/suite.md"
tar czf "$out/suite.tar.gz" -C "$out" lanes gpus.txt suite.log 2>/dev/null
rm -rf "$out/lanes"
