"""One atomic-experts forward + backward between cudaProfilerStart/Stop, for Nsight Compute.

Run under ncu, e.g. (H100, clocks left alone):
  ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis --section Occupancy \\
      python3 benchmarks/profile_experts.py 4096 1024 102400 512
The first call (compiles the kernels, fills the caches) is outside the profiled range.
"""

from __future__ import annotations

import argparse

import torch

import omnimoe_kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs=4, type=int, metavar=("T", "d", "N", "K"))
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args()
    T, d, N, K = args.shape
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    up = (torch.randn(N, d, device="cuda") / d**0.5).bfloat16().requires_grad_()
    down = torch.randn(N, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.rand(T, K, device="cuda").requires_grad_()
    idx = torch.randint(0, N, (T, K), device="cuda")
    gy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        y = omnimoe_kernels.atomic_experts(x, up, down, w, idx)
        if not args.forward_only:
            torch.autograd.grad(y, (x, up, down, w), gy)

    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
