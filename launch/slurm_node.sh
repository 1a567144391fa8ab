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
is_host=0
[ "${SLURM_NODEID:-0}" = 0 ] && is_host=1
exec "$python" -m omnimoe_train.torchrun \
  --nnodes "${SLURM_JOB_NUM_NODES:?not in a SLURM job}" \
  --nproc-per-node "${OMNIMOE_NPROC_PER_NODE:?}" \
  --rdzv-backend c10d --rdzv-endpoint "${OMNIMOE_RDZV_HOST:?}:${OMNIMOE_RDZV_PORT:?}" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-conf "is_host=$is_host" --max-restarts 0 \
  --log-dir "${OMNIMOE_LOG_DIR:?}/$module/node${SLURM_NODEID:-0}" --redirects 3 --tee 3 \
  --local-ranks-filter 0 \
  -m "$module" "$@"
