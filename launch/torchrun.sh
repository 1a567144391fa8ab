#!/usr/bin/env bash
# Single-node launcher: NPROC ranks (one per GPU; gloo CPU processes on a CPU-only machine).
#   launch/torchrun.sh NPROC [omnimoe-train overrides...]
#   launch/torchrun.sh 8 model=a80m parallel.tp=2
#   launch/torchrun.sh 2 -m model.top_k=8,16        # a sweep: each job in turn on the 2 ranks
# Every rank must write to one run directory (one sweep directory for -m), so both are fixed
# here: Hydra's ${now:...} could differ by a second between ranks. Set OMNIMOE_RUN_DIR /
# OMNIMOE_SWEEP_DIR to choose them (the default is a new time-stamped folder on every start, so
# continuing a run needs them). The config is checked once, before any rank starts: a bad one
# prints one line and exits 2, and nothing else is printed or made. The console shows rank 0;
# every rank's output is also in <run or sweep dir>/logs/ (the first line says where).
# SIGUSR1 or SIGTERM to this launcher makes every rank save a checkpoint; the launcher then exits
# with 75 and prints the command that continues the run:
#   OMNIMOE_RUN_DIR=outputs/torchrun/<time> launch/torchrun.sh NPROC <the same overrides>
# The launcher sets no time limit of its own on that stop (a scheduler's, e.g. SLURM's KillWait,
# applies). A second SIGTERM kills the ranks at once (SIGKILL; exit 143): the checkpoint of the
# stop in progress is lost, the newest complete one stays. SIGINT (Ctrl-C) stops them without a
# checkpoint (torchrun's own handling; exit 130).
# The environment (Python, NCCL, Triton cache) comes from launch/env.sh.
set -euo pipefail
usage="usage: launch/torchrun.sh NPROC [omnimoe-train overrides...]"
nproc=${1-}
if ! [[ $nproc =~ ^[1-9][0-9]*$ || $nproc =~ ^(auto|gpu|cpu)$ ]]; then
  echo "launch/torchrun.sh: error: NPROC: must be the number of ranks, a positive integer" \
    "(or auto, gpu, cpu) (got '$nproc'); $usage" >&2
  exit 2
fi
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
# How to start this again; the launcher prints it with the directory when the ranks stop early.
# Its presence also makes the launcher say the output dir, once the config has passed its check.
printf -v OMNIMOE_LAUNCHER '%q %q' "$0" "$nproc"
export OMNIMOE_LAUNCHER
exec "$python" -m omnimoe_train.torchrun --standalone --nproc-per-node "$nproc" \
  --log-dir "$out_dir/logs" --redirects 3 --tee 3 --local-ranks-filter 0 \
  -m omnimoe_train.cli "$@"
