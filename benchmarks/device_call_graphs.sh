#!/usr/bin/env bash
# First GPU call of the next round (2 GPUs): what the eighth session wrote but could not run on
# a GPU, then the CUDA-graph throughput again. Run after `source benchmarks/device_env.sh`
# (no pipe after `source`: a pipeline runs it in a subshell and loses the environment).
#   1. the graphed ep2_rows job must exit by itself (release_graphs before the process group;
#      it hung in destroy_process_group before), within 100 s; a hang dumps every thread;
#   2. the GPU tests of the CUDA graphs (1 and 2 GPUs) and of the split gate GEMMs;
#   3. weak scaling dp vs ep_rows, graphed, two rounds.
set -uo pipefail
out=${OUT:-graphs-round}
mkdir -p "$out"
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-/tmp/omnimoe-cache}
prepare_bench_data "$out/prepare.log"
common="model=a80m model.vocab_size=null data.seq_len=1024 data.micro_batch_size=16
  data.max_bytes=3000000 trainer.max_steps=10 trainer.log_interval=5 trainer.eval_interval=100
  trainer.eval_iters=1 optim.warmup_steps=5 trainer.progress=false logging=disabled
  checkpoint.save_final=false checkpoint.resume=null parallel=single data.global_batch_size=256
  trainer.cuda_graphs=mlp parallel.ep=2 parallel.expert_table_sharding=rows"
(sleep 90; pkill -ABRT -f "omnimoe_train.cli") & watchdog=$!
# shellcheck disable=SC2086  # the overrides are words
PYTHONFAULTHANDLER=1 timeout 100 torchrun --standalone --nproc-per-node 2 -m omnimoe_train.cli \
  $common hydra.run.dir="$out/ep_rows_graphed" >"$out/ep_rows_graphed.log" 2>&1
echo "graphed ep2_rows exit code $? (0: exited by itself)" | tee "$out/exit.txt"
kill $watchdog 2>/dev/null
timeout 200 python3 -m pytest -q -m gpu tests/train/test_cuda_graphs.py \
  tests/kernels/test_gate_gemms.py >"$out/gpu_tests.log" 2>&1
timeout 240 python3 benchmarks/weak_scaling.py --gpus 2 --layouts dp ep_rows --repeats 2 \
  --micro-batch 16 --steps 15 --log-interval 5 --extra trainer.cuda_graphs=mlp \
  --runs-dir "$out/runs" --json "$out/weak_graphed.json" >"$out/weak_graphed.log" 2>&1
for f in "$out"/*.log; do echo "== $f"; grep -v "warnings.warn\|Warning" "$f" | tail -12; done
