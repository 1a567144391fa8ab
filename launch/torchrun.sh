#!/usr/bin/env bash
# Single-node launcher: NPROC ranks (one per GPU; gloo ranks on a CPU-only machine).
#   launch/torchrun.sh NPROC [omnimoe-train overrides...]
#   launch/torchrun.sh 8 model=a80m parallel.tp=2
# Every rank must write to one run directory, so it is fixed here (Hydra's ${now:...} could
# differ by a second between ranks); set OMNIMOE_RUN_DIR to choose it.
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC [omnimoe-train overrides...]}
shift
export OMNIMOE_RUN_DIR=${OMNIMOE_RUN_DIR:-outputs/torchrun/$(date +%Y-%m-%d_%H-%M-%S)}
# NVLink multicast stays off: on shared hosts it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
echo "run dir: $OMNIMOE_RUN_DIR" >&2
exec torchrun --standalone --nproc-per-node "$nproc" -m omnimoe_train.cli "$@"
