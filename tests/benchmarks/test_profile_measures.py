"""``benchmarks/profile_measures.py``: the GPU busy time is the union of the kernels' intervals
(overlapping streams counted once), and kernels fall into the first matching category."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_measures  # noqa: E402 - the script's folder, as the scripts import it


def _event(start_us: float, end_us: float, device: bool = True) -> SimpleNamespace:
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(device_type=kind, time_range=SimpleNamespace(start=start_us, end=end_us))


def test_busy_time_is_the_union_of_kernel_intervals() -> None:
    events = [
        _event(0, 100),
        _event(50, 150),  # overlaps the first (another stream): counted once
        _event(150, 160),  # touches the end of the merged interval
        _event(300, 400),
        _event(310, 320),  # inside the previous one
        _event(0, 1000, device=False),  # host time is not GPU time
        _event(500, 500),  # empty
    ]
    assert profile_measures.gpu_busy_ms(events) == (160 + 100) / 1e3
    assert profile_measures.gpu_busy_ms([]) == 0.0


def test_kernels_fall_into_the_first_matching_category() -> None:
    cat = profile_measures.categorize
    assert cat("ncclDevKernel_AllGather_RING_LL") == "nccl"
    assert cat("_pair_scores_kernel") == "expert kernels"
    assert cat("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm (gates, SwiGLU)"
    assert cat("void at::native::vectorized_elementwise_kernel<8, FillFunctor>") == "copies/fills"
    assert cat("void at::native::reduce_kernel<512, 1>") == "other elementwise"
