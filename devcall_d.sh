#!/usr/bin/env bash
# session 6, call D: EP overlap on/off (both GPUs), then GPU0 omnimoe/dense compile, GPU1 router sweep
source benchmarks/device_env.sh >/dev/null 2>&1
export OMNIMOE_CACHE=/tmp/oc
mkdir -p $OUT/ep $OUT/t $OUT/k
python3 -c "
from omnimoe_train.config import DataConfig
from omnimoe_train.data import prepare_data
print(prepare_data(DataConfig(seq_len=1024, max_bytes=3_000_000), rank=0).description)" > $OUT/prep.log 2>&1
timeout 60 torchrun --standalone --nproc-per-node 2 benchmarks/profile_expert_parallel.py \
  --modes local,rows,rows_overlap,dim,dim_overlap --tokens 16384 --json $OUT/ep/prof16k.json > $OUT/ep/prof16k.log 2>&1
timeout 170 python3 benchmarks/weak_scaling.py --gpus 2 --layouts dp ep_rows ep_dim --micro-batch 16 --steps 15 \
  --log-interval 5 --runs-dir /tmp/w_on --json $OUT/ep/weak_on.json > $OUT/ep/weak_on.log 2>&1
timeout 110 python3 benchmarks/weak_scaling.py --gpus 2 --layouts ep_rows ep_dim --micro-batch 16 --steps 15 \
  --log-interval 5 --runs-dir /tmp/w_off --extra parallel.ep_overlap=false --json $OUT/ep/weak_off.json > $OUT/ep/weak_off.log 2>&1
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python3 benchmarks/bench_kernels.py --sweep-router --only router:16384-1024-64,router:4096-320-4096 --json $OUT/k/router.json > $OUT/k/router.log 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 benchmarks/bench_training.py --scales a80m --steps 15 --models omnimoe dense --variants baseline compile --runs-dir /tmp/bt3 --json $OUT/t/compile.json > $OUT/t/compile.log 2>&1
) &
wait
grep -v "USDT\|^ \{11\}[0-9 .]*ms" $OUT/ep/prof16k.log | tail -12; tail -5 $OUT/ep/weak_on.log; tail -4 $OUT/ep/weak_off.log; tail -16 $OUT/k/router.log; tail -7 $OUT/t/compile.log
