#!/usr/bin/env bash
# GPU check of the training path (run on the device machine from the repository root):
#   1. the main job exactly as a user runs it (default config: tiny model, embedded corpus);
#   2. model=a80m for 50 steps at the paper's batch (128 x 1024 tokens) in bf16, with the
#      tokenizer's vocabulary (model.vocab_size=null) as in the runs in docs/benchmarks.md.
# Writes metrics.jsonl / summary.json of both runs under $OUT (or ./gpu-check).
set -euo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
work=$(mktemp -d)
export OMNIMOE_CACHE=${OMNIMOE_CACHE:-$work/cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

OMNIMOE_RUN_DIR=$work/runs/main omnimoe-train trainer.progress=false 2>&1 | tee "$out/main.log" | grep -E "parameters|val_loss"
cp $work/runs/main/metrics.jsonl "$out/main_metrics.jsonl"
cp $work/runs/main/summary.json "$out/main_summary.json"

OMNIMOE_RUN_DIR=$work/runs/a80m omnimoe-train model=a80m model.vocab_size=null trainer.max_steps=50 trainer.log_interval=10 \
  trainer.eval_interval=50 trainer.eval_iters=4 optim.warmup_steps=10 data.seq_len=1024 \
  data.micro_batch_size=16 data.global_batch_size=128 logging=disabled trainer.progress=false \
  checkpoint.save_final=false 2>&1 | tee "$out/a80m.log" | grep -E "parameters|step|val_loss"
cp $work/runs/a80m/metrics.jsonl "$out/a80m_metrics.jsonl"
cp $work/runs/a80m/summary.json "$out/a80m_summary.json"
