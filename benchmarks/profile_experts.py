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
from bench_kernels import expert_inputs  # the script's folder is on sys.path

import omnimoe_kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    # A tuple metavar breaks argparse's "missing argument" message (a TypeError traceback).
    ap.add_argument("shape", nargs=4, type=int, metavar="INT", help="T d N K")
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args()
    from runs import require_cuda  # the script's folder is on sys.path

    require_cuda("profile_experts.py")
    T, d, N, K = args.shape
    x, up, down, w, idx, gy = expert_inputs(T, d, N, K)

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
