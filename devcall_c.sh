#!/usr/bin/env bash
# session 6, call C: GPU0 training variants, GPU1 kernel benches + GPU tests
source benchmarks/device_env.sh >/dev/null 2>&1
export OMNIMOE_CACHE=/tmp/oc
mkdir -p $OUT/t $OUT/k
python3 -c "
from omnimoe_train.config import DataConfig
from omnimoe_train.data import prepare_data
print(prepare_data(DataConfig(seq_len=1024, max_bytes=3_000_000), rank=0).description)" > $OUT/prep.log 2>&1
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 benchmarks/bench_grad_paths.py --json $OUT/k/grad_paths.json > $OUT/k/grad_paths.log 2>&1
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_experts_dense_grad.py tests/train/test_fusions_gpu.py tests/kernels/test_atomic_experts.py > $OUT/k/gputests.log 2>&1
  for g in dense pairs; do timeout 60 python3 benchmarks/profile_layer.py --grad-path $g > $OUT/k/layer_$g.log 2>&1; done
) &
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 250 python3 benchmarks/bench_training.py --scales a80m --steps 15 --models omnimoe --variants baseline grads_pairs all --runs-dir /tmp/bt1 --json $OUT/t/omni.json > $OUT/t/omni.log 2>&1
  timeout 290 python3 benchmarks/bench_training.py --scales a80m --steps 15 --models dense --variants baseline all fused_swiglu ce_liger compile --runs-dir /tmp/bt2 --json $OUT/t/dense.json > $OUT/t/dense.log 2>&1
) &
wait
tail -4 $OUT/k/gputests.log; tail -12 $OUT/k/grad_paths.log; grep -v "^\s*$" $OUT/k/layer_dense.log | tail -14; grep -v "^\s*$" $OUT/k/layer_pairs.log | tail -14; tail -6 $OUT/t/omni.log; tail -8 $OUT/t/dense.log
