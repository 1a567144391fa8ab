#!/usr/bin/env bash
# Source on a GPU machine without a package registry, from the repository root:
#   source benchmarks/device_env.sh
# Installs the wheels carried in .whl/ (megatron-core, hydra-core, omegaconf, antlr4 runtime,
# webdataset, ...: whatever the image lacks) and this project into a private site folder, and
# puts the console scripts on PATH. NVLink multicast stays off (shared hosts).
site=${OMNIMOE_DEVICE_SITE:-/tmp/omnimoe-site}
wheels=()
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then wheels=(.whl/*.whl); fi
# One pip call: with --target, a second call's --upgrade replaces whole top-level folders, so
# installing this project after the wheels dropped hydra-submitit-launcher's half of the shared
# hydra_plugins namespace. --upgrade: on a machine kept warm between calls, an install without
# it leaves the previous call's copy of this project in place (pip --target skips what is there).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --no-cache-dir --upgrade --target "$site" "${wheels[@]}" . >/dev/null || return 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
# prepare_bench_data LOG: the benchmarks' corpus (seq 1024, 3 MB of text) prepared once into
# $OMNIMOE_CACHE, before several ranks or runs would prepare it side by side.
prepare_bench_data() {
  python3 - >"$1" 2>&1 <<'PY'
from omnimoe_train.config import DataConfig
from omnimoe_train.data import prepare_data
print(prepare_data(DataConfig(seq_len=1024, max_bytes=3_000_000), rank=0).description)
PY
}
export -f prepare_bench_data
