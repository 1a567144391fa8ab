"""Bus bandwidth of the collectives expert parallelism issues, at the sizes one a80m layer uses.

For each size, ``all_gather_into_tensor``, ``reduce_scatter_tensor`` and ``all_to_all_single``
(even splits) are timed with CUDA events over ``--iters`` back-to-back calls after a warm-up,
and reported as algorithm bandwidth (bytes of the full buffer / time) and bus bandwidth
(x (P-1)/P, the nccl-tests convention), so a run with ``NCCL_PROTO=Simple`` or other NCCL
settings can be compared with the default. Why not nccl-tests: it is not in the device image
and cannot be built there; these are the same three calls the layer makes through torch.

    torchrun --standalone --nproc-per-node 2 benchmarks/nccl_bandwidth.py
    NCCL_PROTO=Simple torchrun --standalone --nproc-per-node 2 benchmarks/nccl_bandwidth.py
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def time_op(fn, iters: int) -> float:  # noqa: ANN001
    """Mean ms per call of ``fn`` over ``iters`` back-to-back calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mb", type=float, nargs="+", default=[1, 4, 25, 50, 100], help="full buffer, MB"
    )
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    size, rank = dist.get_world_size(), dist.get_rank()
    settings = {k: v for k, v in os.environ.items() if k.startswith("NCCL_") and k != "NCCL_DEBUG"}
    if rank == 0:
        print(f"{size} ranks, NCCL {torch.cuda.nccl.version()}, settings {settings}")
        print("| op | MB | ms | algo GB/s | bus GB/s |\n|---|---|---|---|---|")
    for mb in args.mb:
        numel = int(mb * 1e6 / 2) // size * size
        full = torch.randn(numel, dtype=torch.bfloat16, device=device)
        part = torch.empty(numel // size, dtype=torch.bfloat16, device=device)
        out = torch.empty_like(full)
        ops = {
            "all_gather": lambda f=full, p=part: dist.all_gather_into_tensor(f, p),
            "reduce_scatter": lambda f=full, p=part: dist.reduce_scatter_tensor(p, f),
            "all_to_all": lambda f=full, o=out: dist.all_to_all_single(o, f),
        }
        for name, fn in ops.items():
            ms = time_op(fn, args.iters)
            algo = full.numel() * 2 / ms / 1e6
            if rank == 0:
                print(
                    f"| {name} | {mb:g} | {ms:.3f} | {algo:.0f} | {algo * (size - 1) / size:.0f} |"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
