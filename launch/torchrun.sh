#!/usr/bin/env bash
# Single-node launcher: NPROC ranks (one per GPU; gloo CPU processes on a CPU-only machine).
#   launch/torchrun.sh NPROC [omnimoe-train overrides...]
#   launch/torchrun.sh 8 model=a80m parallel.tp=2
#   launch/torchrun.sh 2 -m model.top_k=8,16        # a sweep: each job in turn on the 2 ranks
# Every rank must write to one run directory (one sweep directory for -m), so both are fixed
# here: Hydra's ${now:...} could differ by a second between ranks. Set OMNIMOE_RUN_DIR /
# OMNIMOE_SWEEP_DIR to choose them (the default is a new time-stamped folder on every start, so
# continuing a run needs them). The config is checked once, before any rank starts. The console
# shows rank 0; every rank's output is also in <run or sweep dir>/logs/.
# SIGUSR1 or SIGTERM to this launcher makes every rank save a checkpoint; the launcher then exits
# with 75 and prints the command that continues the run:
#   OMNIMOE_RUN_DIR=outputs/torchrun/<time> launch/torchrun.sh NPROC <the same overrides>
# A second SIGTERM stops the ranks at once (exit 143).
# The environment (Python, NCCL, Triton cache) comes from launch/env.sh.
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC [omnimoe-train overrides...]}
shift
source "$(dirname "$0")/env.sh"
python=$(omnimoe_python) || exit 2
stamp=$(date +%Y-%m-%d_%H-%M-%S)
export OMNIMOE_RUN_DIR=${OMNIMOE_RUN_DIR:-outputs/torchrun/$stamp}
export OMNIMOE_SWEEP_DIR=${OMNIMOE_SWEEP_DIR:-multirun/$stamp}
out_dir=$OMNIMOE_RUN_DIR
for arg in "$@"; do
  case $arg in -m | --multirun) out_dir=$OMNIMOE_SWEEP_DIR ;; esac
done
echo "output dir: $out_dir (per-rank logs in $out_dir/logs)" >&2
# How to start this again; the launcher prints it with the directory when the ranks stop early.
printf -v OMNIMOE_LAUNCHER '%q %q' "$0" "$nproc"
export OMNIMOE_LAUNCHER
exec "$python" -m omnimoe_train.torchrun --standalone --nproc-per-node "$nproc" \
  --log-dir "$out_dir/logs" --redirects 3 --tee 3 --local-ranks-filter 0 \
  -m omnimoe_train.cli "$@"
