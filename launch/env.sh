# Environment of the training processes; sourced by launch/torchrun.sh, launch/slurm.sbatch,
# launch/slurm_node.sh and the sweep jobs of hydra/launcher=slurm. A variable that is already
# set keeps its value, so any of these can be overridden.

# The interpreter the launchers run: OMNIMOE_PYTHON, else this repository's .venv/bin/python
# (made by launch/setup_env.sh). On a cluster it must be a path every node can read.
omnimoe_python() {
  local repo python
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  python=${OMNIMOE_PYTHON:-$repo/.venv/bin/python}
  if [ ! -x "$python" ]; then
    echo "omnimoe launch: no Python at $python: run 'bash launch/setup_env.sh' in $repo," \
      "or set OMNIMOE_PYTHON" >&2
    return 2
  fi
  echo "$python"
}

# NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# A failed or timed-out collective aborts the communicators and ends the process, instead of
# leaving the other ranks waiting (torch's current name for NCCL_ASYNC_ERROR_HANDLING).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Expandable segments: less fragmentation from the varying expert-pair buffer sizes.
if [ -z "${PYTORCH_ALLOC_CONF:-}" ]; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
# The console (rich) wraps at 80 columns when it writes to a file or a pipe, as it does under
# torchrun and SLURM: a wider line keeps one line per logged step.
export COLUMNS=${COLUMNS:-160}
# Triton compiles into a node-local cache: a shared home directory is slow and several nodes
# writing one cache race.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/omnimoe-triton-$(id -u)-${SLURMD_NODENAME:-$(hostname -s)}}
