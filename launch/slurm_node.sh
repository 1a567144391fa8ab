#!/usr/bin/env bash
# One node's part of a SLURM job (srun starts it once per node from launch/slurm.sbatch, or from
# a batch script of your own): torchrun over all the job's nodes with a c10d rendezvous.
#   launch/slurm_node.sh MODULE [ARGS...]        e.g. omnimoe_train.cli model=a80m
# Needs OMNIMOE_RDZV_HOST, OMNIMOE_RDZV_PORT, OMNIMOE_NPROC_PER_NODE and OMNIMOE_LOG_DIR (the
# batch script sets them). The node with SLURM_NODEID 0 hosts the rendezvous store.
set -euo pipefail
source "$(dirname "$0")/env.sh"
python=$(omnimoe_python) || exit 2
module=${1:?usage: launch/slurm_node.sh MODULE [ARGS...]}
shift
# The torchrun command line is omnimoe_train/torchrun.py's slurm_node_args (the sweep jobs of
# hydra/launcher=slurm_torchrun use it too).
: "${SLURM_JOB_NUM_NODES:?not in a SLURM job}"
exec "$python" -m omnimoe_train.torchrun --slurm-node "$module" "$@"
