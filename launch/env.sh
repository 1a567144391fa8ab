# Environment of the training processes; sourced by launch/torchrun.sh and launch/slurm_node.sh.
# A variable that is already set keeps its value, so any of these can be overridden.
#   OMNIMOE_PYTHON   the interpreter (default: this repository's .venv/bin/python, made by
#                    launch/setup_env.sh); on a cluster, a path every node can read.

omnimoe_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export OMNIMOE_PYTHON=${OMNIMOE_PYTHON:-$omnimoe_repo/.venv/bin/python}
if [ ! -x "$OMNIMOE_PYTHON" ]; then
  echo "omnimoe launch: no Python at $OMNIMOE_PYTHON: run 'bash launch/setup_env.sh' in" \
    "$omnimoe_repo, or set OMNIMOE_PYTHON" >&2
  return 2
fi

# NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# A failed or timed-out collective aborts the communicators and ends the process, instead of
# leaving the other ranks waiting (torch's current name for NCCL_ASYNC_ERROR_HANDLING).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Expandable segments: less fragmentation from the varying expert-pair buffer sizes.
if [ -z "${PYTORCH_ALLOC_CONF:-}" ]; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
# Triton compiles into a node-local cache: a shared home directory is slow and several nodes
# writing one cache race.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/omnimoe-triton-$(id -u)-${SLURMD_NODENAME:-$(hostname -s)}}
