#!/usr/bin/env bash
# How the CPU main job's defaults were chosen: run variants of the default command side by side,
# each pinned to 2 cores with 2 threads (the target machine), and print wall time and the drop of
# held-out loss from step 0. Usage: bash benchmarks/cpu_budget_check.sh [OUTDIR]
# Each entry of VARIANTS is one run's extra overrides ("" = the defaults as shipped);
# VARIANTS_FILE=path (one variant per line) replaces the list.
set -euo pipefail
out=${1:-${OUT:-cpu-budget}}
mkdir -p "$out"
VARIANTS=(
  ""
  "optim.warmup_steps=10 optim.decay_fraction=0.4"
  "model.ffn_hidden_size=512"
  "optim.lr=2e-3"
  "model.top_k=8 trainer.max_steps=360"
  "data.vocab_size=2048"
  "model.top_k=8 data.seq_len=128 data.micro_batch_size=16 data.global_batch_size=16"
  "optim.lr=4e-3 optim.warmup_steps=10 optim.decay_fraction=0.4"
)
if [ -n "${VARIANTS_FILE:-}" ]; then
  mapfile -t VARIANTS < "$VARIANTS_FILE"
fi
# Pair up the CPUs this script may use (it may itself run under taskset).
read -r -a cpus <<< "$(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
pids=()
for i in "${!VARIANTS[@]}"; do
  a=${cpus[$(( (2 * i) % ${#cpus[@]} ))]}
  b=${cpus[$(( (2 * i + 1) % ${#cpus[@]} ))]}
  # shellcheck disable=SC2086
  ( OMNIMOE_CACHE="$out/cache$i" OMNIMOE_RUN_DIR="$out/run$i" OMP_NUM_THREADS=2 \
      taskset -c "$a,$b" bash -c "/usr/bin/time -f %e -o $out/wall$i omnimoe-train \
      trainer.device=cpu trainer.progress=false logging=disabled ${VARIANTS[$i]}" \
      > "$out/log$i" 2>&1 ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
printf '| overrides | wall s | val_loss step 0 | final | drop |\n|---|---|---|---|---|\n'
for i in "${!VARIANTS[@]}"; do
  python3 - "$out/run$i/summary.json" "$(cat "$out/wall$i" 2>/dev/null || echo nan)" "${VARIANTS[$i]:-(defaults)}" <<'PY'
import json, sys
path, wall, name = sys.argv[1:4]
try:
    s = json.load(open(path))
    a, b = s["initial_val_loss"], s["final_val_loss"]
    print(f"| {name} | {wall} | {a:.3f} | {b:.3f} | {100 * (1 - b / a):.1f}% |")
except (OSError, KeyError) as exc:
    print(f"| {name} | {wall} | failed: {exc!r} | | |")
PY
done
